"""`decide` at its boundaries and in its less common shapes: exactly the minimum duration and feedback, no
treatment at all, a winner blocked next to a loser, the reasons it gives (they are what an operator reads)."""

from __future__ import annotations

from dataclasses import replace

from services.optimizer.stats.analysis import analyze
from services.optimizer.stats.decision import DecisionConfig, decide
from services.optimizer.stats.results import Analysis, ArmData
from tests.unit.arm_results import arm

DAY = 86400.0
LATE = 30 * DAY


def analysis(arms: list[ArmData]) -> Analysis:
    return analyze(arms, "control", {a.arm_id: float(a.exposures) for a in arms}, alpha=0.05)


def test_exactly_the_minimum_duration_and_feedback_are_enough() -> None:
    a = analysis([arm("control", 3000, 1500), arm("t1", 3000, 1800)])
    config = DecisionConfig(min_duration_s=7 * DAY, min_feedback_per_arm=3000)
    assert decide(a, config, elapsed_s=7 * DAY).status == "ship"
    assert decide(a, replace(config, min_feedback_per_arm=3001), elapsed_s=7 * DAY).status == "collecting"


def test_without_a_treatment_there_is_nothing_to_compare() -> None:
    a = analysis([arm("control", 3000, 1500)])
    d = decide(a, DecisionConfig(), elapsed_s=LATE)
    assert (d.status, d.arm_id) == ("collecting", None)
    assert d.reason == "nothing to compare: need a control and at least one treatment"


def test_the_sample_ratio_mismatch_reason_names_the_test_and_its_p_value() -> None:
    arms = [ArmData("control", 10000, 1000, 500), ArmData("t1", 11000, 1000, 500)]
    sequential = analyze(arms, "control", {"control": 0.5, "t1": 0.5})
    d = decide(sequential, DecisionConfig(), elapsed_s=0)
    assert "(anytime-valid p=" in d.reason and "; chi-square p=" in d.reason
    fixed = replace(sequential, srm_sequential=False)
    assert "(chi-square p=" in decide(fixed, DecisionConfig(), elapsed_s=0).reason
    unknown = replace(sequential, srm_p_value=None)
    assert "p=n/a" in decide(unknown, DecisionConfig(), elapsed_s=0).reason


def test_a_winner_blocked_by_a_guardrail_next_to_a_loser_keeps_the_control() -> None:
    arms = [arm("control", 3000, 1500), arm("t1", 3000, 1800, cost=1.0), arm("t2", 3000, 1200)]
    d = decide(analysis(arms), DecisionConfig(), elapsed_s=LATE)
    assert (d.status, d.arm_id) == ("keep_control", "control")
    assert d.reason.startswith("no treatment can ship: t1 wins but is blocked by guardrails: cost")


def test_every_treatment_below_keeps_the_control_and_says_against_what() -> None:
    arms = [arm("control", 3000, 1800), arm("t1", 3000, 1500), arm("t2", 3000, 1450)]
    d = decide(analysis(arms), DecisionConfig(), elapsed_s=LATE)
    assert (d.status, d.arm_id) == ("keep_control", "control")
    assert d.reason == "every treatment's always-valid interval lies below 0 (no change) on positive_rate"


def test_a_cheaper_winner_is_chosen_among_tied_ones_and_the_tie_is_said() -> None:
    arms = [
        arm("control", 3000, 1500, cost=0.002),
        arm("t1", 3000, 1800, cost=0.0025),
        arm("t2", 3000, 1800, cost=0.002),
    ]
    d = decide(analysis(arms), DecisionConfig(tie_tolerance=1.0), elapsed_s=LATE)
    assert (d.status, d.arm_id) == ("ship", "t2")
    assert "tied with 1 other winner(s), chose the cheaper" in d.reason


def test_still_collecting_reports_the_smallest_corrected_p_value() -> None:
    d = decide(analysis([arm("control", 1000, 500), arm("t1", 1000, 530)]), DecisionConfig(), elapsed_s=LATE)
    assert d.status == "collecting"
    assert d.reason.startswith("no interval clears 0 (no change) yet; smallest corrected always-valid p=")
