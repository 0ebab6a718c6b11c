"""The decision policy over an `Analysis`: `decide` turns it into collecting / unhealthy / ship / keep_control /
inconclusive with the reason the API shows (the sample-ratio check, the minimum duration and feedback, the
guardrails, the novelty check, futility and the sample cap); `guardrail_failures` and `futile_arms` for the
approve mode and adaptive allocation."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from services.optimizer.stats.results import (
    METRIC_AVG_STARS,
    METRIC_POSITIVE_RATE,
    STATUS_OK,
    STATUS_SRM,
    Analysis,
    ArmResult,
)

DECISION_COLLECTING = "collecting"
DECISION_UNHEALTHY = "unhealthy"
DECISION_SHIP = "ship"
DECISION_KEEP_CONTROL = "keep_control"
DECISION_INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class DecisionConfig:
    alpha: float = 0.05
    metric: str = "positive_rate"
    min_duration_s: float = 7 * 86400
    min_feedback_per_arm: int = 100
    max_feedback_per_arm: int = 20000  # sample cap -> inconclusive
    target_lift: float = 0.10  # relative
    min_lift_to_ship: float = 0.0  # relative lift a winner must show (finetune uses 0.10)
    max_cost_ratio: float | None = 1.5  # guardrail vs control; None disables
    max_latency_ratio: float | None = 2.0
    min_feedback_rate_ratio: float | None = 0.8
    srm_threshold: float = 0.001
    tie_tolerance: float = 0.02  # winners whose prob_best differ by at most this are tied -> cheaper wins
    # Absolute guardrails, used when the control's cost or latency is 0 (an offline or local control), where
    # a ratio means nothing: a treatment may cost at most this much more per explanation, be this much slower.
    max_cost_increase_usd: float | None = 0.001
    max_latency_increase_ms: float | None = 2000.0
    # Fallback guardrail: the share of a treatment's explanations written by a fallback model may exceed the
    # control's by at most this (absolute); None disables.
    max_fallback_rate_increase: float | None = 0.05
    # Futility: end the experiment (inconclusive) once every treatment's always-valid interval lies below the
    # target lift; in adaptive mode such an arm stops receiving traffic. The interval is the one at
    # `futility_alpha` (per treatment; `analyze` computes it, see there), None: the interval shown. Futility
    # never ships, so its level trades power for votes and leaves the false-win rate as it is.
    futility: bool = True
    futility_alpha: float | None = None
    novelty_check: bool = True  # block shipping while the recent lift is significantly below the early one


@dataclass(frozen=True)
class Decision:
    status: str  # "collecting" | "unhealthy" | "ship" | "keep_control" | "inconclusive"
    arm_id: str | None  # the arm to ship (or the control for keep_control)
    reason: str  # human readable


def _feedback_rate_failure(arm: ArmResult, control: ArmResult, config: DecisionConfig) -> str | None:
    """The feedback-rate guardrail: the treatment's votes per explanation against the control's."""
    if (
        config.min_feedback_rate_ratio is not None
        and arm.feedback_rate is not None
        and control.feedback_rate
        and arm.feedback_rate / control.feedback_rate < config.min_feedback_rate_ratio
    ):
        ratio = arm.feedback_rate / control.feedback_rate
        return f"feedback rate {ratio:.2f}x control (< {config.min_feedback_rate_ratio:g}x)"
    return None


def _blocking_failures(arm: ArmResult, control: ArmResult, config: DecisionConfig) -> list[str]:
    """Reasons this treatment may not ship even if it wins on the success metric, for good (the feedback rate's,
    which moves as votes arrive, is `_feedback_rate_failure`: a winner waits on it). Cost and latency are
    compared as ratios to the control, or as absolute differences when the control's figure is 0 (an offline
    or local control), where a ratio would say nothing."""
    fails = []
    other = "star mean" if config.metric == METRIC_POSITIVE_RATE else "positive rate"
    if arm.secondary_significantly_worse:
        fails.append(f"{other} significantly worse than control")
    cost = _against_control(
        "cost",
        arm.cost_per_explanation,
        control.cost_per_explanation,
        config.max_cost_ratio,
        config.max_cost_increase_usd,
        lambda value, limit: f"cost ${value:.4g} per explanation against a $0 control (> +${limit:g})",
    )
    latency = _against_control(
        "latency",
        arm.latency_ms_mean,
        control.latency_ms_mean,
        config.max_latency_ratio,
        config.max_latency_increase_ms,
        lambda value, limit: f"latency {value:.0f} ms against a 0 ms control (> +{limit:g} ms)",
    )
    fails += [f for f in (cost, latency) if f]
    if config.max_fallback_rate_increase is not None and arm.fallback_rate is not None:
        extra = arm.fallback_rate - (control.fallback_rate or 0.0)
        if extra > config.max_fallback_rate_increase:
            fails.append(
                f"fallback rate {arm.fallback_rate:.1%} vs control {control.fallback_rate or 0.0:.1%} "
                f"(> +{config.max_fallback_rate_increase:.0%}): its own model often did not answer"
            )
    return fails


def _against_control(
    name: str,
    value: float | None,
    control: float | None,
    max_ratio: float | None,
    max_increase: float | None,
    over_zero: Callable[[float, float], str],
) -> str | None:
    """Why a treatment's cost or latency (`value`) fails against the control's: as a ratio (at most `max_ratio`),
    or, when the control's figure is 0, as an absolute increase (at most `max_increase`, told by `over_zero`).
    None when it passes, when either figure is missing, or when the limit that applies is off (None)."""
    if value is None or control is None:
        return None
    if control > 0:
        ratio = value / control
        if max_ratio is not None and ratio > max_ratio:
            return f"{name} {ratio:.2f}x control (> {max_ratio:g}x)"
    elif max_increase is not None and value - control > max_increase:
        return over_zero(value, max_increase)
    return None


def guardrail_failures(analysis: Analysis, arm_id: str, config: DecisionConfig) -> list[str]:
    """The guardrails `decide` applies, for one treatment of an analysis (approve mode re-checks a waiting
    winner with it): the blocking ones and the feedback rate's. Empty when the arm or the control is missing."""
    arm, control = analysis.arm(arm_id), analysis.arm(analysis.control_id)
    if arm is None or control is None:
        return []
    low_feedback = _feedback_rate_failure(arm, control, config)
    return _blocking_failures(arm, control, config) + ([low_feedback] if low_feedback else [])


def _cost_key(arm: ArmResult) -> float:
    return arm.cost_per_explanation if arm.cost_per_explanation is not None else math.inf


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else "n/a"


def arm_cap(arms: Sequence[ArmResult], per_arm: int, served: Collection[str] | None = None) -> float:
    """The votes an arm still in the split may collect before the round ends at its sample cap.

    A round's budget is `per_arm` votes for each of its arms. An arm the split no longer serves (dropped
    because it can no longer win) leaves what it did not spend to the arms still served, in equal shares, so
    a round that drops its hopeless arms spends the same budget on the arms that can still win (more power
    where it matters) instead of ending as early as if they were all still running. With every arm served
    (or `served` unknown) this is `per_arm`. The always-valid intervals hold at any stopping time, so a later
    end keeps their error guarantee."""
    if served is None:
        return float(per_arm)
    live = [a for a in arms if a.arm_id in served]
    if not live or len(live) == len(arms):
        return float(per_arm)
    unspent = sum(max(0, per_arm - a.metric_n) for a in arms if a.arm_id not in served)
    return per_arm + unspent / len(live)


def decide(
    analysis: Analysis, config: DecisionConfig, *, elapsed_s: float, served: Collection[str] | None = None
) -> Decision:
    """Turn an Analysis into collecting / unhealthy / ship / keep_control / inconclusive with a reason.

    Order: a sample-ratio mismatch is reported at once (unhealthy). Otherwise nothing is decided before the
    minimum duration. At the sample cap (an arm with `max_feedback_per_arm` votes; with `served`, the arms the
    split still serves, an arm of those with its share of the round's budget: `arm_cap`) the experiment ends
    even if another arm has no votes. Before it, every arm needs the minimum feedback. Then, with L = the always-valid
    interval of a treatment's difference to the control (Bonferroni over the treatments, the interval shown):
    - a treatment can ship when L lies wholly above the minimum lift (`min_lift_to_ship` x the control's mean),
      its guardrails hold, and its recent lift is not significantly below its early lift (novelty check); a
      winner blocked by a guardrail is final, except the feedback rate's: votes per explanation is an estimate
      that moves as votes arrive, so a winner under its floor (or whose rate, or the control's, cannot be
      measured yet) waits, and the round ends inconclusive at the cap if it stays there;
      among several, the highest probability to be best wins, near-ties (tie_tolerance) going to the cheaper;
    - the control is kept when every treatment's L lies wholly below the minimum lift, or the rest are
      winners blocked by guardrails;
    - futility (`config.futility`): when every treatment is `futile` (its always-valid interval at the
      futility level, `analyze(futility_alpha=...)`, lies below the target lift), blocked by a guardrail, or
      below the minimum lift, no arm can reach what the round is for: inconclusive;
    - at the sample cap without a winner: inconclusive; otherwise keep collecting.
    """
    if analysis.status == STATUS_SRM:
        p = analysis.srm_p_value
        p_txt = f"p={p:.2g}" if p is not None else "p=n/a"
        if not analysis.srm_sequential:
            p_txt = "chi-square " + p_txt
        else:
            p_txt = "anytime-valid " + p_txt
            if analysis.srm_p_value_fixed is not None:
                p_txt += f"; chi-square p={analysis.srm_p_value_fixed:.2g}"
        return Decision(
            DECISION_UNHEALTHY,
            None,
            f"sample ratio mismatch: {analysis.srm_unit} do not match the intended split ({p_txt}); "
            "fix the assignment before trusting any result",
        )
    control = analysis.arm(analysis.control_id)
    treatments = [a for a in analysis.arms if not a.is_control]
    if control is None or not treatments:
        return Decision(DECISION_COLLECTING, None, "nothing to compare: need a control and at least one treatment")
    if elapsed_s < config.min_duration_s:
        return Decision(
            DECISION_COLLECTING,
            None,
            f"minimum duration not reached ({elapsed_s / 86400:.1f} of {config.min_duration_s / 86400:.1f} days)",
        )
    live = [a for a in analysis.arms if served is None or a.arm_id in served] or list(analysis.arms)
    cap = arm_cap(analysis.arms, config.max_feedback_per_arm, served)
    at_cap = max(a.metric_n for a in live) >= cap
    cap_txt = f"sample cap of {config.max_feedback_per_arm} per arm"
    if cap > config.max_feedback_per_arm:
        cap_txt += f" ({cap:.0f} for each arm still served, with what the dropped arms left)"
    # an arm the split no longer serves cannot gather more votes: its verdict (it cannot win) is in already
    short = [a for a in live if a.metric_n < config.min_feedback_per_arm]
    if short:
        worst = min(short, key=lambda a: a.metric_n)
        if at_cap:
            return Decision(
                DECISION_INCONCLUSIVE,
                None,
                f"{cap_txt} reached while {worst.arm_id} has only "
                f"{worst.metric_n} of {config.min_feedback_per_arm} votes (feedback guardrail: an arm people do "
                "not vote on cannot be judged)",
            )
        return Decision(
            DECISION_COLLECTING,
            None,
            f"minimum feedback not reached: {worst.arm_id} has {worst.metric_n} of "
            f"{config.min_feedback_per_arm} per arm",
        )
    if analysis.status != STATUS_OK:
        if at_cap:
            return Decision(DECISION_INCONCLUSIVE, None, f"sample cap reached without a comparison ({analysis.status})")
        return Decision(DECISION_COLLECTING, None, f"not enough data to compare arms ({analysis.status})")

    c_mean = abs((control.star_mean if config.metric == METRIC_AVG_STARS else control.rate) or 0.0)
    ship_bar = max(config.min_lift_to_ship, 0.0) * c_mean
    winners: list[ArmResult] = []
    blocked: list[str] = []  # winners that cannot ship (guardrails): final
    waiting: list[str] = []  # winners that may ship later (novelty, the feedback rate): keep collecting
    below: list[ArmResult] = []
    futile: list[ArmResult] = []
    for t in treatments:
        ci = t.lift_ci_sequential
        if ci is None or t.diff is None:
            continue
        if ci[0] > ship_bar:  # ship_bar >= 0: a winner's interval lies wholly above 0 too
            fails = _blocking_failures(t, control, config)
            low_feedback = _feedback_rate_failure(t, control, config)
            if fails:
                blocked.append(f"{t.arm_id} wins but is blocked by guardrails: " + "; ".join(fails))
            elif config.min_feedback_rate_ratio is not None and (
                t.feedback_rate is None or control.feedback_rate is None
            ):
                waiting.append(
                    f"{t.arm_id} wins but the feedback-rate guardrail cannot be judged yet (no session of "
                    f"{'its' if t.feedback_rate is None else 'the control'} has had time to vote)"
                )
            elif low_feedback:  # an estimate that moves as votes arrive: wait on it, never final
                waiting.append(f"{t.arm_id} wins but waits on the feedback-rate guardrail: {low_feedback}")
            elif config.novelty_check and t.novelty_flag:
                waiting.append(
                    f"{t.arm_id} wins but its lift fades (novelty check: early {t.lift_early or 0.0:+.1%}, recent "
                    f"{t.lift_recent or 0.0:+.1%}, p={t.novelty_p_value or 0.0:.2g})"
                )
            else:
                winners.append(t)
        elif ci[1] < ship_bar:  # ship_bar >= 0, so with no minimum lift: wholly below 0
            below.append(t)
        elif config.futility and t.futile:
            futile.append(t)

    if winners:
        top = max(w.prob_best or 0.0 for w in winners)
        tied = [w for w in winners if (w.prob_best or 0.0) >= top - config.tie_tolerance]
        pick = min(tied, key=lambda w: (_cost_key(w), -(w.prob_best or 0.0)))
        lift = f"{pick.lift:+.1%}" if pick.lift is not None else "n/a"
        note = f"; tied with {len(tied) - 1} other winner(s), chose the cheaper" if len(tied) > 1 else ""
        return Decision(
            DECISION_SHIP,
            pick.arm_id,
            f"{pick.arm_id} beats control on {analysis.metric} (lift {lift}, always-valid interval "
            f"{_fmt_ci(pick.lift_ci_relative)} above the minimum lift {config.min_lift_to_ship:.0%}, Bonferroni "
            f"over {len(treatments)} treatment(s), p={pick.p_value_sequential or 0.0:.3g}, "
            f"P(best)={pick.prob_best or 0.0:.2f}); guardrails hold{note}",
        )

    bar_txt = f"the minimum lift {config.min_lift_to_ship:.0%}" if ship_bar > 0 else "0 (no change)"
    if below and len(below) == len(treatments):
        return Decision(
            DECISION_KEEP_CONTROL,
            control.arm_id,
            f"every treatment's always-valid interval lies below {bar_txt} on {analysis.metric}",
        )
    if blocked and len(blocked) + len(below) == len(treatments):
        return Decision(DECISION_KEEP_CONTROL, control.arm_id, "no treatment can ship: " + " | ".join(blocked))
    extra = (" (" + " | ".join(blocked + waiting) + ")") if blocked or waiting else ""
    if (futile or below) and len(blocked) + len(below) + len(futile) == len(treatments):
        return Decision(
            DECISION_INCONCLUSIVE,
            None,
            f"stopped for futility: no treatment can still reach the target lift {config.target_lift:.0%} "
            f"(every always-valid interval{_futility_level(config)} lies below it){extra}",
        )
    if at_cap:
        return Decision(
            DECISION_INCONCLUSIVE,
            None,
            f"{cap_txt} reached without a winner{extra}",
        )
    best_p = min((t.p_value_sequential for t in treatments if t.p_value_sequential is not None), default=None)
    p_txt = f"; smallest corrected always-valid p={best_p:.3g}" if best_p is not None else ""
    return Decision(DECISION_COLLECTING, None, f"no interval clears {bar_txt} yet{p_txt}{extra}")


def _futility_level(config: DecisionConfig) -> str:
    return "" if config.futility_alpha is None else f" at the futility level {config.futility_alpha:g}"


def futile_arms(analysis: Analysis) -> list[str]:
    """Treatments whose always-valid interval (at the futility level) lies wholly below the target lift: clearly behind, they stop
    receiving traffic under adaptive allocation (the interval is valid under any allocation rule, so dropping
    them keeps the error guarantees)."""
    return [a.arm_id for a in analysis.arms if not a.is_control and a.futile]
