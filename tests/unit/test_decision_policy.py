"""`decide` on analyses written out by hand, so each interval sits exactly where a rule looks: at the minimum lift,
at the target lift, at 0; several treatments in different states at once (a blocked winner, one below, one
futile, one undecided); winners without a probability to be best or a cost; and the whole reason the API returns
for each outcome (an operator reads it to know why an experiment stopped or goes on)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.optimizer.stats.decision import DecisionConfig, arm_cap, decide, futile_arms, guardrail_failures
from services.optimizer.stats.results import Analysis, ArmResult
from tests.unit.arm_results import arm_result

LATE = 30 * 86400.0
CONFIG = DecisionConfig(min_duration_s=0, min_feedback_per_arm=100)  # target lift 10%: 0.05 on the 0.5 control


def _arm(arm_id: str, ci: tuple[float, float] | None = None, **kw: object) -> ArmResult:
    """An arm with 500 votes at rate 0.5; `ci` the always-valid interval of its difference to the control
    (absolute; its relative form is the same over the control's 0.5)."""
    derived: dict[str, object] = {}
    if ci is not None:
        diff = (ci[0] + ci[1]) / 2
        derived = {"diff": diff, "lift": diff / 0.5, "p_value_sequential": 0.01, "prob_best": 0.5}
        derived["lift_ci_relative"] = (ci[0] / 0.5, ci[1] / 0.5)
        # as `analyze` flags it at the decision's own level: the interval ends below the target (0.05)
        derived["futile"] = ci[1] < 0.05
    return arm_result(arm_id, lift_ci_sequential=ci, **{**derived, **kw})


def _analysis(*treatments: ArmResult, control: ArmResult | None = None, **kw: object) -> Analysis:
    fields: dict[str, object] = {
        "status": "OK",
        "metric": "positive_rate",
        "control_id": "control",
        "arms": (control or _arm("control"), *treatments),
        "srm_p_value": 0.5,
        "srm_flag": False,
        "alpha": 0.05,
    }
    return Analysis(**{**fields, **kw})  # type: ignore[arg-type]


def _decide(analysis: Analysis, **config: object) -> tuple[str, str | None, str]:
    d = decide(analysis, replace(CONFIG, **config), elapsed_s=LATE)  # type: ignore[arg-type]
    return d.status, d.arm_id, d.reason


WINNER = (0.02, 0.10)
BELOW = (-0.10, -0.02)
FUTILE = (-0.02, 0.03)  # above 0 possible, the target 0.05 not
OPEN = (-0.02, 0.08)  # could still reach the target
EXPENSIVE = {"cost_per_explanation": 0.006}  # 3x the control's: over the 1.5x guardrail


# -- the reasons, whole ------------------------------------------------------------------------------------------


def test_a_single_winner_ships_with_its_lift_interval_and_no_tie_note() -> None:
    assert _decide(_analysis(_arm("t1", WINNER, prob_best=0.97, p_value_sequential=0.0123))) == (
        "ship",
        "t1",
        "t1 beats control on positive_rate (lift +12.0%, always-valid interval [+4.0%, +20.0%] above the minimum "
        "lift 0%, Bonferroni over 1 treatment(s), p=0.0123, P(best)=0.97); guardrails hold",
    )


def test_a_winner_without_a_lift_says_so() -> None:
    status, _, reason = _decide(_analysis(_arm("t1", WINNER, lift=None)))
    assert status == "ship" and "(lift n/a, always-valid interval" in reason


def test_two_guardrail_failures_and_two_blocked_winners_are_each_listed() -> None:
    slow_and_expensive = {"cost_per_explanation": 0.006, "latency_ms_mean": 3000.0}
    assert _decide(_analysis(_arm("t1", WINNER, **slow_and_expensive), _arm("t2", WINNER, **EXPENSIVE))) == (
        "keep_control",
        "control",
        "no treatment can ship: t1 wins but is blocked by guardrails: cost 3.00x control (> 1.5x); latency 3.00x "
        "control (> 2x) | t2 wins but is blocked by guardrails: cost 3.00x control (> 1.5x)",
    )


def test_still_collecting_lists_the_blocked_and_the_waiting_winners_in_brackets() -> None:
    analysis = _analysis(
        _arm("t1", WINNER, **EXPENSIVE),
        _arm("t2", WINNER, novelty_flag=True, lift_early=0.2, lift_recent=0.01, novelty_p_value=0.04),
        _arm("t3", OPEN, p_value_sequential=0.2),
    )
    assert _decide(analysis) == (
        "collecting",
        None,
        "no interval clears 0 (no change) yet; smallest corrected always-valid p=0.01 (t1 wins but is blocked by "
        "guardrails: cost 3.00x control (> 1.5x) | t2 wins but its lift fades (novelty check: early +20.0%, recent "
        "+1.0%, p=0.04))",
    )


NO_P_VALUE = _analysis(_arm("t1", OPEN, p_value_sequential=None))
NO_COMPARISON = _analysis(_arm("t1", None), status="INSUFFICIENT_SAMPLES")


@pytest.mark.parametrize(
    ("analysis", "config", "decision"),
    [
        pytest.param(NO_P_VALUE, {}, ("collecting", None, "no interval clears 0 (no change) yet"), id="no-p-value"),
        pytest.param(
            NO_P_VALUE,
            {"min_lift_to_ship": 0.02},
            ("collecting", None, "no interval clears the minimum lift 2% yet"),
            id="no-p-value-under-a-minimum-lift",
        ),
        pytest.param(
            NO_COMPARISON,
            {},
            ("collecting", None, "not enough data to compare arms (INSUFFICIENT_SAMPLES)"),
            id="no-comparison",
        ),
        pytest.param(
            NO_COMPARISON,
            {"max_feedback_per_arm": 500},
            ("inconclusive", None, "sample cap reached without a comparison (INSUFFICIENT_SAMPLES)"),
            id="no-comparison-at-the-cap",
        ),
    ],
)
def test_without_a_p_value_or_a_comparison_the_reason_says_only_what_is_missing(
    analysis: Analysis, config: dict[str, object], decision: tuple[str, None, str]
) -> None:
    assert _decide(analysis, **config) == decision


def test_a_sample_ratio_mismatch_without_a_p_value_says_n_a() -> None:
    analysis = _analysis(_arm("t1", WINNER), status="SRM", srm_p_value=None, srm_flag=True)
    assert _decide(analysis) == (
        "unhealthy",
        None,
        "sample ratio mismatch: sessions do not match the intended split (anytime-valid p=n/a); fix the "
        "assignment before trusting any result",
    )
    chi_square = replace(analysis, srm_sequential=False, srm_p_value=0.0004, srm_unit="exposures")
    assert _decide(chi_square)[2].startswith("sample ratio mismatch: exposures do not match the intended split "
                                             "(chi-square p=0.0004); ")  # fmt: skip


# -- intervals exactly at the bars ---------------------------------------------------------------------------------


def test_an_interval_starting_exactly_at_the_minimum_lift_does_not_ship() -> None:
    # min_lift_to_ship 10% of the 0.5 control: the bar is 0.05; the lower end must lie above it.
    assert _decide(_analysis(_arm("t1", (0.05, 0.20))), min_lift_to_ship=0.10)[0] == "collecting"
    assert _decide(_analysis(_arm("t1", (0.0501, 0.20))), min_lift_to_ship=0.10)[:2] == ("ship", "t1")


def test_an_interval_starting_exactly_at_0_does_not_ship() -> None:
    assert _decide(_analysis(_arm("t1", (0.0, 0.20))))[0] == "collecting"
    assert _decide(_analysis(_arm("t1", (1e-6, 0.20))))[:2] == ("ship", "t1")


def test_an_interval_ending_exactly_at_the_minimum_lift_is_not_below_it() -> None:
    status, _, reason = _decide(_analysis(_arm("t1", (-0.10, 0.05))), min_lift_to_ship=0.10)
    assert status == "collecting" and reason.startswith("no interval clears the minimum lift 10% yet")
    assert _decide(_analysis(_arm("t1", (-0.10, 0.0499))), min_lift_to_ship=0.10)[:2] == ("keep_control", "control")


def test_an_interval_ending_exactly_at_0_is_futile_not_below() -> None:
    assert _decide(_analysis(_arm("t1", (-0.10, 0.0))))[0] == "inconclusive"
    assert _decide(_analysis(_arm("t1", (-0.10, -1e-6))))[:2] == ("keep_control", "control")


def test_futility_follows_the_analysis_flag_not_the_interval_shown() -> None:
    """`analyze` judges futility on the interval at the futility level, which may be narrower than the one shown:
    the decision takes its flag."""
    assert _decide(_analysis(_arm("t1", OPEN, futile=True)))[0] == "inconclusive"
    assert _decide(_analysis(_arm("t1", FUTILE, futile=False)))[0] == "collecting"
    status, _, reason = _decide(_analysis(_arm("t1", OPEN, futile=True)), futility_alpha=0.2)
    assert (
        status == "inconclusive" and "(every always-valid interval at the futility level 0.2 lies below it)" in reason
    )
    assert _decide(_analysis(_arm("t1", OPEN, futile=True)), futility=False)[0] == "collecting"


def test_the_bars_are_0_when_the_control_has_no_mean() -> None:
    control = _arm("control", rate=None)
    assert _decide(_analysis(_arm("t1", (0.01, 0.2)), control=control), min_lift_to_ship=0.5)[:2] == ("ship", "t1")


# -- several treatments at once ------------------------------------------------------------------------------------


def test_blocked_below_and_futile_together_stop_for_futility_and_name_the_blocked_one() -> None:
    analysis = _analysis(_arm("t1", WINNER, **EXPENSIVE), _arm("t2", BELOW), _arm("t3", FUTILE))
    assert _decide(analysis) == (
        "inconclusive",
        None,
        "stopped for futility: no treatment can still reach the target lift 10% (every always-valid interval lies "
        "below it) (t1 wins but is blocked by guardrails: cost 3.00x control (> 1.5x))",
    )
    assert _decide(analysis, futility=False)[0] == "collecting"


def test_a_futile_arm_next_to_an_open_one_keeps_collecting() -> None:
    assert _decide(_analysis(_arm("t1", FUTILE), _arm("t2", OPEN)))[0] == "collecting"
    assert futile_arms(_analysis(_arm("t1", FUTILE, futile=True), _arm("t2", OPEN))) == ["t1"]


def test_a_blocked_winner_next_to_an_open_arm_keeps_collecting() -> None:
    status, _, reason = _decide(_analysis(_arm("t1", WINNER, **EXPENSIVE), _arm("t2", OPEN)))
    assert status == "collecting" and reason.endswith(
        "(t1 wins but is blocked by guardrails: cost 3.00x control (> 1.5x))"
    )


def test_a_blocked_winner_and_arms_below_keep_the_control() -> None:
    assert _decide(_analysis(_arm("t1", WINNER, **EXPENSIVE), _arm("t2", BELOW), _arm("t3", BELOW)))[:2] == (
        "keep_control",
        "control",
    )


def test_a_treatment_without_an_interval_is_skipped_not_the_end_of_the_look() -> None:
    analysis = _analysis(_arm("t1", None, diff=0.01), _arm("t2", WINNER), _arm("t3", WINNER, diff=None))
    assert _decide(analysis)[:2] == ("ship", "t2")


# -- choosing among winners ----------------------------------------------------------------------------------------


def test_among_tied_winners_the_cheaper_ships_even_with_the_lower_probability_to_be_best() -> None:
    analysis = _analysis(
        _arm("t1", WINNER, prob_best=0.50, cost_per_explanation=0.0025),
        _arm("t2", WINNER, prob_best=0.49, cost_per_explanation=0.0020),
    )
    status, arm_id, reason = _decide(analysis, tie_tolerance=0.02)
    assert (status, arm_id) == ("ship", "t2") and reason.endswith("; tied with 1 other winner(s), chose the cheaper")
    assert _decide(analysis, tie_tolerance=0.0)[1] == "t1"
    assert _decide(analysis, tie_tolerance=0.01)[1] == "t2"  # 0.49 >= 0.50 - 0.01: exactly at the tolerance, tied


def test_at_equal_cost_the_higher_probability_to_be_best_ships() -> None:
    analysis = _analysis(_arm("t1", WINNER, prob_best=0.49), _arm("t2", WINNER, prob_best=0.50))
    assert _decide(analysis, tie_tolerance=1.0)[1] == "t2"


def test_a_winner_of_unknown_cost_counts_as_the_dearest() -> None:
    analysis = _analysis(
        _arm("t1", WINNER, prob_best=0.5, cost_per_explanation=None),
        _arm("t2", WINNER, prob_best=0.49, cost_per_explanation=0.0021),
    )
    assert _decide(analysis, tie_tolerance=0.05)[1] == "t2"


def test_a_winner_without_a_probability_to_be_best_counts_as_0() -> None:
    analysis = _analysis(
        _arm("t1", WINNER, prob_best=None, cost_per_explanation=0.001),
        _arm("t2", WINNER, prob_best=0.9, cost_per_explanation=0.002),
    )
    assert _decide(analysis)[1] == "t2"  # t1 is not within the tie tolerance of 0.9, cheaper or not
    same_cost = _analysis(_arm("t1", WINNER, prob_best=None), _arm("t2", WINNER, prob_best=0.3))
    assert _decide(same_cost, tie_tolerance=1.0)[1] == "t2"


# -- guardrails on missing and tiny figures ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["cost_per_explanation", "latency_ms_mean"])
def test_a_missing_cost_or_latency_on_either_side_is_no_failure(field: str) -> None:
    assert guardrail_failures(_analysis(_arm("t1", WINNER, **{field: None})), "t1", CONFIG) == []
    control = _arm("control", **{field: None})
    assert guardrail_failures(_analysis(_arm("t1", WINNER), control=control), "t1", CONFIG) == []


def test_a_sub_millisecond_control_is_compared_by_ratio() -> None:
    control = _arm("control", latency_ms_mean=0.5)
    fails = guardrail_failures(_analysis(_arm("t1", WINNER, latency_ms_mean=2.0), control=control), "t1", CONFIG)
    assert fails == ["latency 4.00x control (> 2x)"]


def test_the_fallback_guardrail_switched_off_ignores_any_fallback_rate() -> None:
    analysis = _analysis(_arm("t1", WINNER, fallback_rate=0.9))
    assert guardrail_failures(analysis, "t1", replace(CONFIG, max_fallback_rate_increase=None)) == []
    assert len(guardrail_failures(analysis, "t1", CONFIG)) == 1


# -- the round's sample budget: what a dropped arm did not spend goes to the arms still served ------------------


def test_with_every_arm_served_the_cap_is_per_arm() -> None:
    arms = [_arm("control"), _arm("t1"), _arm("t2")]
    assert arm_cap(arms, 700) == 700
    assert arm_cap(arms, 700, {"control", "t1", "t2"}) == 700
    assert arm_cap(arms, 700, set()) == 700  # nothing known to be served: the plain cap


def test_a_dropped_arm_leaves_its_unspent_votes_to_the_arms_still_served_in_equal_shares() -> None:
    arms = [_arm("control", metric_n=600), _arm("t1", metric_n=600), _arm("t2", metric_n=300), _arm("t3")]
    # t2 dropped at 300 and t3 at 500 leave 400 + 200 of their 700 each: 300 more for each of the two served
    assert arm_cap(arms, 700, {"control", "t1"}) == 1000
    # an arm dropped past the cap leaves nothing (and takes nothing away)
    over = [_arm("control", metric_n=600), _arm("t1", metric_n=900)]
    assert arm_cap(over, 700, {"control"}) == 700


def test_a_round_that_dropped_an_arm_collects_past_the_per_arm_cap_until_its_budget_is_spent() -> None:
    served = {"control", "t1"}
    dropped = _arm("t2", FUTILE, metric_n=200)
    running = _analysis(_arm("t1", OPEN, metric_n=800), dropped, control=_arm("control", metric_n=800))
    d = decide(running, replace(CONFIG, max_feedback_per_arm=700), elapsed_s=LATE, served=served)
    assert d.status == "collecting"
    # without the served arms known, the per-arm cap ends it as before
    assert _decide(running, max_feedback_per_arm=700)[0] == "inconclusive"
    spent = _analysis(_arm("t1", OPEN, metric_n=950), dropped, control=_arm("control", metric_n=900))
    d = decide(spent, replace(CONFIG, max_feedback_per_arm=700), elapsed_s=LATE, served=served)
    assert (d.status, d.reason) == (
        "inconclusive",
        "sample cap of 700 per arm (950 for each arm still served, with what the dropped arms left) reached "
        "without a winner",
    )


def test_an_arm_dropped_before_its_minimum_feedback_does_not_hold_the_round_back() -> None:
    analysis = _analysis(_arm("t1", WINNER, prob_best=0.9), _arm("t2", FUTILE, metric_n=50))
    assert _decide(analysis)[:2] == ("collecting", None)  # served unknown: every arm needs its minimum
    d = decide(analysis, CONFIG, elapsed_s=LATE, served={"control", "t1"})
    assert (d.status, d.arm_id) == ("ship", "t1")
