"""Anomaly detection that knows trend and weekday: is the latest windows' positive rate below what the history
forecasts for them?

A plain two-window test (the recent day against the week before) raises an alarm every weekend when users vote
differently on weekends, and misses a slow slide. Here the history of per-window positive rates is fitted with a
linear trend plus one level per position in the seasonal cycle (a week of daily windows by default: the weekday),
weighted by each window's votes (statsmodels WLS). The forecast for the recent windows is that fit carried on;
the band below it is the one-sided `alpha` prediction bound, whose width has both sources of error: the fit's own
uncertainty (the trend and weekday levels are estimated) and how far a window strays from its pattern (the
residual variance, which already holds the binomial noise of a window's votes). The recent windows are pooled
(votes-weighted), so one thin window cannot raise an alert alone. An alert also needs the drop to be material
(`min_drop` below the forecast), not only significant.

Pure: plain inputs, a frozen result, explicit status codes instead of exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from scipy.stats import norm

#: Status codes.
ANOMALY = "ANOMALY"
OK = "OK"
INSUFFICIENT_HISTORY = "INSUFFICIENT_HISTORY"  # too few windows (or votes) to learn a pattern: caller falls back
INSUFFICIENT_SAMPLES = "INSUFFICIENT_SAMPLES"  # the recent windows hold too few votes to judge


@dataclass(frozen=True)
class ForecastCheck:
    scope: str
    status: str
    recent_votes: int
    recent_positives: int
    recent_rate: float | None
    forecast_rate: float | None  # what the history predicts for the recent windows (votes-weighted)
    lower_band: float | None  # one-sided lower bound at `alpha`
    p_value: float | None  # how unlikely a rate this low is under the forecast

    def message(self) -> str:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        if self.status != ANOMALY:
            return f"{self.scope}: {self.status}"
        return (
            f"{self.scope}: positive rate {pct(self.recent_rate)} ({self.recent_votes} votes) is below the "
            f"forecast {pct(self.forecast_rate)} from trend and weekday (band down to {pct(self.lower_band)}); "
            f"p={self.p_value:.2g}"
        )


def _design(t: np.ndarray, period: int) -> np.ndarray:
    """Columns: one level per position in the cycle (no separate intercept), and the linear trend."""
    season = np.zeros((len(t), period))
    season[np.arange(len(t)), t % period] = 1.0
    return np.column_stack([season, t.astype(float)])


def forecast_check(
    scope: str,
    history: Sequence[tuple[int, int]],
    recent: Sequence[tuple[int, int]],
    *,
    period: int = 7,
    alpha: float = 0.01,
    min_votes: int = 20,
    min_drop: float = 0.10,
    min_window_votes: int = 5,
) -> ForecastCheck:
    """Judge the `recent` windows against the forecast from `history`.

    `history` and `recent` are (positives, votes) per window, oldest first, with `recent` directly after
    `history`. An alert needs the pooled recent rate below the one-sided `alpha` band *and* at least `min_drop`
    below the forecast (a material drop, not only a significant one). History needs two full cycles of windows,
    with at least `min_window_votes` votes in most of them; otherwise INSUFFICIENT_HISTORY (the caller uses the
    two-window test).
    """
    xr = sum(p for p, _ in recent)
    nr = sum(n for _, n in recent)
    rr = xr / nr if nr else None

    def result(status: str, forecast: float | None = None, lower: float | None = None, p: float | None = None):
        return ForecastCheck(scope, status, nr, xr, rr, forecast, lower, p)

    counts = np.array([n for _, n in history], dtype=float)
    usable = counts >= min_window_votes
    if len(history) < 2 * period or (~usable).sum() > len(history) // 4:
        return result(INSUFFICIENT_HISTORY)
    if nr < min_votes:
        return result(INSUFFICIENT_SAMPLES)
    rates = np.array([p / n if n else 0.0 for p, n in history], dtype=float)
    t = np.arange(len(history))
    fit = sm.WLS(rates[usable], _design(t[usable], period), weights=counts[usable]).fit()
    # The recent windows carry on the history's time axis (and its cycle).
    weights = np.array([n for _, n in recent], dtype=float)
    x_new = _design(np.arange(len(history), len(history) + len(recent)), period)
    w = weights / weights.sum()
    f = float(np.clip(w @ (x_new @ fit.params), 0.0, 1.0))
    # Variance of the pooled recent rate around the forecast: the fit's uncertainty (w'X Cov X'w) plus the
    # residual variance per window, scaled from the history's typical vote count to each recent window's.
    fit_var = float(w @ x_new @ fit.cov_params() @ x_new.T @ w)
    # WLS' scale is per unit weight (one vote): a window of n votes strays by scale / n.
    resid_var = float(fit.scale) * float(np.sum(w**2 / weights))
    se = math.sqrt(max(fit_var + resid_var, 1e-18))
    z = (rr - f) / se if rr is not None else 0.0
    p = float(norm.cdf(z))
    lower = f - float(norm.ppf(1 - alpha)) * se
    status = ANOMALY if rr is not None and p < alpha and f - rr >= min_drop else OK
    return result(status, f, max(0.0, lower), p)
