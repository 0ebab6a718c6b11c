"""Arms for the statistics and decision tests: `arm`, the counts an analysis starts from; `equal_weights`, the
same share of traffic for each; `arm_of`, an arm's result in an analysis; and `arm_result`, an `ArmResult` with
every figure the guardrails read set like the control's (`LIKE_CONTROL`) and the rest empty; tests change what
they look at."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, fields

from services.optimizer.stats.results import Analysis, ArmData, ArmResult

# What the guardrails read, as the control has it: 500 votes at rate 0.5 over 1000 explanations, $0.002 and 1 s
# per explanation, no fallbacks.
LIKE_CONTROL: dict[str, object] = {
    "exposures": 1000,
    "n": 500,
    "metric_n": 500,
    "positives": 250,
    "rate": 0.5,
    "rate_ci": (0.45, 0.55),
    "star_mean": 4.0,
    "feedback_rate": 0.5,
    "cost_per_explanation": 0.002,
    "latency_ms_mean": 1000.0,
    "fallback_rate": 0.0,
}


def arm(arm_id: str, n: int, positives: int, *, cost: float = 0.001, latency: float = 500.0, **kw: float) -> ArmData:
    """n votes, `positives` of them up, over twice as many exposures at `cost` and `latency` each; `kw` sets
    other counts (stars, sessions)."""
    exposures = 2 * n
    return ArmData(
        arm_id=arm_id,
        exposures=exposures,
        n=n,
        positives=positives,
        cost_usd_sum=cost * exposures,
        latency_ms_sum=latency * exposures,
        **kw,  # type: ignore[arg-type]
    )


def equal_weights(arms: Sequence[ArmData]) -> dict[str, float]:
    """The `weights` of `analyze` that give every arm the same share."""
    return {a.arm_id: 1 / len(arms) for a in arms}


def arm_of(analysis: Analysis, arm_id: str) -> ArmResult:
    """The result of `arm_id` in `analysis`, which must have it."""
    found = analysis.arm(arm_id)
    assert found is not None
    return found


def arm_result(arm_id: str, **changes: object) -> ArmResult:
    """`LIKE_CONTROL` with `changes`; every other figure without a default (those only an analysis gives: the
    lift, its intervals and p-values, the probabilities, power, samples and days) None."""
    empty = {f.name: None for f in fields(ArmResult) if f.default is MISSING}
    figures = {**empty, "arm_id": arm_id, "is_control": arm_id == "control", **LIKE_CONTROL, **changes}
    return ArmResult(**figures)  # type: ignore[arg-type]
