"""The dashboard's pure figures: definitions, zero-division cases, statistics against golden numbers."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.dashboard import domain
from services.dashboard.domain import Cell

# One explanation of the seed prompt on one day, with no votes, cost or latency: tests set what they look at.
ONE_EXPLANATION = Cell(
    "2026-01-01", "BUY", "AAPL", "explain", "v1.0", "offline", None, None, 1, 0, 0, 0, 0, 0, 0.0, 0.0
)


def cell(**fields: Any) -> Cell:
    return replace(ONE_EXPLANATION, **fields)


# -- definitions ----------------------------------------------------------------------------------------


def test_figures_follow_the_issue_definitions() -> None:
    f = domain.figures(
        [
            cell(
                explanations=4,
                with_feedback=2,
                votes=3,
                positives=2,
                stars_sum=9,
                stars_n=2,
                cost_usd=0.04,
                latency_ms=400,
            ),
            cell(explanations=6, with_feedback=1, votes=1, positives=0, cost_usd=0.06, latency_ms=600),
        ]
    )
    assert f.explanations == 10
    assert f.feedback_rate == pytest.approx(3 / 10)  # explanations with at least one vote / explanations
    assert f.positive_rate == pytest.approx(2 / 4)  # thumbs up / votes
    assert f.negatives == 2
    assert f.avg_rating == pytest.approx(4.5)  # mean stars over the votes that have stars
    assert f.cost_per_explanation == pytest.approx(0.01)
    assert f.avg_latency_ms == pytest.approx(100.0)


def test_rates_without_a_denominator_are_none_not_errors() -> None:
    empty = domain.figures([])
    assert empty.explanations == 0
    assert empty.feedback_rate is None
    assert empty.positive_rate is None
    assert empty.positive_rate_ci is None
    assert empty.avg_rating is None
    assert empty.cost_per_explanation is None
    assert empty.avg_latency_ms is None
    no_votes = domain.figures([cell(explanations=3)])
    assert no_votes.feedback_rate == 0.0
    assert no_votes.positive_rate is None
    votes_without_stars = domain.figures([cell(with_feedback=1, votes=1, positives=1)])
    assert votes_without_stars.avg_rating is None


def test_group_keeps_each_key_separate() -> None:
    grouped = domain.group(
        [cell(prompt_version="v1.0", votes=2, positives=2), cell(prompt_version="v1.1", votes=2, positives=0)],
        lambda c: c.prompt_version,
    )
    assert grouped["v1.0"].positive_rate == 1.0
    assert grouped["v1.1"].positive_rate == 0.0


def test_daily_series_fills_days_without_data_with_zeros() -> None:
    rows = domain.daily(
        [cell(day="2026-01-01", votes=1, positives=1), cell(day="2026-01-03", votes=2, positives=1)],
        until=date(2026, 1, 4),
    )
    assert [r["day"] for r in rows] == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    assert [r["positive_rate"] for r in rows] == [1.0, None, 0.5, None]
    assert rows[1]["explanations"] == 0
    assert domain.daily([], until=date(2026, 1, 4)) == []


# -- (the vote rules: tests/unit/test_vote_rules.py) --------------------------------------------------


# -- statistics: golden numbers from statsmodels 0.14 (proportion_confint method="wilson", proportions_ztest) --


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    [
        (8, 10, 0.49016247153664183, 0.9433178485456247),
        (0, 5, 0.0, 0.43448246478317487),
        (5, 5, 0.5655175352168252, 1.0),
        (45, 100, 0.35614537979511973, 0.5475539700255787),
        (1, 1, 0.2065493143772374, 1.0),
    ],
)
def test_wilson_interval_matches_statsmodels(x: int, n: int, low: float, high: float) -> None:
    got = domain.wilson_interval(x, n)
    assert got is not None
    assert got[0] == pytest.approx(low, abs=1e-9)
    assert got[1] == pytest.approx(high, abs=1e-9)


def test_wilson_interval_without_votes_is_none() -> None:
    assert domain.wilson_interval(0, 0) is None


def test_one_sided_z_test_matches_statsmodels() -> None:
    # proportions_ztest([12, 90], [40, 150], alternative="smaller") -> p = 0.0003612448433275423
    assert domain.one_sided_below_p((12, 40), (90, 150)) == pytest.approx(0.0003612448433275423, rel=1e-9)
    assert domain.one_sided_below_p((0, 10), (0, 10)) is None  # no variance
    assert domain.one_sided_below_p((0, 0), (5, 10)) is None


def test_prob_beats_control_is_symmetric_and_undefined_without_data() -> None:
    p = domain.prob_beats((70, 100), (50, 100))
    assert p is not None and p > 0.99
    q = domain.prob_beats((50, 100), (70, 100))
    assert q is not None and q == pytest.approx(1 - p)
    assert domain.prob_beats((1, 2), (0, 0)) is None
    assert domain.prob_beats((5, 5), (3, 3)) is None


# -- league tables, heatmap, experiments, anomalies -----------------------------------------------------


def test_ticker_league_ranks_only_tickers_with_the_minimum_sample() -> None:
    cells = [
        cell(ticker="AAA", votes=10, positives=9),
        cell(ticker="BBB", votes=10, positives=2),
        cell(ticker="CCC", votes=10, positives=5),
        cell(ticker="TINY", votes=2, positives=2),  # 100% but too few votes to rank
    ]
    league = domain.ticker_league(cells, min_votes=5, n=2)
    assert [r["ticker"] for r in league["top"]] == ["AAA", "CCC"]
    assert [r["ticker"] for r in league["bottom"]] == ["BBB", "CCC"]
    assert league["eligible"] == 3


def test_heatmap_is_signal_by_ticker_positive_rate() -> None:
    cells = [
        cell(signal="BUY", ticker="AAPL", votes=4, positives=3),
        cell(signal="SELL", ticker="AAPL", votes=2, positives=0),
        cell(signal="BUY", ticker="MSFT", votes=1, positives=1),
    ]
    h = domain.heatmap(cells, max_tickers=1)
    assert h["tickers"] == ["AAPL"]  # the ticker with the most votes
    assert h["signals"] == ["BUY", "SELL"]
    assert {(c["signal"], c["positive_rate"]) for c in h["cells"]} == {("BUY", 0.75), ("SELL", 0.0)}


def test_experiment_arms_get_interval_lift_and_probability_against_control() -> None:
    info = domain.ExperimentInfo(
        experiment_id="exp1",
        prompt_name="explain",
        status="running",
        arms=[
            {"arm_id": "control", "prompt_version": "v1.0", "model": "m", "weight": 0.5, "is_control": True},
            {"arm_id": "b", "prompt_version": "v1.1", "model": "m", "weight": 0.5, "is_control": False},
        ],
    )
    cells = [
        cell(experiment_id="exp1", arm_id="control", explanations=100, with_feedback=100, votes=100, positives=50),
        cell(experiment_id="exp1", arm_id="b", explanations=100, with_feedback=100, votes=100, positives=60),
    ]
    [exp] = domain.experiments(cells, [info])
    control, b = exp["arms"]
    assert control["is_control"] and control["lift"] is None and control["prob_beats_control"] is None
    assert b["positive_rate"] == pytest.approx(0.6)
    assert b["lift"] == pytest.approx(0.2)
    assert 0.9 < b["prob_beats_control"] < 0.95
    assert b["positive_rate_ci"][0] < 0.6 < b["positive_rate_ci"][1]


def test_experiment_seen_only_through_explanations_is_still_listed() -> None:
    [exp] = domain.experiments([cell(experiment_id="x9", arm_id="a", votes=1, positives=1)], [])
    assert exp["status"] == "unknown"
    assert [a["arm_id"] for a in exp["arms"]] == ["a"]


def test_anomaly_needs_a_significant_and_material_drop_with_enough_votes() -> None:
    kw: dict[str, Any] = {"alpha": 0.01, "min_votes": 20, "min_drop": 0.10}
    assert domain.check_anomaly("overall", (12, 40), (90, 150), **kw).status == "ANOMALY"
    assert domain.check_anomaly("overall", (28, 40), (105, 150), **kw).status == "OK"  # same rate
    assert domain.check_anomaly("overall", (2, 10), (90, 150), **kw).status == "INSUFFICIENT_SAMPLES"
    # significant with a huge sample but under the material drop: not an alert
    assert domain.check_anomaly("overall", (6500, 10000), (7000, 10000), **kw).status == "OK"
    check = domain.check_anomaly("overall", (12, 40), (90, 150), **kw)
    assert "30.0%" in check.message() and "60.0%" in check.message()


@pytest.mark.parametrize(
    ("age", "width"),
    [
        (timedelta(0), 300),
        (timedelta(hours=3), 300),
        (timedelta(hours=10), 900),
        (timedelta(hours=23), 1800),
        (timedelta(days=1, hours=12), 3600),
        (timedelta(days=30), 86400),
        (timedelta(days=365), 14 * 86400),
    ],
)
def test_curve_width_keeps_the_curve_to_at_most_48_points(age: timedelta, width: int) -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    assert domain.curve_width(now - age, now) == width
    assert (age.total_seconds() // width) + 2 <= domain.CURVE_MAX_POINTS


def test_learning_curve_points_carry_their_window_and_wilson_interval() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    index = int(now.timestamp()) // 3600 - 1
    curve = domain.learning_curve([(index, 5, 4, 3)], 3600, now)
    (point,) = curve["points"]
    assert point["start"] == "2026-03-10T11:00:00+00:00" and point["end"] == "2026-03-10T12:00:00+00:00"
    assert point["positive_rate"] == pytest.approx(0.75)
    interval = domain.wilson_interval(3, 4)
    assert interval is not None
    assert point["positive_rate_ci"] == pytest.approx(list(interval))
    assert domain.learning_curve([], None, now)["points"] == []
