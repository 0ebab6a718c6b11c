"""One arm's sample statistics of a metric: the mean, the per-vote variance with the session design effect
applied, and the raw clustered and independent variances of the mean (gbstats' statistics objects, as plain
functions). `subtract_arm` removes a subset of an arm's sessions (the novelty check's early half)."""

from __future__ import annotations

from dataclasses import dataclass

from services.optimizer.stats.frequentist import design_effect, ratio_cluster_variance, smoothed_rate_variance
from services.optimizer.stats.results import METRIC_POSITIVE_RATE, ArmData

MIN_STAR_SD = 0.5  # floor on the star sd used in power / variance when only a few ratings exist


@dataclass(frozen=True)
class Moments:
    """Mean, per-vote variance (design effect included) and count of one metric on one arm (None when
    unavailable); `deff` the design effect, `cluster_var` / `iid_var` the raw variances of the mean with and
    without clustering by session (for the fixed-horizon reference)."""

    mean: float | None
    var: float | None
    n: int
    deff: float = 1.0
    cluster_var: float | None = None
    iid_var: float | None = None


def rate_moments(a: ArmData) -> Moments:
    if a.n <= 0:
        return Moments(None, None, 0)
    p = a.positives / a.n
    iid = p * (1 - p) / a.n
    if a.pos_sq is None or a.n_sq is None or a.pos_cross is None:
        clustered = iid
    else:
        clustered = float(ratio_cluster_variance(a.positives, a.n, a.pos_sq, a.n_sq, a.pos_cross))
    deff = design_effect(clustered, iid)
    return Moments(p, float(smoothed_rate_variance(a.positives, a.n)) * deff, a.n, deff, clustered, iid)


def star_moments(a: ArmData) -> Moments:
    if a.star_n <= 0:
        return Moments(None, None, 0)
    mean = a.star_sum / a.star_n
    ss = max(a.star_sumsq - a.star_n * mean * mean, 0.0)
    var = ss / (a.star_n - 1) if a.star_n > 1 else 0.0
    iid = ss / (a.star_n * a.star_n)
    if a.star_sum_sq is None or a.star_n_sq is None or a.star_cross is None:
        clustered = iid
    else:
        clustered = float(ratio_cluster_variance(a.star_sum, a.star_n, a.star_sum_sq, a.star_n_sq, a.star_cross))
    deff = design_effect(clustered, iid)
    # A handful of identical ratings would claim zero variance; floor the sd so the test stays honest.
    return Moments(mean, max(var, MIN_STAR_SD**2) * deff, a.star_n, deff, clustered, iid)


def metric_moments(metric: str, a: ArmData) -> Moments:
    return rate_moments(a) if metric == METRIC_POSITIVE_RATE else star_moments(a)


def _opt_diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def subtract_arm(total: ArmData, part: ArmData) -> ArmData:
    """The arm's data without `part` (a subset of its sessions): every field is a sum over sessions."""
    return ArmData(
        arm_id=total.arm_id,
        exposures=total.exposures - part.exposures,
        n=total.n - part.n,
        positives=total.positives - part.positives,
        star_n=total.star_n - part.star_n,
        star_sum=total.star_sum - part.star_sum,
        star_sumsq=total.star_sumsq - part.star_sumsq,
        cost_usd_sum=total.cost_usd_sum - part.cost_usd_sum,
        latency_ms_sum=total.latency_ms_sum - part.latency_ms_sum,
        sessions=None if total.sessions is None or part.sessions is None else total.sessions - part.sessions,
        fallbacks=total.fallbacks - part.fallbacks,
        n_sq=_opt_diff(total.n_sq, part.n_sq),
        pos_sq=_opt_diff(total.pos_sq, part.pos_sq),
        pos_cross=_opt_diff(total.pos_cross, part.pos_cross),
        star_n_sq=_opt_diff(total.star_n_sq, part.star_n_sq),
        star_sum_sq=_opt_diff(total.star_sum_sq, part.star_sum_sq),
        star_cross=_opt_diff(total.star_cross, part.star_cross),
    )
