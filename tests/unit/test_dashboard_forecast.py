"""The trend-and-weekday anomaly detector: a weekly pattern or a slow rise raises nothing, a real drop in the
latest days raises an alert, and thin data falls back to the caller's two-window test."""

from __future__ import annotations

import numpy as np
import pytest

from services.dashboard import domain
from services.dashboard.forecast import ANOMALY, INSUFFICIENT_HISTORY, INSUFFICIENT_SAMPLES, OK, forecast_check

VOTES = 200


def _weekly(days: int, seed: int, *, weekday: float = 0.70, weekend: float = 0.50, trend: float = 0.0):
    """(positives, votes) per day: weekends (days 5 and 6 of each week) rate lower; binomial noise."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(days):
        rate = (weekend if d % 7 in (5, 6) else weekday) + trend * d
        out.append((int(rng.binomial(VOTES, min(max(rate, 0.0), 1.0))), VOTES))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_a_weekly_pattern_without_a_drop_raises_nothing_even_on_the_weekend(seed: int) -> None:
    series = _weekly(35, seed)  # 28 days of history, then the recent days: days 33 and 34 are a weekend
    for recent_days in (1, 2):
        history, recent = series[: 35 - recent_days], series[35 - recent_days :]
        assert forecast_check("overall", history, recent).status == OK


def test_the_plain_two_window_test_would_have_alarmed_on_that_weekend() -> None:
    """Why the detector exists: the last (weekend) day against the week before looks like a 14-point drop."""
    series = _weekly(35, 0)
    week = series[-8:-1]
    baseline = (sum(p for p, _ in week), sum(n for _, n in week))
    check = domain.check_anomaly("overall", series[-1], baseline, alpha=0.01, min_votes=20, min_drop=0.10)
    assert check.status == "ANOMALY"
    assert forecast_check("overall", series[:-1], series[-1:]).status == OK


@pytest.mark.parametrize("seed", range(10))
def test_a_slow_rise_raises_nothing(seed: int) -> None:
    series = _weekly(35, seed, weekday=0.55, weekend=0.45, trend=0.005)
    assert forecast_check("overall", series[:-2], series[-2:]).status == OK


@pytest.mark.parametrize("seed", range(10))
def test_a_real_drop_in_the_last_days_raises_an_alert(seed: int) -> None:
    series = _weekly(33, seed)  # days 31 and 32 are weekdays (a Wednesday and Thursday)
    rng = np.random.default_rng(100 + seed)
    dropped = [(int(rng.binomial(VOTES, 0.50)), VOTES) for _ in range(2)]  # weekday rate 70% -> 50%
    check = forecast_check("overall", series[:-2], dropped)
    assert check.status == ANOMALY
    assert check.forecast_rate is not None and check.forecast_rate > 0.6
    assert check.lower_band is not None and check.recent_rate is not None and check.recent_rate < check.lower_band
    assert "below the forecast" in check.message()


def test_a_drop_that_is_significant_but_small_is_not_an_alert() -> None:
    history = [(7000, 10000)] * 28
    assert forecast_check("overall", history, [(6850, 10000)], min_drop=0.10).status == OK


def test_short_or_thin_history_falls_back_and_thin_recent_windows_are_not_judged() -> None:
    assert forecast_check("overall", _weekly(10, 0), [(50, 100)]).status == INSUFFICIENT_HISTORY
    thin = [(1, 2)] * 28
    assert forecast_check("overall", thin, [(50, 100)]).status == INSUFFICIENT_HISTORY
    assert forecast_check("overall", _weekly(28, 0), [(3, 10)]).status == INSUFFICIENT_SAMPLES
