"""`analyze`: every arm's summary and each treatment against the control, from the building blocks of
`frequentist`, `moments` and `bayesian`; with the novelty check (the recent half of the sessions against the
early half) and the per-segment comparisons. Never raises on degenerate data: the result carries a status."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri

from services.optimizer.stats.bayesian import posterior_draws
from services.optimizer.stats.frequentist import (
    SRM_CONCENTRATION,
    TARGET_POWER,
    design_effect,
    holm_adjust,
    msprt_half_width,
    msprt_p_value,
    msprt_power,
    msprt_samples_per_arm,
    msprt_tau_for_effect,
    srm_check,
    srm_log_bayes_factor,
    two_proportion_z_p_value,
    wilson_interval,
)
from services.optimizer.stats.moments import metric_moments, rate_moments, star_moments, subtract_arm
from services.optimizer.stats.results import (
    METRIC_POSITIVE_RATE,
    METRICS,
    STATUS_INSUFFICIENT,
    STATUS_OK,
    STATUS_SRM,
    Analysis,
    ArmData,
    ArmResult,
    SegmentResult,
)
from shared.rows import from_row

# One-sided level of the novelty check (recent lift below the early lift). It only blocks shipping (the experiment
# keeps collecting), so it is set for power: halves of the data hold half the votes each, and a novelty effect
# that has faded still shipped in about a quarter of bench/learning.py's runs at 0.05, 12% at 0.2, 5% at 0.35
# (200 runs each); 0.35 cost the steady +10% arm about 2% more samples.
NOVELTY_ALPHA = 0.3


def _novelty(
    metric: str,
    arms: Sequence[ArmData],
    recent: Sequence[ArmData],
    control_idx: int,
    treatments: Sequence[int],
    alpha: float,
    min_samples: int,
) -> dict[int, tuple[float | None, float | None, float | None, bool]]:
    """Per treatment: (early lift, recent lift, one-sided p, flag) of the test that the lift among the sessions of
    the recent half is smaller than among the early half: z = (d_early - d_recent) / sqrt(V_early + V_recent),
    the two halves holding disjoint sessions (so independent). A fixed-level one-sided z-test at alpha
    (NOVELTY_ALPHA), not an always-valid one, on purpose: the check only blocks shipping (the experiment keeps
    collecting), so flagging too easily costs a little time, while missing a fading effect ships it. The flag is
    also raised when the recent half shows no gain at all (d_recent <= 0)."""
    by_id = {a.arm_id: a for a in recent}
    out: dict[int, tuple[float | None, float | None, float | None, bool]] = {}
    c_total = arms[control_idx]
    c_recent = by_id.get(c_total.arm_id)
    if c_recent is None:
        return out
    ce, cr = metric_moments(metric, subtract_arm(c_total, c_recent)), metric_moments(metric, c_recent)
    for i in treatments:
        t_recent = by_id.get(arms[i].arm_id)
        if t_recent is None:
            continue
        te, tr = metric_moments(metric, subtract_arm(arms[i], t_recent)), metric_moments(metric, t_recent)
        if min(ce.n, cr.n, te.n, tr.n) < min_samples:
            continue
        d_e = te.mean - ce.mean  # type: ignore[operator]
        d_r = tr.mean - cr.mean  # type: ignore[operator]
        v = te.var / te.n + ce.var / ce.n + tr.var / tr.n + cr.var / cr.n  # type: ignore[operator]
        p = float(ndtr(-(d_e - d_r) / math.sqrt(v))) if v > 0 else 1.0
        lift_e = d_e / ce.mean if ce.mean else None
        lift_r = d_r / cr.mean if cr.mean else None
        # A lift that has vanished from the recent half (no gain there at all) is a faded novelty too, even when
        # the halves are too small for the difference to be significant.
        out[i] = (lift_e, lift_r, p, p < alpha or d_r <= 0)
    return out


def _segment_results(
    metric: str,
    segments: Mapping[str, Sequence[ArmData]],
    control_id: str,
    overall_diff: Mapping[str, float],
    alpha: float,
    tau2: float,
    min_samples: int,
) -> tuple[SegmentResult, ...]:
    """Every treatment against the control within each segment, with the overall analysis's always-valid
    test (same mixing sd): p-values Holm-corrected over all (segment, treatment) pairs, intervals at the
    Bonferroni level over the same pairs. A segment disagrees when it is significant in the direction
    opposite to the overall difference. Segments inform; `decide` never reads them."""
    rows: list[dict[str, Any]] = []
    for seg in sorted(segments):
        seg_arms = list(segments[seg])
        control = next((a for a in seg_arms if a.arm_id == control_id), None)
        if control is None:
            continue
        cm = metric_moments(metric, control)
        for a in seg_arms:
            if a.arm_id == control_id:
                continue
            tm = metric_moments(metric, a)
            row: dict[str, Any] = {
                "segment": seg,
                "arm_id": a.arm_id,
                "n": tm.n,
                "control_n": cm.n,
                "rate": tm.mean,
                "control_rate": cm.mean,
                "diff": None,
                "var": None,
            }
            if tm.n >= min_samples and cm.n >= min_samples:
                row["diff"] = tm.mean - cm.mean  # type: ignore[operator]
                row["var"] = tm.var / tm.n + cm.var / cm.n  # type: ignore[operator]
            rows.append(row)
    tested = [r for r in rows if r["diff"] is not None]
    alpha_each = alpha / max(len(tested), 1)
    adjusted = holm_adjust([float(msprt_p_value(r["diff"], r["var"], tau2)) for r in tested])
    for r, p_holm in zip(tested, adjusted, strict=True):
        r["p"] = p_holm
    out = []
    for r in rows:
        d = r["diff"]
        ci = p = None
        significant = disagrees = False
        if d is not None:
            h = float(msprt_half_width(r["var"], tau2, alpha_each))
            ci = (d - h, d + h)
            p = r["p"]
            significant = p < alpha
            overall = overall_diff.get(r["arm_id"])
            disagrees = significant and overall is not None and overall * d < 0
        out.append(
            from_row(
                SegmentResult,
                r,
                lift=d / r["control_rate"] if d is not None and r["control_rate"] else None,
                ci_sequential=ci,
                p_value=p,
                significant=significant,
                disagrees=disagrees,
            )
        )
    return tuple(out)


def analyze(
    arms: Sequence[ArmData],
    control_id: str,
    weights: Mapping[str, float],
    *,
    metric: str = METRIC_POSITIVE_RATE,
    alpha: float = 0.05,
    target_lift: float = 0.10,
    min_lift: float = 0.0,
    futility_alpha: float | None = None,
    feedback_per_day: float | None = None,
    srm_threshold: float = 0.001,
    srm_sequential: bool = True,
    srm_concentration: float = SRM_CONCENTRATION,
    tau: float | None = None,
    draws: int = 10000,
    seed: int = 0,
    min_samples: int = 2,
    recent: Sequence[ArmData] | None = None,
    segments: Mapping[str, Sequence[ArmData]] | None = None,
) -> Analysis:
    """Per-arm summaries and treatment-vs-control comparisons; never raises on degenerate data.

    `weights` are the intended shares of sessions, used for the sample-ratio-mismatch check on the sessions each
    arm was assigned (exposures when the data has no session counts). With adaptive allocation pass the
    session-weighted average of the weights that were in force: each session was assigned with the weights of
    its moment. The SRM flag uses the anytime-valid Dirichlet-multinomial test (concentration
    `srm_concentration`), safe to re-check at every look; `srm_sequential=False` flags on the fixed-horizon
    chi-square instead, which is always reported too.
    Variances are session-clustered (`ratio_cluster_variance`, as a design effect on the per-vote variance).
    `feedback_per_day` (total over all arms) turns the samples still needed into days; `min_lift` (relative)
    is the lift the always-valid interval must clear to ship, used for power, samples and days.
    `futility_alpha`: the level of the always-valid interval a treatment is judged futile on (`futile`: its
    upper end lies below the target lift, and its shown interval does not clear the minimum lift), per treatment
    and without Bonferroni; None: the interval shown.
    Futility never ships anything, so a looser level costs power (a treatment truly at the target is called
    futile with probability at most `futility_alpha` over the whole experiment), never a false win.
    `tau` is the mSPRT mixing sd in absolute metric units; by default `msprt_tau_for_effect` of the design
    effect target_lift x the pooled metric mean at the Bonferroni alpha (about 0.95 x that effect).
    `recent`: the same arms restricted to the sessions of the experiment's recent half (the novelty check);
    `segments`: segment name -> the same arms restricted to that segment (shown, never decided on).
    Status: "SRM" when the split is broken, else "INSUFFICIENT_SAMPLES" when there is no treatment, no
    control, or an arm has fewer than `min_samples` metric observations, else "OK".
    """
    if metric not in METRICS:
        metric = METRIC_POSITIVE_RATE
    arms = list(arms)
    ids = [a.arm_id for a in arms]
    by_sessions = bool(arms) and all(a.sessions is not None for a in arms)
    srm_exp = [int(a.sessions) if by_sessions else a.exposures for a in arms]  # type: ignore[arg-type]
    srm_w = [float(weights.get(i, 0.0)) for i in ids]
    srm_p_fixed, flag_fixed = srm_check(srm_exp, srm_w, srm_threshold, sequential=False)
    srm_p_seq, flag_seq = srm_check(srm_exp, srm_w, srm_threshold, concentration=srm_concentration)
    srm_p, srm_flag = (srm_p_seq, flag_seq) if srm_sequential else (srm_p_fixed, flag_fixed)
    srm_log_bf = None
    if srm_p_seq is not None:
        srm_log_bf = float(srm_log_bayes_factor(srm_exp, srm_w, srm_concentration))

    rate_m = [rate_moments(a) for a in arms]
    star_m = [star_moments(a) for a in arms]
    prim_m, sec_m = (rate_m, star_m) if metric == METRIC_POSITIVE_RATE else (star_m, rate_m)

    control_idx = ids.index(control_id) if control_id in ids else None
    treatments = [i for i in range(len(arms)) if i != control_idx]
    enough = all(m.n >= min_samples for m in prim_m)
    comparable = control_idx is not None and bool(treatments) and enough

    n_treat = max(len(treatments), 1)
    alpha_each = alpha / n_treat  # Bonferroni for p-values, intervals, power and so for the decision

    # Mixing sd: tuned to the target effect in absolute units (on the pooled mean of the success metric) at the
    # level each comparison is tested at.
    pooled_n = sum(m.n for m in prim_m)
    if tau is None and pooled_n > 0:
        pooled = sum(m.mean * m.n for m in prim_m if m.mean is not None) / pooled_n
        base = min(max(pooled, 0.01), 0.99) if metric == METRIC_POSITIVE_RATE else max(pooled, 0.1)
        tau = msprt_tau_for_effect(max(target_lift, 1e-3) * base, alpha_each)
    tau2 = tau * tau if tau else None
    z_fixed = float(-ndtri(0.025))

    # Treatment-vs-control tests on the success metric (and the secondary metric, for the guardrail).
    diff: dict[int, float] = {}
    var: dict[int, float] = {}
    p_seq: dict[int, float] = {}
    p_fixed: dict[int, float] = {}
    v_fixed: dict[int, float] = {}
    sec_worse: dict[int, bool] = {}
    if comparable and tau2:
        c = prim_m[control_idx]  # type: ignore[index]
        for i in treatments:
            t = prim_m[i]
            d = t.mean - c.mean  # type: ignore[operator]
            v = t.var / t.n + c.var / c.n  # type: ignore[operator]
            diff[i], var[i] = d, v
            # Bonferroni: the p-value is below alpha exactly when the displayed interval excludes 0.
            p_seq[i] = min(1.0, n_treat * float(msprt_p_value(d, v, tau2)))
            if metric == METRIC_POSITIVE_RATE:
                ct = arms[control_idx]  # type: ignore[index]
                p_pooled = float(two_proportion_z_p_value(arms[i].positives, arms[i].n, ct.positives, ct.n))
                # Reference interval on the raw clustered variance (statsmodels' cluster-robust OLS; with one
                # vote per session the Wald interval, as proportion_confint's method="wald" on each arm).
                v_fixed[i] = t.cluster_var + c.cluster_var  # type: ignore[operator]
                deff = design_effect(v_fixed[i], t.iid_var + c.iid_var)  # type: ignore[operator]
                if deff == 1.0:
                    p_fixed[i] = p_pooled
                else:  # the pooled z statistic deflated by the difference's design effect
                    p_fixed[i] = float(2 * ndtr(-float(-ndtri(p_pooled / 2)) / math.sqrt(deff)))
            else:
                v_fixed[i] = v
                p_fixed[i] = float(2 * ndtr(-abs(d) / math.sqrt(v)))
    if control_idx is not None:
        sc = sec_m[control_idx]
        for i in treatments:
            st = sec_m[i]
            if sc.n >= min_samples and st.n >= min_samples and sc.mean is not None and st.mean is not None:
                d2 = st.mean - sc.mean
                v2 = st.var / st.n + sc.var / sc.n  # type: ignore[operator]
                sec_tau = max(target_lift, 1e-3) * max(abs(sc.mean), 0.01)
                sec_worse[i] = d2 < 0 and float(msprt_p_value(d2, v2, sec_tau**2)) < alpha

    # Bayesian summaries over all arms at once.
    prob_best: list[float | None] = [None] * len(arms)
    loss: list[float | None] = [None] * len(arms)
    beat: dict[int, float] = {}
    post = posterior_draws(metric, arms, prim_m, draws, seed) if arms else None
    if post is not None:
        best = post.argmax(axis=1)
        counts = np.bincount(best, minlength=len(arms)) / post.shape[0]
        top = post.max(axis=1)
        for i in range(len(arms)):
            prob_best[i] = float(counts[i])
            loss[i] = float(np.mean(top - post[:, i]))
        if control_idx is not None:
            for i in treatments:
                beat[i] = float(np.mean(post[:, i] > post[:, control_idx]))

    # Power, samples and days of the test that decides: the always-valid interval (Bonferroni alpha, this tau)
    # clearing the minimum lift when the true lift is the target lift; clustered variances.
    power: dict[int, float] = {}
    needed: dict[int, int] = {}
    days: dict[int, float] = {}
    if control_idx is not None and prim_m[control_idx].mean is not None and tau2:
        c = prim_m[control_idx]
        scale = abs(c.mean)  # type: ignore[arg-type]
        if metric == METRIC_POSITIVE_RATE:
            scale = min(max(scale, 1e-6), 1 - 1e-6)
        effect, threshold = target_lift * scale, max(min_lift, 0.0) * scale
        w_total = sum(float(weights.get(i, 0.0)) for i in ids) or 1.0
        for i in treatments:
            t = prim_m[i]
            if t.n > 0 and c.n > 0:
                power[i] = msprt_power(effect, t.var / t.n + c.var / c.n, tau2, alpha_each, threshold)  # type: ignore[operator]
            unit = (t.var if t.var is not None else c.var) + c.var  # type: ignore[operator]
            n_req = msprt_samples_per_arm(effect, unit, tau2, alpha_each, TARGET_POWER, threshold)
            if not math.isfinite(n_req):
                continue
            needed[i] = math.ceil(n_req)
            if feedback_per_day and feedback_per_day > 0:
                short = []
                for j in (i, control_idx):
                    share = float(weights.get(ids[j], 0.0)) / w_total
                    missing = max(n_req - prim_m[j].n, 0.0)
                    short.append(0.0 if missing == 0 else (missing / (share * feedback_per_day) if share else math.inf))
                days[i] = max(short)

    novelty = (
        _novelty(metric, arms, recent, control_idx, treatments, NOVELTY_ALPHA, min_samples)
        if recent is not None and comparable and control_idx is not None
        else {}
    )

    results = []
    for i, a in enumerate(arms):
        m = prim_m[i]
        is_control = i == control_idx
        lift = None
        ci_seq = ci_fixed = ci_rel = None
        futile = False
        if i in diff:
            assert tau2 is not None  # a difference is computed only with a prior scale
            c_mean = prim_m[control_idx].mean  # type: ignore[index]
            lift = diff[i] / c_mean if c_mean else None
            h = float(msprt_half_width(var[i], tau2, alpha_each))
            ci_seq = (diff[i] - h, diff[i] + h)
            ci_rel = (ci_seq[0] / c_mean, ci_seq[1] / c_mean) if c_mean else None
            hf = z_fixed * math.sqrt(v_fixed[i])
            ci_fixed = (diff[i] - hf, diff[i] + hf)
            # A treatment the decision would ship (its interval clears the minimum lift) is never futile, though a
            # looser futility interval may end below the target: it must keep its traffic while it waits.
            h_fut = h if futility_alpha is None else float(msprt_half_width(var[i], tau2, futility_alpha))
            wins = ci_seq[0] > max(min_lift, 0.0) * abs(c_mean or 0.0)
            futile = not wins and diff[i] + h_fut < target_lift * abs(c_mean or 0.0)
        served = a.exposures + a.fallbacks
        nov = novelty.get(i, (None, None, None, False))
        results.append(
            ArmResult(
                arm_id=a.arm_id,
                is_control=is_control,
                exposures=a.exposures,
                n=a.n,
                positives=a.positives,
                rate=rate_m[i].mean,
                rate_ci=wilson_interval(a.positives, a.n),
                star_mean=star_m[i].mean,
                feedback_rate=_feedback_rate(a),
                cost_per_explanation=a.cost_usd_sum / served if served > 0 else None,
                latency_ms_mean=a.latency_ms_sum / served if served > 0 else None,
                lift=lift,
                lift_ci_sequential=ci_seq,
                lift_ci_fixed=ci_fixed,
                p_value_sequential=p_seq.get(i),
                p_value_fixed=p_fixed.get(i),
                prob_beat_control=beat.get(i),
                prob_best=prob_best[i],
                expected_loss=loss[i],
                power=power.get(i),
                samples_needed_per_arm=needed.get(i),
                days_to_decision=days.get(i),
                metric_n=m.n,
                star_n=a.star_n,
                diff=diff.get(i),
                secondary_significantly_worse=sec_worse.get(i, False),
                sessions=int(a.sessions) if a.sessions is not None else a.exposures,
                design_effect=m.deff,
                effective_n=m.n / m.deff,
                fallbacks=a.fallbacks,
                fallback_rate=a.fallbacks / served if served > 0 else None,
                lift_ci_relative=ci_rel,
                futile=futile,
                lift_early=nov[0],
                lift_recent=nov[1],
                novelty_p_value=nov[2],
                novelty_flag=nov[3],
            )
        )

    segment_results: tuple[SegmentResult, ...] = ()
    if segments and tau2 and control_idx is not None:
        segment_results = _segment_results(
            metric, segments, control_id, {ids[i]: d for i, d in diff.items()}, alpha, tau2, min_samples
        )

    if srm_flag:
        status = STATUS_SRM
    elif not comparable:
        status = STATUS_INSUFFICIENT
    else:
        status = STATUS_OK
    return Analysis(
        status=status,
        metric=metric,
        control_id=control_id,
        arms=tuple(results),
        srm_p_value=srm_p,
        srm_flag=srm_flag,
        alpha=alpha,
        tau=tau,
        srm_p_value_fixed=srm_p_fixed,
        srm_log_bayes_factor=srm_log_bf,
        srm_sequential=srm_sequential,
        srm_unit="sessions" if by_sessions else "exposures",
        target_lift=target_lift,
        min_lift=min_lift,
        segments=segment_results,
    )


def _feedback_rate(a: ArmData) -> float | None:
    """Votes per own-model explanation, on the counts of the sessions whose votes have had time to arrive when
    the arm has them (`ArmData.feedback_exposures`), else on all; None without exposures to divide by."""
    n, exposures = (a.n, a.exposures) if a.feedback_exposures is None else (a.feedback_n or 0, a.feedback_exposures)
    return n / exposures if exposures > 0 else None
