"""The ship guardrails one at a time, at their boundaries: a ratio exactly at the limit passes and one just over
fails; against a free or instant control the absolute limits apply; each failure says which guardrail and the
other metric's name."""

from __future__ import annotations

import pytest

from services.optimizer.stats.decision import DecisionConfig, guardrail_failures
from services.optimizer.stats.results import Analysis, ArmResult
from tests.unit.arm_results import arm_result


def _fails(arm: ArmResult, control: ArmResult | None = None, **config: object) -> list[str]:
    analysis = Analysis(
        status="OK",
        metric="positive_rate",
        control_id="control",
        arms=(control or arm_result("control"), arm),
        srm_p_value=0.5,
        srm_flag=False,
        alpha=0.05,
    )
    return guardrail_failures(analysis, arm.arm_id, DecisionConfig(**config))  # type: ignore[arg-type]


def test_an_arm_like_the_control_passes_every_guardrail() -> None:
    assert _fails(arm_result("t1")) == []
    assert (
        guardrail_failures(
            Analysis("OK", "positive_rate", "control", (arm_result("t1"),), 0.5, False, 0.05), "t1", DecisionConfig()
        )
        == []
    )  # no control: nothing to compare


@pytest.mark.parametrize(("metric", "name"), [("positive_rate", "star mean"), ("avg_stars", "positive rate")])
def test_a_significantly_worse_secondary_metric_blocks_and_is_named(metric: str, name: str) -> None:
    (fail,) = _fails(arm_result("t1", secondary_significantly_worse=True), metric=metric)
    assert fail == f"{name} significantly worse than control"


def test_feedback_rate_ratio_below_the_floor_blocks_and_at_it_does_not() -> None:
    assert _fails(arm_result("t1", feedback_rate=0.4)) == []  # 0.8x: at the floor
    (fail,) = _fails(arm_result("t1", feedback_rate=0.39))
    assert fail.startswith("feedback rate 0.78x control")
    assert _fails(arm_result("t1", feedback_rate=0.1), min_feedback_rate_ratio=None) == []
    assert _fails(arm_result("t1", feedback_rate=0.1), arm_result("control", feedback_rate=0.0)) == []


def test_cost_ratio_over_the_limit_blocks_and_at_it_does_not() -> None:
    assert _fails(arm_result("t1", cost_per_explanation=0.003)) == []  # 1.5x
    (fail,) = _fails(arm_result("t1", cost_per_explanation=0.0031))
    assert fail.startswith("cost 1.55x control")
    assert _fails(arm_result("t1", cost_per_explanation=1.0), max_cost_ratio=None) == []


def test_against_a_free_control_the_absolute_cost_limit_applies() -> None:
    free = arm_result("control", cost_per_explanation=0.0)
    assert _fails(arm_result("t1", cost_per_explanation=0.001), free) == []  # exactly +$0.001
    (fail,) = _fails(arm_result("t1", cost_per_explanation=0.0011), free)
    assert fail.startswith("cost $0.0011 per explanation against a $0 control")
    assert _fails(arm_result("t1", cost_per_explanation=5.0), free, max_cost_increase_usd=None) == []


def test_latency_ratio_over_the_limit_blocks_and_at_it_does_not() -> None:
    assert _fails(arm_result("t1", latency_ms_mean=2000.0)) == []  # 2x
    (fail,) = _fails(arm_result("t1", latency_ms_mean=2100.0))
    assert fail.startswith("latency 2.10x control")


def test_against_an_instant_control_the_absolute_latency_limit_applies() -> None:
    instant = arm_result("control", latency_ms_mean=0.0)
    assert _fails(arm_result("t1", latency_ms_mean=2000.0), instant) == []
    (fail,) = _fails(arm_result("t1", latency_ms_mean=2001.0), instant)
    assert fail.startswith("latency 2001 ms against a 0 ms control")


def test_fallback_rate_increase_over_the_limit_blocks() -> None:
    control = arm_result("control", fallback_rate=0.05)
    assert _fails(arm_result("t1", fallback_rate=0.10), control) == []  # exactly +5 points
    (fail,) = _fails(arm_result("t1", fallback_rate=0.11), control)
    assert fail.startswith("fallback rate 11.0% vs control 5.0%")
    assert _fails(arm_result("t1", fallback_rate=0.06), arm_result("control", fallback_rate=None)) == [
        *_fails(arm_result("t1", fallback_rate=0.06), arm_result("control", fallback_rate=0.0))
    ]
    (fail,) = _fails(arm_result("t1", fallback_rate=0.06), arm_result("control", fallback_rate=None))
    assert "vs control 0.0%" in fail


def test_several_failures_are_all_reported() -> None:
    fails = _fails(
        arm_result("t1", cost_per_explanation=1.0, latency_ms_mean=9000.0, secondary_significantly_worse=True)
    )
    assert len(fails) == 3
