"""Frequentist and sequential building blocks, vectorised over numpy arrays so the benchmark can reuse
them: the Wilson interval, the pooled two-proportion z-test, the mixture SPRT (always-valid p-values, confidence
sequences and the mixing sd tuned to an effect), Holm's correction, z-test and mSPRT power and sample sizes, the
session-clustered variance of a ratio metric and its design effect, and the anytime-valid sample-ratio-mismatch
test. The maths is in the package docstring (services/optimizer/stats/__init__.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize
from scipy import stats as sps
from scipy.special import gammaln, ndtr, ndtri

TARGET_POWER = 0.8
# Dirichlet concentration c of the anytime-valid SRM test (prior alpha = c x the intended weights); see the
# module docstring for why 1000.
SRM_CONCENTRATION = 1000.0


def wilson_interval(positives: int, n: int, alpha: float = 0.05) -> tuple[float, float] | None:
    """Wilson score interval: the set of p whose score test |p_hat - p| / sqrt(p(1-p)/n) <= z accepts.

    Solving that quadratic in p gives centre (p_hat + z^2/2n) / (1 + z^2/n) and half-width
    z / (1 + z^2/n) * sqrt(p_hat(1-p_hat)/n + z^2/4n^2). Same numbers as statsmodels' method="wilson".
    """
    if n <= 0:
        return None
    z = float(-ndtri(alpha / 2))
    p = positives / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def smoothed_rate_variance(positives: ArrayLike, n: ArrayLike) -> NDArray[np.float64]:
    """Per-observation variance p(1-p) of a rate, on the smoothed rate (x+1)/(n+2) so it is never zero."""
    p = (np.asarray(positives, dtype=float) + 1.0) / (np.asarray(n, dtype=float) + 2.0)
    return p * (1.0 - p)


def msprt_log_lr(diff: ArrayLike, var: ArrayLike, tau2: ArrayLike) -> NDArray[np.float64]:
    """log of the normal-mixture likelihood ratio Lambda for an estimate `diff` with variance `var`.

    Lambda = sqrt(V/(V+tau^2)) * exp(d^2 tau^2 / (2V(V+tau^2))): the Gaussian likelihood ratio of effect
    theta vs 0, averaged over theta ~ N(0, tau^2).
    """
    d = np.asarray(diff, dtype=float)
    v = np.asarray(var, dtype=float)
    t2 = np.asarray(tau2, dtype=float)
    return 0.5 * np.log(v / (v + t2)) + d * d * t2 / (2.0 * v * (v + t2))


def msprt_tau_for_effect(effect: float, alpha: float) -> float:
    """Mixing sd tau that makes the mSPRT stop soonest when the true effect is `effect` (absolute units).

    The mean path of the estimate crosses the always-valid boundary at the largest variance (the smallest n)
    when r = tau^2 / V solves r = 2 log(1/alpha) + log(1 + r); then tau = |effect| sqrt(r / (1 + r)). The
    fixed point is found by iterating r <- 2 log(1/alpha) + log(1 + r), a contraction (derivative 1/(1 + r)).
    Use the per-comparison alpha (after any Bonferroni split), the level the boundary is checked at.
    """
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    big_l = 2.0 * math.log(1.0 / alpha)
    r = big_l
    for _ in range(200):
        nxt = big_l + math.log1p(r)
        if abs(nxt - r) < 1e-13:
            r = nxt
            break
        r = nxt
    return abs(effect) * math.sqrt(r / (1.0 + r))


def msprt_p_value(diff: ArrayLike, var: ArrayLike, tau2: ArrayLike) -> NDArray[np.float64]:
    """Always-valid p-value min(1, 1/Lambda); valid at any (data-dependent) time it is read."""
    return np.minimum(1.0, np.exp(-msprt_log_lr(diff, var, tau2)))


def msprt_half_width(var: ArrayLike, tau2: ArrayLike, alpha: float) -> NDArray[np.float64]:
    """Half-width of the always-valid confidence sequence: all theta0 with Lambda(d - theta0) < 1/alpha."""
    v = np.asarray(var, dtype=float)
    t2 = np.asarray(tau2, dtype=float)
    return np.sqrt(v * (v + t2) / t2 * (2.0 * math.log(1.0 / alpha) + np.log((v + t2) / v)))


def two_proportion_z_p_value(x1: ArrayLike, n1: ArrayLike, x2: ArrayLike, n2: ArrayLike) -> NDArray[np.float64]:
    """Fixed-horizon pooled two-proportion z-test, two-sided (same as statsmodels proportions_ztest)."""
    x1a, n1a, x2a, n2a = (np.asarray(a, dtype=float) for a in (x1, n1, x2, n2))
    pooled = (x1a + x2a) / (n1a + n2a)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1a + 1 / n2a))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (x1a / n1a - x2a / n2a) / np.where(se > 0, se, 1.0), 0.0)
    return 2 * ndtr(-np.abs(z))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (statsmodels multipletests(method="holm")).

    Sorted ascending, the i-th smallest (0-based) of m is multiplied by (m - i); a running maximum keeps the
    adjusted values monotone, and they are capped at 1. Valid under any dependence between the tests.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def z_test_power(effect_size: float, nobs1: float, alpha: float, ratio: float = 1.0) -> float:
    """Power of a two-sided two-sample z-test (statsmodels NormalIndPower.power).

    The standardized statistic has mean effect_size * sqrt(n_eff), n_eff = 1 / (1/n1 + 1/n2); power is the
    probability it lands beyond either critical value +-z_{alpha/2}.
    """
    n_eff = 1.0 / (1.0 / nobs1 + 1.0 / (nobs1 * ratio))
    crit = float(-ndtri(alpha / 2))
    shift = abs(effect_size) * math.sqrt(n_eff)
    return float(ndtr(shift - crit) + ndtr(-crit - shift))


def z_test_nobs1(effect_size: float, alpha: float, power: float = TARGET_POWER, ratio: float = 1.0) -> float:
    """Sample size of group 1 for `power` (statsmodels zt_ind_solve_power / NormalIndPower.solve_power).

    Start from the one-tail closed form n_eff = ((z_{alpha/2} + z_power) / effect)^2 and solve the exact
    two-tail power equation with a bracketing root finder.
    """
    es = abs(effect_size)
    if es == 0:
        return math.inf
    z_sum = float(-ndtri(alpha / 2) + ndtri(power))
    n_eff = (z_sum / es) ** 2
    guess = n_eff * (1.0 + 1.0 / ratio)
    return float(
        optimize.brentq(lambda n1: z_test_power(es, n1, alpha, ratio) - power, guess * 0.5, guess * 1.5, xtol=1e-10)
    )


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's effect size for proportions, 2 asin(sqrt p1) - 2 asin(sqrt p2) (variance-stabilised)."""
    return 2 * math.asin(math.sqrt(p1)) - 2 * math.asin(math.sqrt(p2))


def ratio_cluster_variance(
    x_sum: ArrayLike, n_sum: ArrayLike, x_sq: ArrayLike, n_sq: ArrayLike, xn: ArrayLike
) -> NDArray[np.float64]:
    """Session-clustered (delta-method) variance of a ratio metric R = sum_i x_i / sum_i n_i over sessions i.

    A rate of votes is a ratio of two per-session sums (thumbs up x_i over votes n_i), and the votes of one
    session are correlated: treating them as independent understates the variance by the design effect. The
    delta method linearises R - r ~ sum_i (x_i - r n_i) / N, so

        Var(R) ~ sum_i (x_i - R n_i)^2 / N^2 = (S_xx - 2 R S_xn + R^2 S_nn) / N^2,

    S_xx = sum x_i^2, S_xn = sum x_i n_i, S_nn = sum n_i^2. This is the cluster-robust sandwich of the
    regression of the votes on an intercept, clustered by session (statsmodels
    `OLS(y, 1).fit(cov_type="cluster", cov_kwds={"groups": s, "use_correction": False})`), and GrowthBook's and
    Eppo's ratio-metric variance up to their K/(K - 1) small-sample factor. With one vote per session it is
    R(1 - R)/N for a rate (S_xx = S_xn = x, S_nn = N). Vectorised; NaN where N = 0.
    """
    x, n, sxx, snn, sxn = (np.asarray(a, dtype=float) for a in (x_sum, n_sum, x_sq, n_sq, xn))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = x / n
        out = (sxx - 2.0 * r * sxn + r * r * snn) / (n * n)
    return np.where(n > 0, np.maximum(out, 0.0), np.nan)


def design_effect(clustered_var: float, independent_var: float) -> float:
    """Clustered over independent variance, floored at 1: a negative within-session correlation (which would
    make sessions worth more than their votes) is not credited, so the analysis never claims more precision
    than independent votes would give. 1 when either is 0 or undefined (no variance to compare)."""
    if not (math.isfinite(clustered_var) and math.isfinite(independent_var)) or independent_var <= 0:
        return 1.0
    ratio = clustered_var / independent_var
    # Rounding: with one vote per session the two agree to the last bits, and the design effect is exactly 1.
    return ratio if ratio > 1.0 + 1e-9 else 1.0


def msprt_power(effect: float, var: float, tau2: float, alpha: float, threshold: float = 0.0) -> float:
    """Power of the test that decides: the probability that the always-valid interval's lower end lies above
    `threshold` (the minimum lift in absolute units) when the estimate is N(effect, var).

    This is the probability at one look at that variance. Under continuous monitoring the interval may clear
    the threshold at an earlier look too, so this is a lower bound on the power of the monitored test: the
    samples and days derived from it err on the long side (the fixed-horizon z-test's figure, used before,
    was about 38% optimistic for the mSPRT).
    """
    if var <= 0 or tau2 <= 0:
        return math.nan
    h = float(msprt_half_width(var, tau2, alpha))
    return float(ndtr((effect - threshold - h) / math.sqrt(var)))


def msprt_samples_per_arm(
    effect: float,
    unit_var: float,
    tau2: float,
    alpha: float,
    power: float = TARGET_POWER,
    threshold: float = 0.0,
) -> float:
    """Samples per arm at which `msprt_power` reaches `power`, the difference's variance being unit_var / n
    (unit_var = the two arms' per-vote variances, design effects included). inf when the effect does not
    exceed the threshold, or the power is out of reach."""
    if effect <= threshold or unit_var <= 0 or tau2 <= 0 or not 0 < power < 1:
        return math.inf

    def gap(log_n: float) -> float:
        return msprt_power(effect, unit_var / math.exp(log_n), tau2, alpha, threshold) - power

    lo, hi = math.log(1e-3), math.log(1e13)
    if gap(hi) < 0:
        return math.inf
    if gap(lo) >= 0:
        return math.exp(lo)
    return math.exp(optimize.brentq(gap, lo, hi, xtol=1e-12))


def srm_log_bayes_factor(
    counts: ArrayLike, weights: ArrayLike, concentration: float = SRM_CONCENTRATION
) -> NDArray[np.float64]:
    """log Bayes factor of a sample ratio mismatch (Lindon & Malek 2022), vectorised over leading axes.

    `counts` (..., k) are the exposures per arm, `weights` (k,) or (..., k) the intended shares (normalised
    here). H1 mixes the multinomial over theta ~ Dirichlet(c p); H0 is the multinomial at p:
    log BF = log G(c) - log G(c + N) + sum_i [log G(c p_i + n_i) - log G(c p_i)] - sum_i n_i log p_i.
    An arm with weight 0 adds nothing while it has no traffic and makes the BF infinite once it has some.
    """
    n = np.asarray(counts, dtype=float)
    p = np.asarray(weights, dtype=float)
    p = p / p.sum(axis=-1, keepdims=True)
    pos = p > 0
    safe_p = np.where(pos, p, 1.0)
    a = concentration * safe_p
    # Cells with p = 0 drop out of both Dirichlet sums; their alpha is excluded from A as well.
    big_a = np.where(pos, a, 0.0).sum(axis=-1)
    total = n.sum(axis=-1)
    cell = np.where(pos, gammaln(a + n) - gammaln(a) - n * np.log(safe_p), 0.0).sum(axis=-1)
    out = gammaln(big_a) - gammaln(big_a + total) + cell
    impossible = (~pos & (n > 0)).any(axis=-1)
    return np.where(impossible, np.inf, out)


def srm_check(
    exposures: Sequence[int],
    weights: Sequence[float],
    threshold: float = 0.001,
    *,
    sequential: bool = True,
    concentration: float = SRM_CONCENTRATION,
) -> tuple[float | None, bool]:
    """Sample-ratio-mismatch test of the exposures against the intended weights; (p-value, flagged).

    sequential=True (default): the anytime-valid Dirichlet-multinomial test (`srm_log_bayes_factor`), p =
    min(1, 1/BF), flagged when BF >= 1/threshold; its false-alarm rate stays below `threshold` however often
    it is re-checked, and it is valid at any sample size. sequential=False: the fixed-horizon Pearson
    chi-square, flagged at p < threshold, which returns (None, False) while any expected count is below 5 (the
    chi-square approximation is poor there) and is only valid when read once.
    Either way: (None, False) without exposures or with fewer than two arms of positive weight, and an arm
    that received traffic with an intended weight of 0 is flagged outright (0.0, True).
    """
    obs = np.asarray(exposures, dtype=float)
    w = np.asarray(weights, dtype=float)
    if obs.shape != w.shape or obs.ndim != 1 or not (np.all(np.isfinite(obs)) and np.all(np.isfinite(w))):
        return None, False
    total = obs.sum()
    if total <= 0 or w.sum() <= 0 or len(obs) < 2:
        return None, False
    w = w / w.sum()
    if np.any((w == 0) & (obs > 0)):
        return 0.0, True
    keep = w > 0
    if keep.sum() < 2:
        return None, False
    if sequential:
        log_bf = float(srm_log_bayes_factor(obs[keep], w[keep], concentration))
        p = 1.0 if log_bf <= 0 else math.exp(-log_bf)
        return p, bool(log_bf >= math.log(1.0 / threshold))
    expected = total * w[keep]
    if np.any(expected < 5):
        return None, False
    p = float(sps.chisquare(obs[keep], expected).pvalue)
    return p, bool(p < threshold)
