"""The optimizer's pure rules: experiment validation, version numbering, variant guardrails, allocation."""

from __future__ import annotations

import pytest

from services.optimizer import domain
from services.optimizer.domain import ArmIn, ExperimentSpec, InvalidRequest
from shared.prompts import SEED_TEMPLATE

VERSIONS = {"v1.0": "active", "v1.1": "candidate", "v1.2": "candidate", "v0.9": "archived"}
M = "offline/template-v1"


def spec(*arms: ArmIn, **kw: object) -> ExperimentSpec:
    return ExperimentSpec(prompt_name="explain_signal", arms=arms, **kw)  # type: ignore[arg-type]


def test_control_comes_first_and_arms_get_stable_ids() -> None:
    planned = domain.plan_arms(spec(ArmIn("v1.1", M, 0.5), ArmIn("v1.0", M, 0.5, True)), VERSIONS)
    assert [(a.arm_id, a.prompt_version, a.is_control) for a in planned] == [
        ("control", "v1.0", True),
        ("t1", "v1.1", False),
    ]


def test_weights_left_out_split_traffic_equally() -> None:
    planned = domain.plan_arms(spec(ArmIn("v1.0", M, is_control=True), ArmIn("v1.1", M), ArmIn("v1.2", M)), VERSIONS)
    assert [round(a.weight, 6) for a in planned] == [round(1 / 3, 6)] * 3


@pytest.mark.parametrize(
    ("arms", "kw", "message"),
    [
        ((ArmIn("v1.0", M, 0.6, True), ArmIn("v1.1", M, 0.6)), {}, "weights must sum to 1"),
        ((ArmIn("v1.0", M, 1.0, True),), {}, "at least two arms"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v9.9", M, 0.5)), {}, "unknown prompt version v9.9"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5, True)), {}, "exactly one arm must be the control"),
        ((ArmIn("v1.0", M, 0.5), ArmIn("v1.1", M, 0.5)), {}, "exactly one arm must be the control"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.0", M, 0.5)), {}, "duplicate arm"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v0.9", M, 0.5)), {}, "archived"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M)), {}, "for every arm, or for none"),
        ((ArmIn("v1.0", M, 1.5, True), ArmIn("v1.1", M, -0.5)), {}, "in (0, 1]"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"min_duration_s": -1}, "min_duration_s"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"metric": "clicks"}, "metric"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"allocation": "random"}, "allocation"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"min_feedback_per_arm": 0}, "min_feedback"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"min_duration_s": 1e300}, "min_duration_s"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"max_feedback_per_arm": 10**30}, "at most"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"max_cost_ratio": float("inf")}, "max_cost_ratio"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"max_latency_ratio": float("nan")}, "latency"),
        ((ArmIn("v1.0", M, 0.5, True), ArmIn("v1.1", M, 0.5)), {"target_lift": float("inf")}, "target_lift"),
    ],
)
def test_bad_experiments_are_refused_with_a_reason(arms: tuple[ArmIn, ...], kw: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        domain.plan_arms(spec(*arms, **kw), VERSIONS)


def test_same_prompt_with_two_models_is_two_arms() -> None:
    planned = domain.plan_arms(spec(ArmIn("v1.0", M, 0.5, True), ArmIn("v1.0", "local/ft-1", 0.5)), VERSIONS)
    assert [a.model for a in planned] == [M, "local/ft-1"]


def test_next_version_continues_the_parents_major_line() -> None:
    assert domain.next_version(["v1.0"], "v1.0") == "v1.1"
    assert domain.next_version(["v1.0", "v1.1", "v1.2"], "v1.1") == "v1.3"
    assert domain.next_version(["v1.0", "v2.0", "v2.4"], "v2.0") == "v2.5"
    assert domain.next_version([], None) == "v1.0"


def test_variant_that_drops_a_placeholder_is_rejected() -> None:
    template = SEED_TEMPLATE.replace("{indicators}", "the indicators")
    problem = domain.variant_problem(template, [], min_chars=10, max_chars=4000, duplicate_ratio=0.9)
    assert problem is not None and "indicators" in problem


def test_variant_over_the_length_limit_is_rejected() -> None:
    template = SEED_TEMPLATE + " Be thorough." * 100
    problem = domain.variant_problem(template, [], min_chars=10, max_chars=1000, duplicate_ratio=0.9)
    assert problem is not None and "over the limit" in problem


def test_near_duplicate_of_an_existing_version_is_rejected() -> None:
    template = SEED_TEMPLATE.replace("3-4 sentences", "3 or 4 sentences")
    problem = domain.variant_problem(template, [SEED_TEMPLATE], min_chars=10, max_chars=4000, duplicate_ratio=0.9)
    assert problem is not None and "near-duplicate" in problem


def test_distinct_valid_variant_passes() -> None:
    template = "Ticker {ticker}, signal {signal}.\n{indicators}\nList the three strongest reasons as bullet points."
    assert domain.variant_problem(template, [SEED_TEMPLATE], min_chars=10, max_chars=4000, duplicate_ratio=0.9) is None


def test_allocation_history_averages_weights_over_exposures() -> None:
    history = domain.AllocationHistory([(0, {"a": 0.5, "b": 0.5}), (100, {"a": 0.9, "b": 0.1})])
    avg = history.average(200)
    assert avg == pytest.approx({"a": 0.7, "b": 0.3})
    assert history.average(0) == {"a": 0.9, "b": 0.1}


def test_weights_changed_ignores_tiny_moves() -> None:
    assert not domain.weights_changed({"a": 0.5, "b": 0.5}, {"a": 0.501, "b": 0.499})
    assert domain.weights_changed({"a": 0.5, "b": 0.5}, {"a": 0.7, "b": 0.3})
