"""The dashboard's figures, free of any framework: pure functions over plain rows.

The read model keeps one row per explanation and one per vote; the store groups them into `Cell`s (one per
day x signal x ticker x prompt version x model x experiment arm, with sums), and everything shown is
computed here from cells. Definitions (the issue's, kept exact):

- feedback rate = explanations with at least one vote / explanations
- positive rate = thumbs up / votes
- average rating = mean stars over the votes that have stars
- cost per explanation = total cost / explanations; latency = mean over explanations

A rate whose denominator is zero is `None` (shown as "-"), never a division error. Days are the UTC day the
explanation was created, so a vote counts on its explanation's day (the quality of what was produced then).

Vote rules: one row per `feedback_id` (stable per session and explanation), the newer `submitted_at` wins,
so a replaced vote is counted once; an erased vote is removed, and a vote submitted before its erasure that
arrives afterwards is dropped (`shared.votes`, the rules every service that keeps votes applies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from shared.clock import as_utc

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


# ---------------------------------------------------------------------------------------------------------
# Days
# ---------------------------------------------------------------------------------------------------------


def day_of(ts: datetime) -> str:
    return as_utc(ts).date().isoformat()


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (None without data).

    Unlike the normal ("Wald") interval it stays inside [0, 1] and is sensible for small n or rates near
    0 and 1: centre (p + z²/2n) / (1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    """
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def prob_beats(arm: tuple[int, int], control: tuple[int, int]) -> float | None:
    """Probability that the arm's true positive rate is above the control's, by the normal approximation
    to the difference of two proportions (unpooled variance). None when either side has no votes or the
    difference has no variance (both 0% or both 100%)."""
    (xa, na), (xc, nc) = arm, control
    if na <= 0 or nc <= 0:
        return None
    pa, pc = xa / na, xc / nc
    var = pa * (1 - pa) / na + pc * (1 - pc) / nc
    if var <= 0:
        return None
    return normal_cdf((pa - pc) / math.sqrt(var))


def one_sided_below_p(recent: tuple[int, int], baseline: tuple[int, int]) -> float | None:
    """p-value of the pooled two-proportion z-test of H1: recent rate < baseline rate (None if undefined)."""
    (x1, n1), (x2, n2) = recent, baseline
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x1 / n1 - x2 / n2) / se
    return normal_cdf(z)


# ---------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One group of explanations with the same dimensions, and the sums over them and their votes."""

    day: str
    signal: str
    ticker: str
    prompt_name: str
    prompt_version: str
    model: str
    experiment_id: str | None
    arm_id: str | None
    explanations: int
    with_feedback: int  # explanations with at least one vote
    votes: int
    positives: int
    stars_sum: int
    stars_n: int
    cost_usd: float  # sum
    latency_ms: float  # sum


@dataclass(frozen=True)
class Figures:
    explanations: int
    with_feedback: int
    votes: int
    positives: int
    negatives: int
    rated_votes: int
    feedback_rate: float | None
    positive_rate: float | None
    positive_rate_ci: tuple[float, float] | None  # Wilson 95%
    avg_rating: float | None
    cost_usd_total: float
    cost_per_explanation: float | None
    avg_latency_ms: float | None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["positive_rate_ci"] = list(self.positive_rate_ci) if self.positive_rate_ci else None
        return d


@dataclass
class _Tally:
    explanations: int = 0
    with_feedback: int = 0
    votes: int = 0
    positives: int = 0
    stars_sum: int = 0
    stars_n: int = 0
    cost: float = 0.0
    latency: float = 0.0

    def add(self, c: Cell) -> None:
        self.explanations += c.explanations
        self.with_feedback += c.with_feedback
        self.votes += c.votes
        self.positives += c.positives
        self.stars_sum += c.stars_sum
        self.stars_n += c.stars_n
        self.cost += c.cost_usd
        self.latency += c.latency_ms

    def figures(self) -> Figures:
        return Figures(
            explanations=self.explanations,
            with_feedback=self.with_feedback,
            votes=self.votes,
            positives=self.positives,
            negatives=self.votes - self.positives,
            rated_votes=self.stars_n,
            feedback_rate=_ratio(self.with_feedback, self.explanations),
            positive_rate=_ratio(self.positives, self.votes),
            positive_rate_ci=wilson_interval(self.positives, self.votes),
            avg_rating=_ratio(self.stars_sum, self.stars_n),
            cost_usd_total=round(self.cost, 10),
            cost_per_explanation=_ratio(self.cost, self.explanations),
            avg_latency_ms=_ratio(self.latency, self.explanations),
        )


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def figures(cells: Iterable[Cell]) -> Figures:
    tally = _Tally()
    for c in cells:
        tally.add(c)
    return tally.figures()


def group(cells: Iterable[Cell], key: Callable[[Cell], Hashable]) -> dict[Any, Figures]:
    """Figures per key, in order of first appearance."""
    tallies: dict[Any, _Tally] = {}
    for c in cells:
        tallies.setdefault(key(c), _Tally()).add(c)
    return {k: t.figures() for k, t in tallies.items()}


def daily(cells: list[Cell], until: date) -> list[dict[str, Any]]:
    """One row per day from the first day with data to `until` (or the last day with data, if later), with
    empty days as zeros, so the learning curve has a point for every day."""
    by_day = group(cells, lambda c: c.day)
    if not by_day:
        return []
    start = min(date.fromisoformat(d) for d in by_day)
    until = max(until, max(date.fromisoformat(d) for d in by_day))
    rows: list[dict[str, Any]] = []
    empty = _Tally().figures()
    day = start
    while day <= until:
        key = day.isoformat()
        rows.append({"day": key, **by_day.get(key, empty).as_dict()})
        day += timedelta(days=1)
    return rows


#: How long one point of the learning curve may span, shortest first (5 min ... 30 days).
CURVE_WIDTHS_S = (
    300,
    900,
    1800,
    3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    86400,
    2 * 86400,
    7 * 86400,
    14 * 86400,
    30 * 86400,
)
CURVE_MAX_POINTS = 48


def curve_width(first: datetime | None, now: datetime, max_points: int = CURVE_MAX_POINTS) -> int:
    """The shortest width in `CURVE_WIDTHS_S` that keeps the curve from the first explanation with a vote to
    `now` at `max_points` points or fewer: minutes on a first hour, hours on a first day, days later on.
    Points are aligned to multiples of the width since the epoch, so a span of s seconds touches at most
    floor(s / width) + 2 of them."""
    span = 0.0 if first is None else max(0.0, (as_utc(now) - as_utc(first)).total_seconds())
    for width in CURVE_WIDTHS_S:
        if span / width + 2 <= max_points:
            return width
    return CURVE_WIDTHS_S[-1]


def learning_curve(buckets: Iterable[tuple[int, int, int, int]], width_s: int | None, now: datetime) -> dict[str, Any]:
    """The learning curve: the positive rate per time window of `width_s` seconds, with its Wilson 95%
    interval, from rows (window index since the epoch, explanations, votes, positives). As everywhere on the
    dashboard, a vote counts at its explanation's creation time (the quality of what was produced then).
    Windows without votes have no rate (a gap, not a zero)."""
    points = []
    for index, n_explanations, votes, positives in sorted(buckets):
        assert width_s is not None
        start = datetime.fromtimestamp(index * width_s, UTC)
        ci = wilson_interval(positives, votes)
        points.append(
            {
                "start": start.isoformat(),
                "end": (start + timedelta(seconds=width_s)).isoformat(),
                "explanations": n_explanations,
                "votes": votes,
                "positives": positives,
                "positive_rate": _ratio(positives, votes),
                "positive_rate_ci": list(ci) if ci else None,
            }
        )
    return {"bucket_s": width_s, "until": as_utc(now).isoformat(), "points": points}


def ticker_league(cells: list[Cell], *, min_votes: int, n: int) -> dict[str, Any]:
    """Top and bottom `n` tickers by positive rate, among tickers with at least `min_votes` votes (fewer
    votes say too little to rank). Ties are broken by more votes first."""
    eligible = [
        {"ticker": t, **f.as_dict()}
        for t, f in group(cells, lambda c: c.ticker).items()
        if f.votes >= max(1, min_votes) and f.positive_rate is not None
    ]
    top = sorted(eligible, key=lambda r: (-r["positive_rate"], -r["votes"], r["ticker"]))[:n]
    bottom = sorted(eligible, key=lambda r: (r["positive_rate"], -r["votes"], r["ticker"]))[:n]
    return {"min_votes": min_votes, "eligible": len(eligible), "top": top, "bottom": bottom}


def heatmap(cells: list[Cell], *, max_tickers: int) -> dict[str, Any]:
    """Signal x ticker positive rate, for the tickers with the most votes."""
    per_ticker = group(cells, lambda c: c.ticker)
    tickers = sorted(per_ticker, key=lambda t: (-per_ticker[t].votes, t))[:max_tickers]
    wanted = set(tickers)
    grid = group((c for c in cells if c.ticker in wanted), lambda c: (c.signal, c.ticker))
    signals = [s for s in ("BUY", "SELL", "HOLD") if any(k[0] == s for k in grid)]
    out_cells = [
        {"signal": s, "ticker": t, "votes": f.votes, "positive_rate": f.positive_rate, "explanations": f.explanations}
        for (s, t), f in sorted(grid.items())
    ]
    return {"signals": signals, "tickers": tickers, "cells": out_cells}


def cost_vs_quality(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per model and prompt version: what an explanation costs against how well it is received."""
    rows = []
    for (model, name, version), f in group(cells, lambda c: (c.model, c.prompt_name, c.prompt_version)).items():
        rows.append(
            {
                "model": model,
                "prompt_name": name,
                "prompt_version": version,
                "explanations": f.explanations,
                "votes": f.votes,
                "cost_per_explanation": f.cost_per_explanation,
                "positive_rate": f.positive_rate,
                "positive_rate_ci": f.as_dict()["positive_rate_ci"],
                "avg_latency_ms": f.avg_latency_ms,
            }
        )
    return sorted(rows, key=lambda r: (r["model"], r["prompt_name"], r["prompt_version"]))


@dataclass(frozen=True)
class ExperimentInfo:
    experiment_id: str
    prompt_name: str | None = None
    status: str = "unknown"  # running | concluded | unknown (votes seen, start event not yet)
    decision: str | None = None
    winner_arm_id: str | None = None
    reason: str = ""
    allocation: str | None = None
    started_at: str | None = None
    concluded_at: str | None = None
    arms: list[dict[str, Any]] = field(default_factory=list)  # arm_id, prompt_version, model, weight, is_control


def experiments(cells: list[Cell], infos: list[ExperimentInfo]) -> list[dict[str, Any]]:
    """Per experiment arm: the figures, a Wilson interval, lift and probability to beat the control."""
    by_arm = group((c for c in cells if c.experiment_id), lambda c: (c.experiment_id, c.arm_id))
    known = {i.experiment_id: i for i in infos}
    for exp_id, _ in by_arm:
        known.setdefault(str(exp_id), ExperimentInfo(experiment_id=str(exp_id)))
    out = []
    for info in known.values():
        specs = {a["arm_id"]: a for a in info.arms}
        arm_ids = list(specs) + sorted(
            {str(a) for (e, a) in by_arm if e == info.experiment_id and a is not None} - set(specs)
        )
        control_id = next((a for a, s in specs.items() if s.get("is_control")), arm_ids[0] if arm_ids else None)
        empty = _Tally().figures()
        control = by_arm.get((info.experiment_id, control_id), empty)
        arms = []
        for arm_id in arm_ids:
            f = by_arm.get((info.experiment_id, arm_id), empty)
            spec = specs.get(arm_id, {})
            is_control = arm_id == control_id
            lift = None
            if not is_control and f.positive_rate is not None and control.positive_rate:
                lift = f.positive_rate / control.positive_rate - 1
            arms.append(
                {
                    "arm_id": arm_id,
                    "prompt_version": spec.get("prompt_version"),
                    "model": spec.get("model"),
                    "weight": spec.get("weight"),
                    "is_control": is_control,
                    **f.as_dict(),
                    "lift": lift,
                    "prob_beats_control": None
                    if is_control
                    else prob_beats((f.positives, f.votes), (control.positives, control.votes)),
                }
            )
        row = asdict(info)
        row["arms"] = arms
        out.append(row)
    return sorted(out, key=lambda r: (r["status"] != "running", r["started_at"] or "", r["experiment_id"]))


# ---------------------------------------------------------------------------------------------------------
# Anomalies
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnomalyCheck:
    scope: str
    status: str  # "ANOMALY" | "OK" | "INSUFFICIENT_SAMPLES"
    recent_votes: int
    recent_positives: int
    baseline_votes: int
    baseline_positives: int
    recent_rate: float | None
    baseline_rate: float | None
    p_value: float | None

    def message(self) -> str:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        return (
            f"{self.scope}: positive rate fell to {pct(self.recent_rate)} ({self.recent_votes} votes) from "
            f"{pct(self.baseline_rate)} ({self.baseline_votes} votes) before; p={self.p_value:.2g}"
            if self.p_value is not None
            else f"{self.scope}: {self.status}"
        )


def check_anomaly(
    scope: str,
    recent: tuple[int, int],
    baseline: tuple[int, int],
    *,
    alpha: float,
    min_votes: int,
    min_drop: float,
) -> AnomalyCheck:
    """Is the recent window's positive rate significantly (one-sided z-test at `alpha`) and materially (at
    least `min_drop` lower) below the baseline's? Each side needs `min_votes` votes to be judged.
    `recent` and `baseline` are (positives, votes)."""
    (xr, nr), (xb, nb) = recent, baseline
    rr, rb = _ratio(xr, nr), _ratio(xb, nb)
    p = one_sided_below_p(recent, baseline)
    if nr < min_votes or nb < min_votes:
        status = "INSUFFICIENT_SAMPLES"
    elif rr is not None and rb is not None and p is not None and p < alpha and rb - rr >= min_drop:
        status = "ANOMALY"
    else:
        status = "OK"
    return AnomalyCheck(scope, status, nr, xr, nb, xb, rr, rb, p)


def window_bucket(now: datetime, window_s: float) -> int:
    """Which window `now` falls in: alerts are raised at most once per scope and window."""
    return int(as_utc(now).timestamp() // window_s)
