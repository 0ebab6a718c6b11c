"""What `analyze` returns, field by field, against the formulas written out here (the package docstring of
services/optimizer/stats and the docstrings of `frequentist` and `moments`), with scipy and statsmodels where
they have the reference: the sample-ratio-mismatch fields, the default mixing sd, the always-valid p-values and
intervals, the fixed-horizon reference, the secondary-metric guardrail, the Bayesian summaries, power, samples
and days, the per-arm rates and the status."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from scipy import integrate, optimize
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

from services.optimizer.stats.analysis import analyze
from services.optimizer.stats.results import STATUS_INSUFFICIENT, STATUS_OK, STATUS_SRM, ArmData
from tests.unit.arm_results import arm_of, equal_weights

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


# -- the formulas ------------------------------------------------------------------------------------------------


def _smoothed_var(x: float, n: float) -> float:
    """Per-vote variance of a rate, q(1 - q) on the smoothed rate q = (x + 1) / (n + 2)."""
    q = (x + 1) / (n + 2)
    return q * (1 - q)


def _p_always_valid(d: float, v: float, tau2: float) -> float:
    """min(1, 1 / Lambda), Lambda = sqrt(V / (V + tau^2)) exp(d^2 tau^2 / (2 V (V + tau^2)))."""
    log_lambda = 0.5 * math.log(v / (v + tau2)) + d * d * tau2 / (2 * v * (v + tau2))
    return min(1.0, math.exp(-log_lambda))


def _half_width(v: float, tau2: float, alpha: float) -> float:
    """The confidence sequence: d +- sqrt(V (V + tau^2) / tau^2 (2 log(1/alpha) + log((V + tau^2) / V)))."""
    return math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v)))


def _tau_for(effect: float, alpha: float) -> float:
    """tau = |effect| sqrt(r / (1 + r)) at the r solving r = 2 log(1/alpha) + log(1 + r)."""
    big_l = 2 * math.log(1 / alpha)
    r = optimize.brentq(lambda r: r - big_l - math.log1p(r), big_l, big_l + 50, xtol=1e-14)
    return abs(effect) * math.sqrt(r / (1 + r))


def _power(effect: float, v: float, tau2: float, alpha: float, threshold: float = 0.0) -> float:
    """P(the interval's lower end is above the threshold) when the estimate is N(effect, V)."""
    return float(sps.norm.cdf((effect - threshold - _half_width(v, tau2, alpha)) / math.sqrt(v)))


def _n_for_power(effect: float, unit: float, tau2: float, alpha: float, threshold: float = 0.0) -> float:
    """Samples per arm at which that power is 80%, the difference's variance being unit / n."""
    return float(optimize.brentq(lambda n: _power(effect, unit / n, tau2, alpha, threshold) - 0.8, 1.0, 1e9, xtol=1e-9))


def _srm_log_bf(counts: Sequence[float], weights: Sequence[float], c: float = 1000.0) -> float:
    """log BF of the Dirichlet-multinomial (prior c p) against the multinomial at p."""
    p = [w / sum(weights) for w in weights]
    total = sum(counts)
    out = math.lgamma(c) - math.lgamma(c + total)
    for n_i, p_i in zip(counts, p, strict=True):
        out += math.lgamma(c * p_i + n_i) - math.lgamma(c * p_i) - n_i * math.log(p_i)
    return out


def _clustered(sessions: Sequence[tuple[int, int]]) -> tuple[float, float, float]:
    """(rate, clustered variance of the rate, independent variance of the rate) from (votes, thumbs up) per
    session: sum_i (x_i - R n_i)^2 / N^2 against R (1 - R) / N."""
    n = sum(v for v, _ in sessions)
    r = sum(x for _, x in sessions) / n
    return r, sum((x - r * v) ** 2 for v, x in sessions) / n**2, r * (1 - r) / n


def _session_arm(arm_id: str, sessions: Sequence[tuple[int, int]]) -> ArmData:
    return ArmData(
        arm_id=arm_id,
        exposures=2 * len(sessions),
        n=sum(v for v, _ in sessions),
        positives=sum(x for _, x in sessions),
        sessions=len(sessions),
        n_sq=float(sum(v * v for v, _ in sessions)),
        pos_sq=float(sum(x * x for _, x in sessions)),
        pos_cross=float(sum(v * x for v, x in sessions)),
    )


def _stars(arm_id: str, n: int, mean: float, var: float, votes: int = 1000, ups: int = 500) -> ArmData:
    """An arm with `n` star ratings of that mean and sample variance (and thumbs for the other metric)."""
    return ArmData(arm_id, 2 * votes, votes, ups, star_n=n, star_sum=n * mean, star_sumsq=var * (n - 1) + n * mean**2)


# -- sample ratio mismatch ---------------------------------------------------------------------------------------


def test_srm_counts_sessions_against_the_weights_with_both_tests_reported() -> None:
    # sessions 4845 / 3155 / 2000 against weights 5 / 3 / 2; the explanations per session differ by arm
    sessions = [4845, 3155, 2000]
    arms = [
        ArmData("control", 14535, 500, 250, sessions=4845),
        ArmData("t1", 6310, 300, 160, sessions=3155),
        ArmData("t2", 10000, 200, 100, sessions=2000),
    ]
    weights = {"control": 5.0, "t1": 3.0, "t2": 2.0}
    result = analyze(arms, "control", weights)
    assert result.srm_unit == "sessions" and result.srm_sequential
    chi2 = sps.chisquare(sessions, [5000, 3000, 2000]).pvalue
    assert result.srm_p_value_fixed == pytest.approx(chi2, rel=1e-9)
    log_bf = _srm_log_bf(sessions, [5, 3, 2])
    assert result.srm_log_bayes_factor == pytest.approx(log_bf, rel=1e-9)
    assert result.srm_p_value == pytest.approx(min(1.0, math.exp(-log_bf)), rel=1e-9)
    # chi-square p about 0.0017, BF about 29: neither flags at 0.001
    assert 0.001 < chi2 < 0.002 and 0 < log_bf < math.log(1000)
    assert not result.srm_flag and result.status == STATUS_OK
    # the fixed-horizon test flags once its p is below the threshold, and is then the one reported
    fixed = analyze(arms, "control", weights, srm_sequential=False, srm_threshold=0.002)
    assert fixed.srm_flag and fixed.status == STATUS_SRM and not fixed.srm_sequential
    assert fixed.srm_p_value == fixed.srm_p_value_fixed == pytest.approx(chi2, rel=1e-9)
    assert not analyze(arms, "control", weights, srm_threshold=0.002).srm_flag  # the sequential one does not
    # the anytime-valid test flags at BF >= 1 / threshold
    assert analyze(arms, "control", weights, srm_threshold=1 / math.exp(log_bf) * 1.01).srm_flag
    assert not analyze(arms, "control", weights, srm_threshold=1 / math.exp(log_bf) * 0.99).srm_flag
    # the concentration is the prior's
    assert analyze(arms, "control", weights, srm_concentration=50.0).srm_log_bayes_factor == pytest.approx(
        _srm_log_bf(sessions, [5, 3, 2], 50.0), rel=1e-9
    )


def test_srm_counts_exposures_when_an_arm_has_no_session_count() -> None:
    arms = [ArmData("control", 5200, 500, 250, sessions=2600), ArmData("t1", 4800, 480, 240)]
    result = analyze(arms, "control", {"control": 0.5, "t1": 0.5})
    assert result.srm_unit == "exposures"
    assert result.srm_p_value_fixed == pytest.approx(sps.chisquare([5200, 4800]).pvalue, rel=1e-9)
    assert result.srm_log_bayes_factor == pytest.approx(_srm_log_bf([5200, 4800], [1, 1]), rel=1e-9)
    assert arm_of(result, "control").sessions == 2600 and arm_of(result, "t1").sessions == 4800


def test_an_arm_missing_from_the_weights_has_weight_zero_and_without_weights_there_is_no_srm_test() -> None:
    arms = [ArmData("control", 1000, 100, 50), ArmData("t1", 1000, 100, 60)]
    missing = analyze(arms, "control", {"control": 1.0})
    assert (missing.srm_p_value, missing.srm_flag, missing.status) == (0.0, True, STATUS_SRM)
    none = analyze(arms, "control", {})
    assert (none.srm_p_value, none.srm_p_value_fixed, none.srm_log_bayes_factor, none.srm_flag) == (
        None,
        None,
        None,
        False,
    )
    assert none.status == STATUS_OK


# -- the default mixing sd ---------------------------------------------------------------------------------------


def test_the_default_tau_is_tuned_to_target_lift_times_the_pooled_mean_at_the_bonferroni_alpha() -> None:
    # pooled over votes (950 / 1500), not the mean of the arm means; one treatment: alpha 0.05
    arms = [ArmData("control", 2000, 1000, 600), ArmData("t1", 1000, 500, 350)]
    assert analyze(arms, "control", equal_weights(arms)).tau == pytest.approx(
        _tau_for(0.1 * 950 / 1500, 0.05), rel=1e-9
    )
    assert analyze(arms, "control", equal_weights(arms), target_lift=0.2).tau == pytest.approx(
        _tau_for(0.2 * 950 / 1500, 0.05), rel=1e-9
    )
    # three treatments: alpha / 3; an arm without votes does not move the pooled mean
    more = [*arms, ArmData("t2", 1000, 500, 200), ArmData("t3", 10, 0, 0)]
    assert analyze(more, "control", equal_weights(more), alpha=0.1).tau == pytest.approx(
        _tau_for(0.1 * 1150 / 2000, 0.1 / 3), rel=1e-9
    )
    # a target lift of 0 is floored at 1e-3
    assert analyze(arms, "control", equal_weights(arms), target_lift=0.0).tau == pytest.approx(
        _tau_for(1e-3 * 950 / 1500, 0.05), rel=1e-9
    )
    # a given tau is used as it is
    assert analyze(arms, "control", equal_weights(arms), tau=0.07).tau == 0.07


@pytest.mark.parametrize(("positives", "base"), [(1000, 0.99), (0, 0.01), (5, 0.01), (995, 0.99)])
def test_the_default_tau_clamps_the_pooled_rate_to_between_one_and_ninety_nine_percent(
    positives: int, base: float
) -> None:
    arms = [ArmData("control", 1000, 500, positives // 2), ArmData("t1", 1000, 500, positives - positives // 2)]
    assert analyze(arms, "control", equal_weights(arms)).tau == pytest.approx(_tau_for(0.1 * base, 0.05), rel=1e-9)


def test_a_single_vote_already_sets_the_default_tau_and_no_vote_leaves_it_unset() -> None:
    one = [ArmData("control", 1, 1, 1), ArmData("t1", 0, 0, 0)]
    result = analyze(one, "control", equal_weights(one))
    assert result.tau == pytest.approx(_tau_for(0.1 * 0.99, 0.05), rel=1e-9)
    assert result.status == STATUS_INSUFFICIENT
    none = [ArmData("control", 0, 0, 0), ArmData("t1", 0, 0, 0)]
    assert analyze(none, "control", equal_weights(none)).tau is None


def test_the_default_tau_for_stars_is_on_the_pooled_star_mean_floored_at_a_tenth() -> None:
    arms = [_stars("control", 200, 3.5, 1.0), _stars("t1", 100, 4.2, 1.0)]
    pooled = (200 * 3.5 + 100 * 4.2) / 300
    got = analyze(arms, "control", equal_weights(arms), metric="avg_stars").tau
    assert got == pytest.approx(_tau_for(0.1 * pooled, 0.05), rel=1e-9)
    ones = [_stars("control", 50, 1.0, 0.0), _stars("t1", 50, 1.0, 0.0)]  # a mean of 1 is used as it is
    got = analyze(ones, "control", equal_weights(ones), metric="avg_stars").tau
    assert got == pytest.approx(_tau_for(0.1, 0.05), rel=1e-9)
    zeros = [_stars("control", 50, 0.0, 0.0), _stars("t1", 50, 0.0, 0.0)]
    got = analyze(zeros, "control", equal_weights(zeros), metric="avg_stars").tau
    assert got == pytest.approx(_tau_for(0.1 * 0.1, 0.05), rel=1e-9)


# -- treatment against control: positive rate, independent votes -------------------------------------------------


def _rate_arms() -> list[ArmData]:
    return [
        ArmData("control", 4000, 2000, 1000),
        ArmData("t1", 4000, 2000, 1100),  # +5 points: interval around +0.05, above the futility bar
        ArmData("t2", 3000, 1500, 800),
        ArmData("t3", 4000, 2000, 950),  # -2.5 points: the interval lies below +10% of 0.5
    ]


def test_each_treatment_against_the_control_on_the_positive_rate() -> None:
    arms = _rate_arms()
    result = analyze(arms, "control", {a.arm_id: a.exposures for a in arms})
    assert result.status == STATUS_OK and result.metric == "positive_rate" and result.correction == "bonferroni"
    pooled = sum(a.positives for a in arms) / sum(a.n for a in arms)
    tau = _tau_for(0.1 * pooled, 0.05 / 3)
    assert result.tau == pytest.approx(tau, rel=1e-9)
    c = arms[0]
    pc = c.positives / c.n
    futile = {}
    for a in arms[1:]:
        r = arm_of(result, a.arm_id)
        pt = a.positives / a.n
        d = pt - pc
        v = _smoothed_var(a.positives, a.n) / a.n + _smoothed_var(c.positives, c.n) / c.n
        h = _half_width(v, tau**2, 0.05 / 3)
        assert r.diff == pytest.approx(d, abs=1e-12)
        assert r.lift == pytest.approx(d / pc, rel=1e-9)
        assert r.p_value_sequential == pytest.approx(min(1.0, 3 * _p_always_valid(d, v, tau**2)), rel=1e-9)
        assert r.lift_ci_sequential == pytest.approx((d - h, d + h), rel=1e-9)
        assert r.lift_ci_relative == pytest.approx(((d - h) / pc, (d + h) / pc), rel=1e-9)
        _, p_z = proportions_ztest([a.positives, c.positives], [a.n, c.n])
        assert r.p_value_fixed == pytest.approx(p_z, rel=1e-9)
        hf = Z95 * math.sqrt(pt * (1 - pt) / a.n + pc * (1 - pc) / c.n)
        assert r.lift_ci_fixed == pytest.approx((d - hf, d + hf), rel=1e-9)
        assert r.futile == (d + h < 0.1 * pc)
        futile[a.arm_id] = r.futile
        assert (r.metric_n, r.design_effect, r.effective_n) == (a.n, 1.0, a.n)
    # the bar is the target times the control's rate (5 points): t1's interval reaches above it (not above 20
    # points), t3's stays under it
    assert futile == {"t1": False, "t2": False, "t3": True}
    t1_hi = arm_of(result, "t1").lift_ci_sequential[1]  # type: ignore[index]
    assert 0.05 < t1_hi < 0.2
    control = arm_of(result, "control")
    assert control.is_control and not any(arm_of(result, a.arm_id).is_control for a in arms[1:])
    assert (control.diff, control.lift, control.lift_ci_sequential, control.lift_ci_fixed) == (None, None, None, None)
    assert (control.p_value_sequential, control.p_value_fixed, control.lift_ci_relative) == (None, None, None)
    assert (control.prob_beat_control, control.power, control.samples_needed_per_arm) == (None, None, None)
    assert not control.futile and not control.secondary_significantly_worse and not control.novelty_flag


def test_the_bonferroni_p_value_is_capped_at_one() -> None:
    arms = [ArmData("control", 400, 200, 100), ArmData("t1", 400, 200, 115), ArmData("t2", 400, 200, 85)]
    result = analyze(arms, "control", equal_weights(arms), tau=0.05)
    for arm_id, x in (("t1", 115), ("t2", 85)):
        d = x / 200 - 0.5
        v = _smoothed_var(x, 200) / 200 + _smoothed_var(100, 200) / 200
        raw = _p_always_valid(d, v, 0.0025)
        assert 0.5 < raw < 1 and arm_of(result, arm_id).p_value_sequential == 1.0


def test_one_treatment_is_tested_at_the_full_alpha() -> None:
    arms = [ArmData("control", 3000, 1500, 750), ArmData("t1", 3000, 1500, 810)]
    result = analyze(arms, "control", equal_weights(arms), tau=0.04, alpha=0.1)
    t1 = arm_of(result, "t1")
    d = 0.04
    v = _smoothed_var(810, 1500) / 1500 + _smoothed_var(750, 1500) / 1500
    h = _half_width(v, 0.0016, 0.1)
    assert t1.p_value_sequential == pytest.approx(_p_always_valid(d, v, 0.0016), rel=1e-9)
    assert t1.lift_ci_sequential == pytest.approx((d - h, d + h), rel=1e-9)
    assert t1.power == pytest.approx(_power(0.1 * 0.5, v, 0.0016, 0.1), rel=1e-9)


def test_a_control_without_any_thumbs_up_gives_no_lift_and_futility_against_zero() -> None:
    arms = [ArmData("control", 1000, 500, 0), ArmData("t1", 1000, 500, 5)]
    t1 = arm_of(analyze(arms, "control", equal_weights(arms), tau=0.05), "t1")
    assert t1.diff == pytest.approx(0.01) and t1.lift is None and t1.lift_ci_relative is None
    assert t1.lift_ci_sequential is not None and 0 < t1.lift_ci_sequential[1] < 0.1
    assert not t1.futile  # 10% of 0 is 0, which the interval still reaches above


def test_clustered_votes_deflate_the_pooled_z_and_widen_every_interval_by_the_design_effect() -> None:
    # sessions that vote all up or all down: the votes of one session are one vote's worth of information
    control_sessions = [(4, 4)] * 60 + [(4, 0)] * 90 + [(1, 1)] * 50 + [(2, 1)] * 40
    treatment_sessions = [(3, 3)] * 90 + [(3, 0)] * 60 + [(1, 1)] * 30 + [(2, 1)] * 40 + [(5, 2)] * 10
    arms = [_session_arm("control", control_sessions), _session_arm("t1", treatment_sessions)]
    result = analyze(arms, "control", {"control": 240, "t1": 230}, tau=0.05)
    t1, control = arm_of(result, "t1"), arm_of(result, "control")
    pc, cl_c, iid_c = _clustered(control_sessions)
    pt, cl_t, iid_t = _clustered(treatment_sessions)
    deff_c, deff_t = cl_c / iid_c, cl_t / iid_t
    assert deff_c > 2 and deff_t > 1.5 and iid_t > iid_c  # the treatment has fewer votes
    assert control.design_effect == pytest.approx(deff_c, rel=1e-9)
    assert t1.design_effect == pytest.approx(deff_t, rel=1e-9)
    assert t1.effective_n == pytest.approx(arms[1].n / deff_t, rel=1e-9)
    assert control.effective_n == pytest.approx(arms[0].n / deff_c, rel=1e-9)
    assert (t1.sessions, control.sessions) == (230, 240)
    d = pt - pc
    v = (
        _smoothed_var(arms[1].positives, arms[1].n) * deff_t / arms[1].n
        + _smoothed_var(arms[0].positives, arms[0].n) * deff_c / arms[0].n
    )
    h = _half_width(v, 0.0025, 0.05)
    assert t1.lift_ci_sequential == pytest.approx((d - h, d + h), rel=1e-9)
    assert t1.p_value_sequential == pytest.approx(_p_always_valid(d, v, 0.0025), rel=1e-9)
    hf = Z95 * math.sqrt(cl_t + cl_c)
    assert t1.lift_ci_fixed == pytest.approx((d - hf, d + hf), rel=1e-9)
    z, _ = proportions_ztest([arms[1].positives, arms[0].positives], [arms[1].n, arms[0].n])
    deff_diff = (cl_t + cl_c) / (iid_t + iid_c)
    assert t1.p_value_fixed == pytest.approx(2 * sps.norm.sf(abs(z) / math.sqrt(deff_diff)), rel=1e-9)
    assert t1.p_value_fixed > 2 * sps.norm.sf(abs(z)) * 1.5  # well above the per-vote figure
    # the posteriors count the votes at their effective number: Beta(1 + x / deff, 1 + (n - x) / deff)
    beat = _prob_greater(
        (arms[1].positives / deff_t, arms[1].n / deff_t), (arms[0].positives / deff_c, arms[0].n / deff_c)
    )
    big = analyze(arms, "control", {"control": 240, "t1": 230}, tau=0.05, draws=200_000)
    assert arm_of(big, "t1").prob_beat_control == pytest.approx(beat, abs=0.005)
    # power and samples on the clustered per-vote variances
    unit = _smoothed_var(arms[1].positives, arms[1].n) * deff_t + _smoothed_var(arms[0].positives, arms[0].n) * deff_c
    assert t1.power == pytest.approx(_power(0.1 * pc, v, 0.0025, 0.05), rel=1e-9)
    assert t1.samples_needed_per_arm == math.ceil(_n_for_power(0.1 * pc, unit, 0.0025, 0.05))


def test_two_votes_per_session_that_always_agree_count_as_one_vote_per_session() -> None:
    # each session votes twice, both up or both down: the design effect is exactly 2, and the fixed-horizon
    # z-test deflated by it is the z-test on the sessions as single votes
    control = _session_arm("control", [(2, 2)] * 120 + [(2, 0)] * 280)
    treatment = _session_arm("t1", [(2, 2)] * 150 + [(2, 0)] * 250)
    result = analyze([control, treatment], "control", {"control": 0.5, "t1": 0.5}, tau=0.05)
    t1, c = arm_of(result, "t1"), arm_of(result, "control")
    assert (t1.design_effect, c.design_effect) == (2.0, 2.0)
    assert (t1.effective_n, c.effective_n) == (400.0, 400.0)
    _, p_sessions = proportions_ztest([150, 120], [400, 400])
    _, p_votes = proportions_ztest([300, 240], [800, 800])
    assert t1.p_value_fixed == pytest.approx(p_sessions, rel=1e-9)
    assert p_sessions > 4 * p_votes


# -- the star metric ----------------------------------------------------------------------------------------------


def test_each_treatment_against_the_control_on_stars() -> None:
    arms = [_stars("control", 300, 3.5, 1.2), _stars("t1", 280, 3.8, 0.9), _stars("t2", 12, 3.4, 0.0)]
    result = analyze(arms, "control", equal_weights(arms), metric="avg_stars", feedback_per_day=100)
    assert result.status == STATUS_OK and result.metric == "avg_stars"
    pooled = (300 * 3.5 + 280 * 3.8 + 12 * 3.4) / 592
    tau = _tau_for(0.1 * pooled, 0.025)
    assert result.tau == pytest.approx(tau, rel=1e-9)
    c_var = 1.2
    for arm_id, n, mean, var in (("t1", 280, 3.8, 0.9), ("t2", 12, 3.4, 0.25)):  # t2's sd floored at 0.5
        r = arm_of(result, arm_id)
        d = mean - 3.5
        v = var / n + c_var / 300
        h = _half_width(v, tau**2, 0.025)
        assert r.diff == pytest.approx(d, rel=1e-9) and r.lift == pytest.approx(d / 3.5, rel=1e-9)
        assert r.star_mean == pytest.approx(mean) and r.metric_n == r.star_n == n
        assert r.p_value_sequential == pytest.approx(min(1.0, 2 * _p_always_valid(d, v, tau**2)), rel=1e-9)
        assert r.lift_ci_sequential == pytest.approx((d - h, d + h), rel=1e-9)
        assert r.p_value_fixed == pytest.approx(2 * sps.norm.sf(abs(d) / math.sqrt(v)), rel=1e-9)
        hf = Z95 * math.sqrt(v)
        assert r.lift_ci_fixed == pytest.approx((d - hf, d + hf), rel=1e-9)
        assert r.futile == (d + h < 0.1 * 3.5)
        # power, samples and days on the star scale (not clamped like a rate)
        effect = 0.1 * 3.5
        assert r.power == pytest.approx(_power(effect, v, tau**2, 0.025), rel=1e-9)
        n_req = _n_for_power(effect, var + c_var, tau**2, 0.025)
        assert r.samples_needed_per_arm == math.ceil(n_req)
        share = 1 / 3 * 100
        assert r.days_to_decision == pytest.approx(max(n_req - n, 0) / share, rel=1e-6)


def test_an_unknown_metric_is_read_as_the_positive_rate() -> None:
    arms = [_stars("control", 300, 3.5, 1.2, 1000, 500), _stars("t1", 280, 3.2, 0.9, 1000, 560)]
    odd = analyze(arms, "control", equal_weights(arms), metric="clicks")
    assert odd.metric == "positive_rate"
    assert odd == analyze(arms, "control", equal_weights(arms), metric="positive_rate")
    assert arm_of(odd, "t1").diff == pytest.approx(0.06)


# -- the secondary-metric guardrail -------------------------------------------------------------------------------


def _secondary_p(d: float, v: float, control_mean: float) -> float:
    """The uncorrected always-valid p of the secondary metric, mixing sd target_lift x |control mean|."""
    return _p_always_valid(d, v, (0.1 * max(abs(control_mean), 0.01)) ** 2)


@pytest.mark.parametrize(("star_sum", "side"), [(400 * 3.2836, "below"), (400 * 3.2882, "above")])
def test_stars_worse_than_control_at_the_always_valid_level_trip_the_guardrail(star_sum: float, side: str) -> None:
    control = _stars("control", 400, 3.5, 1.0)
    mean = star_sum / 400
    treatment = _stars("t1", 400, mean, 0.9, ups=520)
    result = analyze([control, treatment], "control", {"control": 0.5, "t1": 0.5})
    p = _secondary_p(mean - 3.5, 0.9 / 400 + 1.0 / 400, 3.5)
    assert (0.04 < p < 0.05) if side == "below" else (0.05 < p < 0.06)
    assert arm_of(result, "t1").secondary_significantly_worse == (side == "below")
    assert not arm_of(result, "control").secondary_significantly_worse


@pytest.mark.parametrize(("n", "positives", "worse"), [(1090, 472, True), (1090, 473, False)])
def test_a_thumbs_up_rate_worse_than_control_trips_the_guardrail_on_a_star_experiment(
    n: int, positives: int, worse: bool
) -> None:
    control = _stars("control", 300, 3.5, 1.0, votes=1000, ups=500)
    treatment = _stars("t1", 300, 3.6, 1.0, votes=n, ups=positives)
    result = analyze([control, treatment], "control", {"control": 0.5, "t1": 0.5}, metric="avg_stars")
    v = _smoothed_var(positives, n) / n + _smoothed_var(500, 1000) / 1000
    p = _secondary_p(positives / n - 0.5, v, 0.5)
    assert (p < 0.05) == worse and abs(p - 0.05) < 0.005
    assert arm_of(result, "t1").secondary_significantly_worse == worse


def test_a_significantly_better_secondary_metric_is_not_a_guardrail_failure() -> None:
    control = _stars("control", 400, 3.5, 1.0)
    better = _stars("t1", 400, 4.2, 1.0, ups=520)
    t1 = arm_of(analyze([control, better], "control", {"control": 0.5, "t1": 0.5}), "t1")
    assert _secondary_p(0.7, 2 / 400, 3.5) < 1e-6 and not t1.secondary_significantly_worse


def test_the_guardrail_needs_min_samples_ratings_on_both_arms() -> None:
    # two 5-star ratings on the control against a thousand 1s: worse, and two ratings are enough at min_samples 2
    few_control = [_stars("control", 2, 5.0, 0.0), _stars("t1", 1000, 1.0, 0.0)]
    assert arm_of(analyze(few_control, "control", equal_weights(few_control)), "t1").secondary_significantly_worse
    assert not arm_of(
        analyze(few_control, "control", equal_weights(few_control), min_samples=3), "t1"
    ).secondary_significantly_worse
    few_treatment = [_stars("control", 1000, 5.0, 0.0), _stars("t1", 2, 1.0, 0.0)]
    assert arm_of(analyze(few_treatment, "control", equal_weights(few_treatment)), "t1").secondary_significantly_worse
    assert not arm_of(
        analyze(few_treatment, "control", equal_weights(few_treatment), min_samples=3), "t1"
    ).secondary_significantly_worse
    # no ratings at all on a treatment: nothing to compare
    none = [_stars("control", 1000, 5.0, 0.0), ArmData("t1", 2000, 1000, 500)]
    assert not arm_of(analyze(none, "control", equal_weights(none)), "t1").secondary_significantly_worse


# -- Bayesian summaries --------------------------------------------------------------------------------------------


def _prob_greater(b: tuple[float, float], a: tuple[float, float]) -> float:
    """P(B > A) for independent Beta(1 + x, 1 + n - x) posteriors given (x, n), by numerical integration."""
    pa, pb = sps.beta(1 + a[0], 1 + a[1] - a[0]), sps.beta(1 + b[0], 1 + b[1] - b[0])
    return float(integrate.quad(lambda y: pb.pdf(y) * pa.cdf(y), 0, 1, limit=200, points=[pb.mean()])[0])


def _expected_shortfall(a: tuple[float, float], b: tuple[float, float]) -> float:
    """E[max(A, B) - A] = E[(B - A)+] for independent Beta posteriors: the integral over a of
    f_A(a) (E[B; B > a] - a P(B > a)), with E[B; B > a] = E[B] P(B' > a) for B' ~ Beta(alpha_B + 1, beta_B)."""
    ab, bb = 1 + b[0], 1 + b[1] - b[0]
    pa, pb, pb1 = sps.beta(1 + a[0], 1 + a[1] - a[0]), sps.beta(ab, bb), sps.beta(ab + 1, bb)

    def inner(x: float) -> float:
        return float(pa.pdf(x) * (ab / (ab + bb) * pb1.sf(x) - x * pb.sf(x)))

    return float(integrate.quad(inner, 0, 1, limit=200, points=[pa.mean()])[0])


def test_bayesian_summaries_match_the_beta_posteriors() -> None:
    arms = [ArmData("control", 400, 200, 100), ArmData("t1", 400, 200, 112)]
    result = analyze(arms, "control", equal_weights(arms))
    c, t1 = arm_of(result, "control"), arm_of(result, "t1")
    beat = _prob_greater((112, 200), (100, 200))
    assert t1.prob_beat_control == pytest.approx(beat, abs=0.02)  # 10,000 draws: sd 0.005
    assert t1.prob_best == pytest.approx(beat, abs=0.02) and c.prob_best == pytest.approx(1 - beat, abs=0.02)
    assert c.prob_best + t1.prob_best == pytest.approx(1.0, abs=1e-12)  # type: ignore[operator]
    # 10,000 draws by default: each probability is a count of them
    for r in (c, t1):
        assert r.prob_best * 10_000 == pytest.approx(round(r.prob_best * 10_000), abs=1e-6)  # type: ignore[operator]
    assert c.expected_loss == pytest.approx(_expected_shortfall((100, 200), (112, 200)), abs=0.002)
    assert t1.expected_loss == pytest.approx(_expected_shortfall((112, 200), (100, 200)), abs=0.002)
    assert 0 < t1.expected_loss < c.expected_loss  # type: ignore[operator]


def test_probability_to_be_best_sums_to_one_and_orders_the_arms() -> None:
    arms = [
        ArmData("control", 1000, 500, 250),
        ArmData("t1", 1000, 500, 300),
        ArmData("t2", 1000, 500, 260),
        ArmData("t3", 1000, 500, 200),
    ]
    result = analyze(arms, "control", equal_weights(arms))
    best = [arm_of(result, a.arm_id).prob_best for a in arms]
    loss = [arm_of(result, a.arm_id).expected_loss for a in arms]
    beat = [arm_of(result, a.arm_id).prob_beat_control for a in arms[1:]]
    assert sum(best) == pytest.approx(1.0, abs=1e-12)  # type: ignore[arg-type]
    assert best[1] > 0.99 and best[3] == 0.0  # type: ignore[operator]
    assert loss[1] < loss[2] < loss[0] < loss[3]  # type: ignore[operator]
    assert loss[3] == pytest.approx(0.2, abs=0.01)  # about 0.6 - 0.4
    assert beat[0] > beat[1] > 0.5 > beat[2]  # type: ignore[operator]
    assert beat[1] == pytest.approx(_prob_greater((260, 500), (250, 500)), abs=0.02)


# -- power, samples and days ---------------------------------------------------------------------------------------


def test_power_samples_and_days_follow_the_shares_of_the_weights() -> None:
    arms = [ArmData("control", 2000, 1000, 500), ArmData("t1", 1000, 500, 275), ArmData("t2", 1000, 500, 250)]
    weights = {"control": 2.0, "t1": 1.0, "t2": 1.0}  # shares 1/2, 1/4, 1/4
    result = analyze(arms, "control", weights, tau=0.05, min_lift=0.02, feedback_per_day=200)
    effect, threshold = 0.1 * 0.5, 0.02 * 0.5
    c_var = _smoothed_var(500, 1000)
    for arm_id, x in (("t1", 275), ("t2", 250)):
        r = arm_of(result, arm_id)
        t_var = _smoothed_var(x, 500)
        v = t_var / 500 + c_var / 1000
        assert r.power == pytest.approx(_power(effect, v, 0.0025, 0.025, threshold), rel=1e-9)
        n_req = _n_for_power(effect, t_var + c_var, 0.0025, 0.025, threshold)
        assert r.samples_needed_per_arm == math.ceil(n_req)
        days = max((n_req - 500) / (0.25 * 200), (n_req - 1000) / (0.5 * 200))
        assert r.days_to_decision == pytest.approx(days, rel=1e-6)
    # a negative minimum lift counts as none
    assert arm_of(analyze(arms, "control", weights, tau=0.05, min_lift=-0.05), "t1").power == pytest.approx(
        _power(effect, _smoothed_var(275, 500) / 500 + c_var / 1000, 0.0025, 0.025), rel=1e-9
    )
    # no feedback rate, or none at all: no days
    for rate in (None, 0.0, -10.0):
        assert arm_of(analyze(arms, "control", weights, tau=0.05, feedback_per_day=rate), "t1").days_to_decision is None


def test_days_are_infinite_for_an_arm_without_a_share_and_zero_once_every_arm_has_its_samples() -> None:
    arms = [ArmData("control", 2000, 1000, 500), ArmData("t1", 1000, 500, 275), ArmData("t2", 1000, 500, 260)]
    # t1 is not in the weights: no traffic, never reaches its samples; t2 shares 0.25 / 0.75 of one vote a day
    result = analyze(arms, "control", {"control": 0.5, "t2": 0.25}, tau=0.05, feedback_per_day=1)
    assert arm_of(result, "t1").days_to_decision == math.inf
    c_var = _smoothed_var(500, 1000)
    n_req = _n_for_power(0.05, _smoothed_var(260, 500) + c_var, 0.0025, 0.025)
    days = max((n_req - 500) / (0.25 / 0.75), (n_req - 1000) / (0.5 / 0.75))
    assert arm_of(result, "t2").days_to_decision == pytest.approx(days, rel=1e-6)
    # both arms already past the samples: no days left, even for an arm that gets no traffic now
    done = [ArmData("control", 80000, 40000, 20000), ArmData("t1", 80000, 40000, 22000)]
    t1 = arm_of(analyze(done, "control", {"control": 1.0, "t1": 0.0}, tau=0.05, feedback_per_day=100), "t1")
    assert t1.samples_needed_per_arm is not None and t1.samples_needed_per_arm < 40000
    assert t1.days_to_decision == 0.0


def test_power_at_a_single_vote_per_arm_and_for_a_treatment_without_votes() -> None:
    one = [ArmData("control", 1, 1, 1), ArmData("t1", 1, 1, 0)]
    t1 = arm_of(analyze(one, "control", equal_weights(one), tau=0.05, min_samples=1), "t1")
    v = _smoothed_var(0, 1) + _smoothed_var(1, 1)
    effect = 0.1 * (1 - 1e-6)
    assert t1.power == pytest.approx(_power(effect, v, 0.0025, 0.05), rel=1e-9)
    # a treatment without votes has no power at its n, and its samples are sized on the control's variance
    none = [ArmData("control", 1000, 500, 300), ArmData("t1", 0, 0, 0)]
    t1 = arm_of(analyze(none, "control", equal_weights(none), tau=0.05), "t1")
    assert t1.power is None and t1.diff is None
    c_var = _smoothed_var(300, 500)
    assert t1.samples_needed_per_arm == math.ceil(_n_for_power(0.1 * 0.6, 2 * c_var, 0.0025, 0.05))


def test_the_control_rate_behind_the_target_effect_is_kept_inside_zero_one() -> None:
    # a control at 100%: the effect is target x (1 - 1e-6); at 0%: target x 1e-6
    full = [ArmData("control", 8000, 4000, 4000), ArmData("t1", 8000, 4000, 3800)]
    t1 = arm_of(analyze(full, "control", equal_weights(full), tau=0.05, min_lift=0.088), "t1")
    v = _smoothed_var(3800, 4000) / 4000 + _smoothed_var(4000, 4000) / 4000
    scale = 1 - 1e-6
    expected = _power(0.1 * scale, v, 0.0025, 0.05, 0.088 * scale)
    assert 0.2 < expected < 0.8  # where the power moves fastest with the effect
    assert t1.power == pytest.approx(expected, abs=1e-10)
    empty = [ArmData("control", 8000, 4000, 0), ArmData("t1", 8000, 4000, 10)]
    t1 = arm_of(analyze(empty, "control", equal_weights(empty), tau=0.05), "t1")
    v = _smoothed_var(10, 4000) / 4000 + _smoothed_var(0, 4000) / 4000
    assert t1.power == pytest.approx(_power(0.1 * 1e-6, v, 0.0025, 0.05), rel=1e-9)


def test_a_treatment_whose_power_is_out_of_reach_leaves_the_others_their_samples() -> None:
    # t1's ratings are wild (sd about 300,000): 80% power is out of reach even at 10^13 votes
    arms = [
        _stars("control", 300, 3.5, 1.0),
        _stars("t1", 300, 3.5, 1e11),
        _stars("t2", 30, 3.8, 1.0),
    ]
    result = analyze(arms, "control", equal_weights(arms), metric="avg_stars", tau=0.3, feedback_per_day=60)
    assert arm_of(result, "t1").samples_needed_per_arm is None and arm_of(result, "t1").days_to_decision is None
    n_req = _n_for_power(0.35, 2.0, 0.09, 0.025)
    assert arm_of(result, "t2").samples_needed_per_arm == math.ceil(n_req)
    assert n_req > 30 and arm_of(result, "t2").days_to_decision == pytest.approx((n_req - 30) / 20, rel=1e-6)


# -- per-arm figures -----------------------------------------------------------------------------------------------


def test_feedback_cost_latency_and_fallback_rates_per_arm() -> None:
    arms = [
        ArmData("control", 100, 40, 30, cost_usd_sum=2.5, latency_ms_sum=12500.0, fallbacks=25, sessions=70),
        ArmData("t1", 1, 1, 1, cost_usd_sum=0.5, latency_ms_sum=40.0),
        ArmData("t2", 0, 0, 0),
        ArmData("t3", 0, 0, 0, cost_usd_sum=0.2, latency_ms_sum=300.0, fallbacks=2),
    ]
    result = analyze(arms, "control", equal_weights(arms))
    c = arm_of(result, "control")
    assert (c.feedback_rate, c.cost_per_explanation, c.latency_ms_mean, c.fallback_rate) == pytest.approx(
        (0.4, 0.02, 100.0, 0.2)
    )
    assert (c.exposures, c.n, c.positives, c.fallbacks, c.sessions) == (100, 40, 30, 25, 70)
    assert c.rate == pytest.approx(0.75)
    assert c.rate_ci == pytest.approx(proportion_confint(30, 40, method="wilson"), rel=1e-9)
    t1 = arm_of(result, "t1")
    assert (t1.feedback_rate, t1.cost_per_explanation, t1.latency_ms_mean, t1.fallback_rate) == (1.0, 0.5, 40.0, 0.0)
    assert t1.sessions == 1  # no session count: the exposures
    t2 = arm_of(result, "t2")
    assert (t2.feedback_rate, t2.cost_per_explanation, t2.latency_ms_mean, t2.fallback_rate) == (None,) * 4
    assert (t2.rate, t2.rate_ci, t2.star_mean, t2.effective_n) == (None, None, None, 0.0)
    t3 = arm_of(result, "t3")
    assert (t3.feedback_rate, t3.cost_per_explanation, t3.latency_ms_mean, t3.fallback_rate) == (None, 0.1, 150.0, 1.0)


def test_the_feedback_rate_uses_its_own_counts_when_the_arm_has_them() -> None:
    # the sessions whose votes have had time to arrive: 30 of 60 exposures voted on, whatever the fresher ones did
    arms = [
        ArmData("control", 100, 40, 30, feedback_exposures=60, feedback_n=30),
        ArmData("t1", 100, 40, 30, feedback_exposures=0, feedback_n=0),  # no session old enough yet
        ArmData("t2", 100, 40, 30),
    ]
    result = analyze(arms, "control", equal_weights(arms))
    rates = [arm_of(result, a.arm_id).feedback_rate for a in arms]
    assert rates == [0.5, None, 0.4]
    assert arm_of(result, "control").n == 40  # the other figures keep every vote


# -- status --------------------------------------------------------------------------------------------------------


def test_an_arm_at_min_samples_is_enough_and_one_below_is_not() -> None:
    arms = [ArmData("control", 2, 2, 1), ArmData("t1", 2, 2, 2)]
    at = analyze(arms, "control", equal_weights(arms))
    assert at.status == STATUS_OK and arm_of(at, "t1").diff == pytest.approx(0.5)
    below = analyze(arms, "control", equal_weights(arms), min_samples=3)
    assert below.status == STATUS_INSUFFICIENT
    t1 = arm_of(below, "t1")
    assert (t1.diff, t1.p_value_sequential, t1.lift_ci_sequential, t1.p_value_fixed) == (None, None, None, None)
    # the Bayesian summaries and power are still shown
    assert t1.prob_best is not None and t1.prob_beat_control is not None and t1.power is not None


def test_a_broken_split_is_reported_before_missing_samples() -> None:
    arms = [ArmData("control", 5000, 1, 1), ArmData("t1", 5600, 560, 280)]
    result = analyze(arms, "control", {"control": 0.5, "t1": 0.5})
    assert result.srm_flag and result.status == STATUS_SRM
    assert analyze(arms, "control", {"control": 5000, "t1": 5600}).status == STATUS_INSUFFICIENT


def test_without_a_control_or_a_treatment_nothing_is_compared() -> None:
    arms = [ArmData("a", 1000, 500, 250), ArmData("b", 1000, 500, 300)]
    result = analyze(arms, "control", equal_weights(arms), tau=0.05, feedback_per_day=100)
    assert result.status == STATUS_INSUFFICIENT and result.tau == 0.05
    for r in result.arms:
        assert not r.is_control and not r.secondary_significantly_worse and not r.futile
        assert (r.diff, r.p_value_sequential, r.prob_beat_control, r.power, r.days_to_decision) == (None,) * 5
        assert r.prob_best is not None
    alone = analyze([ArmData("control", 1000, 500, 250)], "control", {"control": 1.0})
    assert alone.status == STATUS_INSUFFICIENT and arm_of(alone, "control").is_control
    assert analyze([], "control", {}).status == STATUS_INSUFFICIENT


def test_the_documented_defaults() -> None:
    # a split with some evidence of mismatch (chi-square p 8e-4, BF about 49): the threshold, the test used and
    # the prior's concentration all show in the result, as do alpha, the target and minimum lift, the draws
    arms = [ArmData("control", 5000, 500, 250), ArmData("t1", 5340, 534, 280)]
    weights = {"control": 0.5, "t1": 0.5}
    explicit = analyze(
        arms,
        "control",
        weights,
        metric="positive_rate",
        alpha=0.05,
        target_lift=0.1,
        min_lift=0.0,
        feedback_per_day=None,
        srm_threshold=0.001,
        srm_sequential=True,
        srm_concentration=1000.0,
        tau=None,
        draws=10_000,
        seed=0,
        min_samples=2,
        recent=None,
        segments=None,
    )
    assert analyze(arms, "control", weights) == explicit
    assert explicit.status == STATUS_OK and not explicit.srm_flag
    assert (explicit.alpha, explicit.target_lift, explicit.min_lift) == (0.05, 0.1, 0.0)


# -- novelty and segments: the arms the checks skip ----------------------------------------------------------------


def _halves(arm_id: str, early: tuple[int, int], recent: tuple[int, int]) -> tuple[ArmData, ArmData]:
    """(the whole arm, its recent half) from (votes, thumbs up) of each half."""
    n, x = early[0] + recent[0], early[1] + recent[1]
    return ArmData(arm_id, n, n, x), ArmData(arm_id, recent[0], recent[0], recent[1])


def _fading_p(c: tuple[tuple[int, int], tuple[int, int]], t: tuple[tuple[int, int], tuple[int, int]]) -> float:
    """One-sided p of the recent lift below the early one: z = (d_early - d_recent) / sqrt(sum of the four V)."""
    (ce, cr), (te, tr) = c, t
    d_e = te[1] / te[0] - ce[1] / ce[0]
    d_r = tr[1] / tr[0] - cr[1] / cr[0]
    v = sum(_smoothed_var(x, n) / n for n, x in (ce, cr, te, tr))
    return float(sps.norm.cdf(-(d_e - d_r) / math.sqrt(v)))


def test_novelty_skips_a_treatment_missing_from_the_recent_half_or_too_small_there_and_tests_the_next() -> None:
    c = ((3000, 1800), (3000, 1800))
    t2 = ((3000, 2250), (3000, 1980))
    control, control_recent = _halves("control", *c)
    gone, gone_recent = _halves("t1", (3000, 2000), (1, 1))
    later, later_recent = _halves("t2", *t2)
    weights = {"control": 1 / 3, "t1": 1 / 3, "t2": 1 / 3}
    for recent in ([control_recent, later_recent], [control_recent, gone_recent, later_recent]):
        result = analyze([control, gone, later], "control", weights, recent=recent, tau=0.05, min_samples=2)
        t1 = arm_of(result, "t1")
        assert (t1.lift_early, t1.lift_recent, t1.novelty_p_value, t1.novelty_flag) == (None, None, None, False)
        r2 = arm_of(result, "t2")
        assert r2.lift_early == pytest.approx(0.15 / 0.6) and r2.lift_recent == pytest.approx(0.06 / 0.6)
        assert r2.novelty_p_value == pytest.approx(_fading_p(c, t2), rel=1e-9) and r2.novelty_flag


def test_novelty_needs_the_control_in_the_recent_half() -> None:
    control, _ = _halves("control", (3000, 1800), (3000, 1800))
    t1, t1_recent = _halves("t1", (3000, 2250), (3000, 1980))
    result = analyze([control, t1], "control", {"control": 0.5, "t1": 0.5}, recent=[t1_recent], tau=0.05)
    r = arm_of(result, "t1")
    assert (r.lift_early, r.lift_recent, r.novelty_p_value, r.novelty_flag) == (None, None, None, False)
    assert r.diff is not None  # the rest of the analysis is there


def test_a_segment_without_the_control_is_skipped_and_a_single_pair_is_tested_at_the_full_alpha() -> None:
    totals = [ArmData("control", 402, 402, 201), ArmData("t1", 404, 404, 242)]
    segments = {
        "A": [ArmData("t1", 2, 2, 0), ArmData("t2", 2, 2, 2)],  # no control: nothing to compare
        "BUY": [ArmData("control", 2, 2, 1), ArmData("t1", 2, 2, 2)],  # at min_samples: tested
        "SELL": [ArmData("control", 400, 400, 200), ArmData("t1", 400, 400, 240)],
    }
    result = analyze(totals, "control", {"control": 0.5, "t1": 0.5}, segments=segments, tau=0.05, alpha=0.1)
    assert [(r.segment, r.arm_id) for r in result.segments] == [("BUY", "t1"), ("SELL", "t1")]
    buy, sell = result.segments
    v_buy = _smoothed_var(2, 2) / 2 + _smoothed_var(1, 2) / 2
    v_sell = _smoothed_var(240, 400) / 400 + _smoothed_var(200, 400) / 400
    p_buy, p_sell = _p_always_valid(0.5, v_buy, 0.0025), _p_always_valid(0.1, v_sell, 0.0025)
    assert p_sell < p_buy  # Holm: the smaller p times 2, the larger times 1 (kept monotone)
    assert sell.p_value == pytest.approx(min(1.0, 2 * p_sell), rel=1e-9)
    assert buy.p_value == pytest.approx(max(min(1.0, 2 * p_sell), p_buy), rel=1e-9)
    h = _half_width(v_sell, 0.0025, 0.1 / 2)  # Bonferroni over the two tested pairs
    assert sell.ci_sequential == pytest.approx((0.1 - h, 0.1 + h), rel=1e-9)
    # with only SELL there is one pair, tested at alpha itself
    one = analyze(
        totals, "control", {"control": 0.5, "t1": 0.5}, segments={"SELL": segments["SELL"]}, tau=0.05, alpha=0.1
    )
    h = _half_width(v_sell, 0.0025, 0.1)
    (only,) = one.segments
    assert only.ci_sequential == pytest.approx((0.1 - h, 0.1 + h), rel=1e-9)
    assert only.p_value == pytest.approx(p_sell, rel=1e-9)


def test_no_segment_disagrees_with_an_overall_difference_of_exactly_zero() -> None:
    totals = [ArmData("control", 2000, 2000, 1000), ArmData("t1", 2000, 2000, 1000)]
    segments = {
        "BUY": [ArmData("control", 1000, 1000, 400), ArmData("t1", 1000, 1000, 600)],
        "SELL": [ArmData("control", 1000, 1000, 600), ArmData("t1", 1000, 1000, 400)],
    }
    result = analyze(totals, "control", {"control": 0.5, "t1": 0.5}, segments=segments, tau=0.05)
    assert arm_of(result, "t1").diff == 0.0
    assert [(r.segment, r.significant, r.disagrees) for r in result.segments] == [
        ("BUY", True, False),
        ("SELL", True, False),
    ]
