"""Arms for the decision tests: `arm`, the counts an analysis starts from, and `arm_result`, an `ArmResult` with every
figure the guardrails read set like the control's (500 votes at rate 0.5, $0.002 and 1 s per explanation, no
fallbacks) and the rest empty; tests change what they look at."""

from __future__ import annotations

from dataclasses import replace

from services.optimizer.stats.results import ArmData, ArmResult


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


def arm_result(arm_id: str, **changes: object) -> ArmResult:
    base = ArmResult(
        arm_id=arm_id,
        is_control=arm_id == "control",
        exposures=1000,
        n=500,
        positives=250,
        rate=0.5,
        rate_ci=(0.45, 0.55),
        star_mean=4.0,
        feedback_rate=0.5,
        cost_per_explanation=0.002,
        latency_ms_mean=1000.0,
        lift=None,
        lift_ci_sequential=None,
        lift_ci_fixed=None,
        p_value_sequential=None,
        p_value_fixed=None,
        prob_beat_control=None,
        prob_best=None,
        expected_loss=None,
        power=None,
        samples_needed_per_arm=None,
        days_to_decision=None,
        metric_n=500,
        fallback_rate=0.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]
