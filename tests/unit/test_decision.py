"""Decision rules of services.optimizer.stats.decision.decide and the Thompson allocation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.optimizer.stats import decision
from services.optimizer.stats.analysis import analyze
from services.optimizer.stats.bayesian import many_to_one_control_share, thompson_weights
from services.optimizer.stats.decision import Decision, DecisionConfig
from services.optimizer.stats.results import ArmData
from tests.unit.arm_results import arm

DAY = 86400.0
LATE = 30 * DAY


def decide(arms: list[ArmData], config: DecisionConfig | None = None, elapsed_s: float = LATE) -> Decision:
    weights = {a.arm_id: float(a.exposures) for a in arms}  # intended split = observed (no SRM here)
    analysis = analyze(arms, "control", weights, alpha=0.05)
    return decision.decide(analysis, config or DecisionConfig(), elapsed_s=elapsed_s)


def test_clear_winner_ships() -> None:
    d = decide([arm("control", 3000, 1500), arm("t1", 3000, 1800), arm("t2", 3000, 1490)])
    assert (d.status, d.arm_id) == ("ship", "t1")
    assert "t1" in d.reason and "guardrails hold" in d.reason


def test_no_difference_keeps_collecting() -> None:
    d = decide([arm("control", 1000, 500), arm("t1", 1000, 505)])
    assert d.status == "collecting"


def test_minimum_duration_gates_a_clear_winner() -> None:
    d = decide([arm("control", 3000, 1500), arm("t1", 3000, 1800)], elapsed_s=6 * DAY)
    assert d.status == "collecting" and "minimum duration" in d.reason


def test_minimum_feedback_per_arm_gates_a_clear_winner() -> None:
    d = decide([arm("control", 90, 20), arm("t1", 90, 80)])
    assert d.status == "collecting" and "minimum feedback" in d.reason


def test_sample_ratio_mismatch_is_unhealthy_even_before_minimum_duration() -> None:
    arms = [ArmData("control", 10000, 1000, 500), ArmData("t1", 11000, 1000, 500)]
    analysis = analyze(arms, "control", {"control": 0.5, "t1": 0.5})
    d = decision.decide(analysis, DecisionConfig(), elapsed_s=0)
    assert d.status == "unhealthy" and "sample ratio mismatch" in d.reason


def test_all_treatments_significantly_worse_keeps_control() -> None:
    d = decide([arm("control", 3000, 1800), arm("t1", 3000, 1500), arm("t2", 3000, 1450)])
    assert (d.status, d.arm_id) == ("keep_control", "control")


def test_sample_cap_without_winner_is_inconclusive() -> None:
    d = decide([arm("control", 1000, 500), arm("t1", 1000, 505)], DecisionConfig(max_feedback_per_arm=1000))
    assert d.status == "inconclusive"


def test_cost_guardrail_blocks_ship() -> None:
    arms = [arm("control", 3000, 1500), arm("t1", 3000, 1800, cost=0.01), arm("t2", 1000, 500)]
    d = decide(arms)
    assert d.status != "ship" and "cost" in d.reason


def test_latency_guardrail_blocks_ship() -> None:
    d = decide([arm("control", 3000, 1500), arm("t1", 3000, 1800, latency=5000.0), arm("t2", 1000, 500)])
    assert d.status != "ship" and "latency" in d.reason


def test_feedback_rate_guardrail_holds_the_winner_back_until_the_cap() -> None:
    # votes per explanation is an estimate that moves as votes arrive: under the floor the winner waits (never a
    # final keep-control) and the round ends inconclusive at the cap if it stays there
    low = ArmData("t1", 20000, 3000, 1800, cost_usd_sum=20.0, latency_ms_sum=1e7)
    d = decide([arm("control", 3000, 1500), low, arm("t2", 1000, 500)])
    assert d.status == "collecting" and "t1 wins but waits on the feedback-rate guardrail: feedback rate" in d.reason
    d = decide([arm("control", 3000, 1500), low, arm("t2", 1000, 500)], DecisionConfig(max_feedback_per_arm=3000))
    assert d.status == "inconclusive" and "waits on the feedback-rate guardrail" in d.reason


def test_star_guardrail_blocks_ship_when_stars_are_significantly_worse() -> None:
    control = arm("control", 3000, 1500, star_n=2000, star_sum=8000.0, star_sumsq=33000.0)
    worse = arm("t1", 3000, 1800, star_n=2000, star_sum=6000.0, star_sumsq=19000.0)
    d = decide([control, worse, arm("t2", 1000, 500)])
    assert d.status != "ship" and "star mean" in d.reason


def test_guardrail_blocked_only_winner_keeps_control_when_others_are_worse() -> None:
    d = decide([arm("control", 3000, 1500), arm("t1", 3000, 1800, cost=0.01)])
    assert (d.status, d.arm_id) == ("keep_control", "control")


def test_disabled_guardrail_lets_the_winner_ship() -> None:
    cfg = DecisionConfig(max_cost_ratio=None)
    d = decide([arm("control", 3000, 1500), arm("t1", 3000, 1800, cost=0.01)], cfg)
    assert (d.status, d.arm_id) == ("ship", "t1")


def test_tie_between_winners_goes_to_the_cheaper_arm() -> None:
    arms = [arm("control", 3000, 1500), arm("t1", 3000, 1800, cost=0.0012), arm("t2", 3000, 1800, cost=0.0011)]
    d = decide(arms)
    assert (d.status, d.arm_id) == ("ship", "t2") and "cheaper" in d.reason


def test_highest_probability_to_be_best_wins_when_not_tied() -> None:
    arms = [arm("control", 3000, 1500), arm("t1", 3000, 1950, cost=0.0012), arm("t2", 3000, 1800, cost=0.0011)]
    assert decide(arms).arm_id == "t1"


def test_min_lift_to_ship_blocks_a_small_significant_lift() -> None:
    arms = [arm("control", 20000, 10000), arm("t1", 20000, 10600)]  # +6% relative, clearly significant
    assert decide(arms).status == "ship"
    d = decide(arms, DecisionConfig(min_lift_to_ship=0.10))
    assert d.status != "ship" and "below" in d.reason


def test_avg_stars_metric_decides_on_stars() -> None:
    control = arm("control", 3000, 1500, star_n=2000, star_sum=7000.0, star_sumsq=26000.0)
    better = arm("t1", 3000, 1500, star_n=2000, star_sum=8000.0, star_sumsq=34000.0)
    analysis = analyze([control, better], "control", {"control": 1, "t1": 1}, metric="avg_stars")
    d = decision.decide(analysis, DecisionConfig(metric="avg_stars"), elapsed_s=LATE)
    assert (d.status, d.arm_id) == ("ship", "t1")


def test_thompson_weights_unchanged_until_every_arm_has_minimum_feedback() -> None:
    arms = [arm("control", 500, 250), arm("t1", 99, 90)]
    assert thompson_weights(arms) == {"control": 0.5, "t1": 0.5}
    current = {"control": 0.7, "t1": 0.3}
    assert thompson_weights(arms, current=current) == pytest.approx(current)


def test_thompson_weights_favour_the_leader_keep_the_floor_and_sum_to_one() -> None:
    arms = [arm("control", 2000, 1000), arm("t1", 2000, 1300), arm("t2", 2000, 900), arm("t3", 2000, 950)]
    w = thompson_weights(arms, floor=0.01)
    assert sum(w.values()) == pytest.approx(1.0)
    assert min(w.values()) >= 0.01 - 1e-12
    assert max(w, key=w.__getitem__) == "t1"
    assert w["t1"] == pytest.approx(0.5, abs=0.02)  # top-two: the sure leader gets beta = 0.5


def test_thompson_weights_with_control_keep_half_on_control() -> None:
    arms = [arm("control", 2000, 1000), arm("t1", 2000, 1300), arm("t2", 2000, 900), arm("t3", 2000, 950)]
    w = thompson_weights(arms, control_id="control", floor=0.01)
    assert w["control"] == pytest.approx(0.5 * 0.96 + 0.01)
    assert w["t1"] == pytest.approx(0.5 * 0.96 + 0.01, abs=1e-3)


def test_thompson_weights_control_share_is_kept_and_the_rest_follows_thompson() -> None:
    arms = [arm("control", 2000, 1000), arm("t1", 2000, 1300), arm("t2", 2000, 900), arm("t3", 2000, 950)]
    share = many_to_one_control_share(3)
    w = thompson_weights(arms, control_id="control", floor=0.01, control_share=share)
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["control"] == pytest.approx(0.01 + 0.96 * share)  # the floor mixes with the uniform
    assert w["t1"] == pytest.approx(0.01 + 0.96 * (1 - share), abs=1e-3)  # the sure leader takes the rest
    assert w["t2"] == pytest.approx(0.01, abs=1e-3)


def test_thompson_weights_treatment_beta_keeps_a_challenger_among_treatments() -> None:
    arms = [arm("control", 2000, 1000), arm("t1", 2000, 1300), arm("t2", 2000, 900), arm("t3", 2000, 950)]
    w = thompson_weights(arms, control_id="control", floor=0.0, treatment_beta=0.5)
    assert w["control"] == pytest.approx(0.5)
    assert w["t1"] == pytest.approx(0.25, abs=1e-3)  # leader: beta of the treatments' half
    assert w["t2"] + w["t3"] == pytest.approx(0.25, abs=1e-3)  # the challengers share the rest


def test_thompson_weights_are_deterministic_for_a_seed() -> None:
    arms = [arm("control", 300, 150), arm("t1", 300, 160), arm("t2", 300, 155)]
    assert thompson_weights(arms, seed=3) == thompson_weights(arms, seed=3)


def test_decision_config_is_frozen() -> None:
    cfg = DecisionConfig()
    assert replace(cfg, alpha=0.01).alpha == 0.01
    with pytest.raises(AttributeError):
        cfg.alpha = 0.1  # type: ignore[misc]
