"""Experiment statistics for the optimizer: pure functions over plain counts (gbstats style).

No I/O, no clocks, no randomness except seeded Monte Carlo. Degenerate data never raises: results carry a
`status` ("OK", "INSUFFICIENT_SAMPLES", "SRM") and `None` where a number cannot be computed.

The maths, in one place:

* The session is the unit of assignment (the router is sticky per session) and so of analysis. Per arm the
  inputs are sums over sessions of per-session totals (explanations, votes, thumbs up, stars) and their second
  moments. The success metric is either the thumbs-up rate (`positive_rate`) or the mean of the 1-5 star
  ratings (`avg_stars`), each a ratio of two per-session sums. Its variance is session-clustered by the delta
  method (`ratio_cluster_variance`, as GrowthBook and Eppo do for ratio metrics; equal to statsmodels'
  cluster-robust OLS), applied as a design effect deff = clustered / independent variance (floored at 1) on the
  per-vote variance: V = deff s^2 / n. With one vote per session deff = 1 and every figure is the per-vote one.
  Rates carry a Wilson 95% interval (per vote, for display).
* Treatment vs control is judged on the absolute difference of the metric, d = m_t - m_c, whose variance is
  estimated by plug-in: V = deff_t s_t^2/n_t + deff_c s_c^2/n_c (for rates s^2 = p(1-p), computed on lightly
  smoothed rates (x+1)/(n+2) so that an all-positive arm does not claim zero variance).
* Why always-valid: the dashboard and the optimizer look at the numbers after every batch. A plain z-test
  re-checked at every look has a false-positive rate far above its nominal 5% (it eventually crosses 1.96 by
  chance). The mixture sequential probability ratio test (mSPRT; Robbins 1970, Johari, Pekelis & Walsh
  2017 "Always valid inference", Howard et al. 2021) replaces the fixed-n likelihood ratio by its average over
  a N(0, tau^2) prior on the effect. For a Gaussian estimate d with variance V that average has the closed form

      Lambda = sqrt(V / (V + tau^2)) * exp( d^2 tau^2 / (2 V (V + tau^2)) )

  and under H0 (d = 0) Lambda is a non-negative martingale with mean 1, so by Ville's inequality
  P(Lambda ever exceeds 1/alpha) <= alpha. Hence p = min(1, 1/Lambda) is a p-value that stays valid whenever
  it is read, and inverting the test gives a confidence sequence (an interval valid at all times at once):

      d +- sqrt( V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)) ).

  The mixing variance tau^2 sets where the test is most sensitive: the boundary, in z units, is smallest when
  tau^2 / V = 2 log(1/alpha) + log(1 + tau^2 / V), which for alpha around 0.02-0.05 is about 8-11.
  Choosing tau for the design effect delta (the minimum detectable effect, target_lift x the pooled baseline;
  Johari et al. 2017 sec. 4, Howard et al. 2021 sec. 3.5): the mean path of d reaches the boundary when
  delta^2 / V = (1 + V/tau^2) (2 log(1/alpha) + log(1 + tau^2/V)). Writing r = tau^2/V, the variance at that
  crossing is V = delta^2 r / ((1 + r)(2 log(1/alpha) + log(1 + r))), and the latest crossing variance (the
  fewest samples, V falling as 1/n) is at the r* solving r = 2 log(1/alpha) + log(1 + r) -- the same r that
  minimises the boundary -- so tau* = delta sqrt(r* / (1 + r*)), about 0.95 delta at alpha 0.05/3
  (`msprt_tau_for_effect`). Over the random path (a simulation of bench/learning.py's design: 4 arms, rate
  0.6 vs 0.66, alpha 0.05/3, 3 x 3000 runs) the average sample number is flat around it: the minimum is near
  1.2 delta and within 1% of it for tau between 0.95 and 1.5 delta; 2-3% worse at 0.8 or 2 delta, 13% at 0.5.
  A caller that knows the baseline up front can pass `tau` fixed, which keeps the mixture strictly
  pre-specified (the pooled baseline moves little, so the default's effect on validity is second order).
* Several treatments: the always-valid p-values and confidence sequences are both Bonferroni-corrected
  (alpha / number of treatments), and the decision reads the interval: p < alpha exactly when the displayed
  interval excludes 0, so an arm never ships while the interval shown contains 0. (Holm would reject a little
  more after a first rejection but gives no simultaneous intervals; the decision stops at the first winner.)
* Decisions on the interval: ship when it lies above the minimum lift, keep the control when it lies below,
  stop for futility when every treatment's interval lies below the target lift (`decide`).
* Reference numbers for the dashboard: the fixed-horizon pooled two-proportion z-test (deflated by the
  difference's design effect; Welch z for stars) and the 95% interval on the difference with the clustered
  variance (the Wald interval at one vote per session). Only valid if read once, at a pre-planned sample size.
* Bayesian summaries: Beta(1 + x/deff, 1 + (n - x)/deff) posteriors for rates (votes at their effective
  number; a normal approximation N(mean, V) for stars), sampled with a fixed seed; probability to beat
  control, probability to be best, and expected loss E[max_j m_j - m_i].
* Power, samples and days are those of the test that decides (`msprt_power`): the probability that the
  always-valid interval (Bonferroni alpha, this tau, clustered variances) clears the minimum lift when the
  true lift is the target lift, at the current variance; samples per arm for 80% of it, and the days to reach
  them at the current feedback rate. At one look this is a lower bound on the monitored test's power.
* Novelty: the lift among the sessions first served in the recent half against the early half (`_novelty`).
* Segments (one per signal): the same always-valid comparison within each, Holm over segments x treatments,
  flagged when significant against the overall direction; never used by `decide`.
* Sample ratio mismatch (a broken split invalidates every other number): the optimizer re-checks it at every
  look, so it uses the anytime-valid Dirichlet-multinomial test of Lindon & Malek (2022, "Anytime-valid
  inference for multinomial count data"). Under H0 the exposures n (total N) are multinomial with the intended
  proportions p; the alternative averages the multinomial over theta ~ Dirichlet(alpha), alpha = c p (centred
  on H0). The Bayes factor of the counts is a ratio of marginal likelihoods (the multinomial coefficient cancels):

      log BF_N = log G(A) - log G(A + N) + sum_i [log G(alpha_i + n_i) - log G(alpha_i)] - sum_i n_i log p_i,

  A = sum_i alpha_i, G = Gamma. Unit by unit it is a product of posterior-predictive / null probabilities, a
  non-negative martingale with mean 1 under H0, so by Ville's inequality P(BF ever reaches 1/a) <= a: flagging
  at BF >= 1/threshold keeps the false-alarm rate over unlimited looks below `threshold`, and
  p = min(1, 1/BF) is an anytime-valid p-value (the current BF rather than its running maximum: valid, a
  little conservative, and needs no history). The concentration c (SRM_CONCENTRATION = 1000) sets the mismatch
  the test is tuned for: theta_i has prior sd sqrt(p_i (1 - p_i) / (c + 1)), 0.014 = 5.5% relative on a 25%
  arm, the size of broken split worth catching at this service's traffic (tens of thousands of exposures).
  Simulated (4 equal arms, 333 exposures a look, flag at 0.001, one arm's weight x 1.10 then renormalised): the
  mismatch is flagged after a median 35 looks at c = 1000 (38 at c = 300, 44 at 10000, 57 at 10); with x 1.05,
  within 200 looks in 76% of runs (56% at c = 100, 88% at 10000). c between 300 and 3000 is within ~10% of the
  best for the larger mismatch; ssrm's default 10000 (web-scale traffic) is slower on it and better only on
  the smaller one. A mismatch far from the design is still caught, just later (the prior has full support).
  The SRM test counts sessions (a session asking for many explanations is one assignment). With adaptive
  allocation H0 is a sum of multinomials at the weights in force, tested against their session-weighted
  average (each session against the weights it was assigned with): the sum is less dispersed than that multinomial, and in simulation (Thompson-like
  weights, 20000 runs x 160 looks) it flags 0.05% of healthy runs where the chi-square re-checked at every look
  flags 1.8%. The Pearson chi-square p-value is still reported for reference (`srm_p_value_fixed`); it is
  valid only when read once, and is used for the flag only with `srm_sequential=False`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize
from scipy import stats as sps
from scipy.special import gammaln, ndtr, ndtri

STATUS_OK = "OK"
STATUS_INSUFFICIENT = "INSUFFICIENT_SAMPLES"
STATUS_SRM = "SRM"

METRIC_POSITIVE_RATE = "positive_rate"
METRIC_AVG_STARS = "avg_stars"
METRICS = (METRIC_POSITIVE_RATE, METRIC_AVG_STARS)

DECISION_COLLECTING = "collecting"
DECISION_UNHEALTHY = "unhealthy"
DECISION_SHIP = "ship"
DECISION_KEEP_CONTROL = "keep_control"
DECISION_INCONCLUSIVE = "inconclusive"

TARGET_POWER = 0.8
# Dirichlet concentration c of the anytime-valid SRM test (prior alpha = c x the intended weights); see the
# module docstring for why 1000.
SRM_CONCENTRATION = 1000.0
# One-sided level of the novelty check (recent lift below the early lift). It only blocks shipping (the experiment
# keeps collecting), so it is set for power: halves of the data hold half the votes each, and a novelty effect
# that has faded still shipped in about a quarter of bench/learning.py's runs at 0.05, 12% at 0.2, 5% at 0.35
# (200 runs each); 0.35 cost the steady +10% arm about 2% more samples.
NOVELTY_ALPHA = 0.3
_MIN_STAR_SD = 0.5  # floor on the star sd used in power / variance when only a few ratings exist


@dataclass(frozen=True)
class ArmData:
    """What one arm collected. The session is the unit of assignment and of analysis: the vote sums below are
    sums over the arm's sessions of per-session totals, and the `*_sq` / `*_cross` fields their second moments
    (sum over sessions of n_i^2, x_i^2, x_i n_i), which give the session-clustered (delta-method) variance of
    the ratio metrics. Left as None they mean "every vote its own session" (independent votes), and every
    figure is then exactly what the per-vote analysis gives."""

    arm_id: str
    exposures: int  # explanations served by this arm's own model (fallback-served ones excluded)
    n: int  # feedback events (thumbs) on those explanations
    positives: int  # thumbs up
    star_n: int = 0
    star_sum: float = 0.0
    star_sumsq: float = 0.0  # sum of squared ratings, vote by vote
    cost_usd_sum: float = 0.0  # over everything the arm served (its exposures and its fallbacks)
    latency_ms_sum: float = 0.0  # likewise
    sessions: int | None = None  # sessions assigned to the arm (the SRM unit); None: exposures
    fallbacks: int = 0  # explanations a fallback model wrote for this arm (not in exposures, votes on them dropped)
    n_sq: float | None = None  # sum over sessions of (votes in the session)^2
    pos_sq: float | None = None  # sum over sessions of (thumbs up in the session)^2
    pos_cross: float | None = None  # sum over sessions of votes x thumbs up
    star_n_sq: float | None = None  # sum over sessions of (ratings in the session)^2
    star_sum_sq: float | None = None  # sum over sessions of (sum of the session's ratings)^2
    star_cross: float | None = None  # sum over sessions of ratings x their sum


@dataclass(frozen=True)
class ArmResult:
    arm_id: str
    is_control: bool
    exposures: int
    n: int
    positives: int
    rate: float | None
    rate_ci: tuple[float, float] | None  # Wilson 95%
    star_mean: float | None
    feedback_rate: float | None  # n / exposures
    cost_per_explanation: float | None
    latency_ms_mean: float | None
    lift: float | None  # relative (m_t - m_c)/m_c for treatments, None for control (m = the success metric)
    lift_ci_sequential: tuple[float, float] | None  # always-valid CS on the absolute difference, Bonferroni
    lift_ci_fixed: tuple[float, float] | None  # fixed-horizon 95% interval on the absolute difference
    p_value_sequential: float | None  # always-valid, Bonferroni-corrected across treatments (as the interval)
    p_value_fixed: float | None  # uncorrected fixed-horizon two-sided z-test (reference)
    prob_beat_control: float | None
    prob_best: float | None
    expected_loss: float | None
    power: float | None  # power at the current n to detect target_lift
    samples_needed_per_arm: int | None  # fixed-horizon n per arm for 80% power at target_lift
    days_to_decision: float | None
    # Additions (defaults keep the original constructor valid):
    metric_n: int = 0  # samples behind the success metric (n for positive_rate, star_n for avg_stars)
    star_n: int = 0
    diff: float | None = None  # absolute difference of the success metric vs control
    # The other metric (stars when the success metric is thumbs, and vice versa) is worse than control
    # under the always-valid test at alpha (uncorrected, which is the cautious side for a guardrail).
    secondary_significantly_worse: bool = False
    # Session-level analysis (defaults describe independent votes):
    sessions: int = 0  # sessions assigned to the arm (the SRM unit)
    design_effect: float = 1.0  # clustered / independent variance of the success metric (>= 1)
    effective_n: float = 0.0  # metric_n / design_effect: what the votes are worth as independent ones
    fallbacks: int = 0
    fallback_rate: float | None = None  # fallbacks / everything the arm served
    lift_ci_relative: tuple[float, float] | None = None  # lift_ci_sequential / the control's mean
    futile: bool = False  # the always-valid interval lies wholly below the target lift
    lift_early: float | None = None  # relative lift among the sessions of the first half of the experiment
    lift_recent: float | None = None  # ... of the second half
    novelty_p_value: float | None = None  # one-sided test that the recent lift is smaller than the early one
    novelty_flag: bool = False  # the recent lift is significantly smaller: a fading novelty effect


@dataclass(frozen=True)
class SegmentResult:
    """One treatment against the control within one segment (a signal: BUY, SELL, HOLD)."""

    segment: str
    arm_id: str
    n: int  # votes on the treatment in the segment
    control_n: int
    rate: float | None  # treatment's success metric in the segment
    control_rate: float | None
    diff: float | None
    lift: float | None
    ci_sequential: tuple[float, float] | None  # always-valid, Bonferroni over treatments x segments
    p_value: float | None  # always-valid, Holm over treatments x segments
    significant: bool
    disagrees: bool  # significant in the opposite direction of the overall difference


@dataclass(frozen=True)
class Analysis:
    status: str  # "OK" | "INSUFFICIENT_SAMPLES" | "SRM"
    metric: str  # "positive_rate" | "avg_stars"
    control_id: str
    arms: tuple[ArmResult, ...]
    srm_p_value: float | None  # the p-value the flag uses: anytime-valid (1/BF) by default
    srm_flag: bool
    alpha: float
    tau: float | None = None  # mixing sd of the mSPRT actually used (absolute metric units)
    srm_p_value_fixed: float | None = None  # Pearson chi-square p (reference; valid only if read once)
    srm_log_bayes_factor: float | None = None  # log BF of the Dirichlet-multinomial SRM test (evidence of SRM)
    srm_sequential: bool = True  # whether srm_flag / srm_p_value come from the anytime-valid test
    srm_unit: str = "sessions"  # what the SRM test counts ("sessions" or, on old data, "exposures")
    target_lift: float = 0.10
    min_lift: float = 0.0  # relative lift the interval must clear to ship
    correction: str = "bonferroni"  # for the always-valid p-values and intervals, and so for the decision
    segments: tuple[SegmentResult, ...] = ()

    def arm(self, arm_id: str) -> ArmResult | None:
        return next((a for a in self.arms if a.arm_id == arm_id), None)


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
    # target lift; in adaptive mode such an arm stops receiving traffic.
    futility: bool = True
    novelty_check: bool = True  # block shipping while the recent lift is significantly below the early one


@dataclass(frozen=True)
class Decision:
    status: str  # "collecting" | "unhealthy" | "ship" | "keep_control" | "inconclusive"
    arm_id: str | None  # the arm to ship (or the control for keep_control)
    reason: str  # human readable


# --------------------------------------------------------------------------------------------------------
# Building blocks (vectorised over numpy arrays so the benchmark can reuse them)
# --------------------------------------------------------------------------------------------------------


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


def beta_draws(positives: ArrayLike, n: ArrayLike, draws: int, rng: np.random.Generator) -> NDArray[np.float64]:
    """Posterior draws (draws x arms) of each arm's rate under a uniform Beta(1, 1) prior."""
    x = np.asarray(positives, dtype=float)
    nn = np.asarray(n, dtype=float)
    return rng.beta(1.0 + x, 1.0 + nn - x, size=(draws, len(x)))


def top_two_weights(prob_best: ArrayLike, beta: float = 0.5) -> NDArray[np.float64]:
    """Allocation of top-two Thompson sampling (Russo 2020) given each arm's probability to be best.

    With probability beta play the Thompson leader, otherwise resample until a different arm leads (the
    challenger). So w_i = beta p_i + (1 - beta) sum_{j != i} p_j p_i / (1 - p_j).
    """
    p = np.asarray(prob_best, dtype=float)
    k = len(p)
    if k == 1:
        return np.ones(1)
    w = beta * p
    for j in range(k):
        others = np.arange(k) != j
        rest = 1.0 - p[j]
        if rest > 1e-12:
            w[others] += (1 - beta) * p[j] * p[others] / rest
        else:  # arm j is surely best: the challenger is uniform over the rest
            w[others] += (1 - beta) * p[j] / (k - 1)
    return w / w.sum()


def apply_floor(weights: ArrayLike, floor: float) -> NDArray[np.float64]:
    """Mix with the uniform so every arm keeps at least `floor` of the traffic (and weights sum to 1)."""
    w = np.asarray(weights, dtype=float)
    k = len(w)
    floor = min(max(floor, 0.0), 1.0 / k)
    w = w / w.sum()
    return floor + (1.0 - k * floor) * w


# --------------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Moments:
    """Mean, per-vote variance (design effect included) and count of one metric on one arm (None when
    unavailable); `deff` the design effect, `cluster_var` / `iid_var` the raw variances of the mean with and
    without clustering by session (for the fixed-horizon reference)."""

    mean: float | None
    var: float | None
    n: int
    deff: float = 1.0
    cluster_var: float | None = None
    iid_var: float | None = None


def _rate_moments(a: ArmData) -> _Moments:
    if a.n <= 0:
        return _Moments(None, None, 0)
    p = a.positives / a.n
    iid = p * (1 - p) / a.n
    if a.pos_sq is None or a.n_sq is None or a.pos_cross is None:
        clustered = iid
    else:
        clustered = float(ratio_cluster_variance(a.positives, a.n, a.pos_sq, a.n_sq, a.pos_cross))
    deff = design_effect(clustered, iid)
    return _Moments(p, float(smoothed_rate_variance(a.positives, a.n)) * deff, a.n, deff, clustered, iid)


def _star_moments(a: ArmData) -> _Moments:
    if a.star_n <= 0:
        return _Moments(None, None, 0)
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
    return _Moments(mean, max(var, _MIN_STAR_SD**2) * deff, a.star_n, deff, clustered, iid)


def _moments(metric: str, a: ArmData) -> _Moments:
    return _rate_moments(a) if metric == METRIC_POSITIVE_RATE else _star_moments(a)


def _posterior_draws(
    metric: str, arms: Sequence[ArmData], moments: Sequence[_Moments], draws: int, seed: int
) -> NDArray[np.float64] | None:
    """Posterior draws (draws x arms). Rates: Beta(1 + x/deff, 1 + (n - x)/deff), i.e. the votes counted at
    their effective number (Kish's design effect): with one vote per session the plain Beta posterior."""
    rng = np.random.default_rng(seed)
    if metric == METRIC_POSITIVE_RATE:
        deff = np.array([m.deff for m in moments], dtype=float)
        pos = np.array([a.positives for a in arms], dtype=float) / deff
        n = np.array([a.n for a in arms], dtype=float) / deff
        return beta_draws(pos, n, draws, rng)
    if any(m.mean is None or m.var is None or m.n < 2 for m in moments):
        return None
    means = np.array([m.mean for m in moments], dtype=float)
    sds = np.sqrt(np.array([m.var / m.n for m in moments if m.var is not None], dtype=float))  # every one
    return rng.normal(means, sds, size=(draws, len(arms)))


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
    ce, cr = _moments(metric, subtract_arm(c_total, c_recent)), _moments(metric, c_recent)
    for i in treatments:
        t_recent = by_id.get(arms[i].arm_id)
        if t_recent is None:
            continue
        te, tr = _moments(metric, subtract_arm(arms[i], t_recent)), _moments(metric, t_recent)
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
        cm = _moments(metric, control)
        for a in seg_arms:
            if a.arm_id == control_id:
                continue
            tm = _moments(metric, a)
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
            SegmentResult(
                segment=r["segment"],
                arm_id=r["arm_id"],
                n=r["n"],
                control_n=r["control_n"],
                rate=r["rate"],
                control_rate=r["control_rate"],
                diff=d,
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

    rate_m = [_rate_moments(a) for a in arms]
    star_m = [_star_moments(a) for a in arms]
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
    post = _posterior_draws(metric, arms, prim_m, draws, seed) if arms else None
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
            futile = ci_seq[1] < target_lift * abs(c_mean or 0.0)
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
                feedback_rate=a.n / a.exposures if a.exposures > 0 else None,
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


# --------------------------------------------------------------------------------------------------------
# Decision
# --------------------------------------------------------------------------------------------------------


def _guardrail_failures(arm: ArmResult, control: ArmResult, config: DecisionConfig) -> list[str]:
    """Reasons this treatment may not ship even if it wins on the success metric. Cost and latency are
    compared as ratios to the control, or as absolute differences when the control's figure is 0 (an offline
    or local control), where a ratio would say nothing."""
    fails = []
    other = "star mean" if config.metric == METRIC_POSITIVE_RATE else "positive rate"
    if arm.secondary_significantly_worse:
        fails.append(f"{other} significantly worse than control")
    if (
        config.min_feedback_rate_ratio is not None
        and arm.feedback_rate is not None
        and control.feedback_rate
        and arm.feedback_rate / control.feedback_rate < config.min_feedback_rate_ratio
    ):
        ratio = arm.feedback_rate / control.feedback_rate
        fails.append(f"feedback rate {ratio:.2f}x control (< {config.min_feedback_rate_ratio:g}x)")
    if arm.cost_per_explanation is not None and control.cost_per_explanation is not None:
        if control.cost_per_explanation > 0:
            ratio = arm.cost_per_explanation / control.cost_per_explanation
            if config.max_cost_ratio is not None and ratio > config.max_cost_ratio:
                fails.append(f"cost {ratio:.2f}x control (> {config.max_cost_ratio:g}x)")
        elif config.max_cost_increase_usd is not None:
            extra = arm.cost_per_explanation - control.cost_per_explanation
            if extra > config.max_cost_increase_usd:
                fails.append(
                    f"cost ${arm.cost_per_explanation:.4g} per explanation against a $0 control "
                    f"(> +${config.max_cost_increase_usd:g})"
                )
    if arm.latency_ms_mean is not None and control.latency_ms_mean is not None:
        if control.latency_ms_mean > 0:
            ratio = arm.latency_ms_mean / control.latency_ms_mean
            if config.max_latency_ratio is not None and ratio > config.max_latency_ratio:
                fails.append(f"latency {ratio:.2f}x control (> {config.max_latency_ratio:g}x)")
        elif config.max_latency_increase_ms is not None:
            extra = arm.latency_ms_mean - control.latency_ms_mean
            if extra > config.max_latency_increase_ms:
                fails.append(
                    f"latency {arm.latency_ms_mean:.0f} ms against a 0 ms control (> +{config.max_latency_increase_ms:g} ms)"
                )
    if config.max_fallback_rate_increase is not None and arm.fallback_rate is not None:
        extra = arm.fallback_rate - (control.fallback_rate or 0.0)
        if extra > config.max_fallback_rate_increase:
            fails.append(
                f"fallback rate {arm.fallback_rate:.1%} vs control {control.fallback_rate or 0.0:.1%} "
                f"(> +{config.max_fallback_rate_increase:.0%}): its own model often did not answer"
            )
    return fails


def guardrail_failures(analysis: Analysis, arm_id: str, config: DecisionConfig) -> list[str]:
    """The guardrails `decide` applies, for one treatment of an analysis (approve mode re-checks a waiting
    winner with it). Empty when the arm or the control is missing."""
    arm, control = analysis.arm(arm_id), analysis.arm(analysis.control_id)
    if arm is None or control is None:
        return []
    return _guardrail_failures(arm, control, config)


def _cost_key(arm: ArmResult) -> float:
    return arm.cost_per_explanation if arm.cost_per_explanation is not None else math.inf


def _fmt_ci(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else "n/a"


def decide(analysis: Analysis, config: DecisionConfig, *, elapsed_s: float) -> Decision:
    """Turn an Analysis into collecting / unhealthy / ship / keep_control / inconclusive with a reason.

    Order: a sample-ratio mismatch is reported at once (unhealthy). Otherwise nothing is decided before the
    minimum duration. At the sample cap (an arm with `max_feedback_per_arm` votes) the experiment ends even if
    another arm has no votes. Before it, every arm needs the minimum feedback. Then, with L = the always-valid
    interval of a treatment's difference to the control (Bonferroni over the treatments, the interval shown):
    - a treatment can ship when L lies wholly above the minimum lift (`min_lift_to_ship` x the control's mean),
      its guardrails hold, and its recent lift is not significantly below its early lift (novelty check);
      among several, the highest probability to be best wins, near-ties (tie_tolerance) going to the cheaper;
    - the control is kept when every treatment's L lies wholly below the minimum lift, or the rest are
      winners blocked by guardrails;
    - futility (`config.futility`): when every treatment's L lies below the target lift (or it is blocked by
      a guardrail, or below the minimum lift), no arm can reach what the round is for: inconclusive;
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
    at_cap = max(a.metric_n for a in analysis.arms) >= config.max_feedback_per_arm
    short = [a for a in analysis.arms if a.metric_n < config.min_feedback_per_arm]
    if short:
        worst = min(short, key=lambda a: a.metric_n)
        if at_cap:
            return Decision(
                DECISION_INCONCLUSIVE,
                None,
                f"sample cap of {config.max_feedback_per_arm} per arm reached while {worst.arm_id} has only "
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
    target_bar = config.target_lift * c_mean
    winners: list[ArmResult] = []
    blocked: list[str] = []  # winners that cannot ship (guardrails): final
    waiting: list[str] = []  # winners that may ship later (novelty): keep collecting
    below: list[ArmResult] = []
    futile: list[ArmResult] = []
    for t in treatments:
        ci = t.lift_ci_sequential
        if ci is None or t.diff is None:
            continue
        if ci[0] > ship_bar and ci[0] > 0:
            fails = _guardrail_failures(t, control, config)
            if fails:
                blocked.append(f"{t.arm_id} wins but is blocked by guardrails: " + "; ".join(fails))
            elif config.novelty_check and t.novelty_flag:
                waiting.append(
                    f"{t.arm_id} wins but its lift fades (novelty check: early {t.lift_early or 0.0:+.1%}, recent "
                    f"{t.lift_recent or 0.0:+.1%}, p={t.novelty_p_value or 0.0:.2g})"
                )
            else:
                winners.append(t)
        elif ci[1] < ship_bar or (ship_bar == 0 and ci[1] < 0):
            below.append(t)
        elif config.futility and ci[1] < target_bar:
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
            f"(every always-valid interval lies below it){extra}",
        )
    if at_cap:
        return Decision(
            DECISION_INCONCLUSIVE,
            None,
            f"sample cap of {config.max_feedback_per_arm} per arm reached without a winner{extra}",
        )
    best_p = min((t.p_value_sequential for t in treatments if t.p_value_sequential is not None), default=None)
    p_txt = f"; smallest corrected always-valid p={best_p:.3g}" if best_p is not None else ""
    return Decision(DECISION_COLLECTING, None, f"no interval clears {bar_txt} yet{p_txt}{extra}")


def futile_arms(analysis: Analysis) -> list[str]:
    """Treatments whose always-valid interval lies wholly below the target lift: clearly behind, they stop
    receiving traffic under adaptive allocation (the interval is valid under any allocation rule, so dropping
    them keeps the error guarantees)."""
    return [a.arm_id for a in analysis.arms if not a.is_control and a.futile]


# --------------------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------------------


def many_to_one_control_share(treatments: int) -> float:
    """Control share of the square-root rule for comparing `treatments` arms with one control.

    With a share w_c on the control and (1 - w_c)/k on each of k treatments, every treatment-vs-control
    comparison has variance proportional to 1/w_c + k/(1 - w_c), smallest at w_c = sqrt(k) / (k + sqrt(k))
    = 1 / (1 + sqrt(k)) (Dunnett 1955; Bechhofer 1954): 1/2 for one treatment, 0.366 for three.
    """
    k = max(int(treatments), 1)
    return 1.0 / (1.0 + math.sqrt(k))


def thompson_weights(
    arms: Sequence[ArmData],
    *,
    floor: float = 0.01,
    min_feedback_per_arm: int = 100,
    current: Mapping[str, float] | None = None,
    seed: int = 0,
    draws: int = 4000,
    metric: str = METRIC_POSITIVE_RATE,
    control_id: str | None = None,
    beta: float = 0.5,
    control_share: float | None = None,
    treatment_beta: float | None = None,
    excluded: Collection[str] = (),
) -> dict[str, float]:
    """Thompson-sampling allocation with a floor per arm; weights sum to 1. Without `control_id`: top-two
    Thompson sampling over all arms (any number). With `control_id` (what the service passes): the many-vs-control
    mode below, in which the treatments get plain Thompson sampling (or top-two with `treatment_beta`).

    Returns `current` (or equal) weights unchanged until every arm has >= min_feedback_per_arm, so the
    posterior is not driven by a handful of early votes; call it once per batch, not per request.
    Probability to be best comes from seeded posterior draws (Beta for rates, normal for stars); top-two
    Thompson then gives the leader `beta` of the traffic and spreads the rest over challengers in proportion
    to their chance of being best, which keeps learning about close contenders while starving clear losers.

    With `control_id` (recommended for experiments judged against a control) the pair is specialised to
    many-vs-control: the control is always the challenger and keeps 1 - beta of the traffic, while the
    leader is drawn by Thompson sampling among the treatments (beta x P(best among treatments)). Every
    decision is a leader-vs-control comparison, whose variance sum s^2/n is smallest when both get equal
    traffic; plain top-two would starve the control once it is clearly not best and slow the decision down.
    While the treatments are still alike this is no worse than an equal split for each comparison
    (control 1/2, each of 3 treatments 1/6: 1/(1/6) + 1/(1/2) = 8, as with 1/4 each).

    Two optional refinements of the many-vs-control mode (the defaults keep the behaviour above):
    `control_share` fixes the control's share instead of 1 - beta; `many_to_one_control_share(k)` gives the
    square-root rule (1 / (1 + sqrt k), 0.366 for 3 treatments), which keeps only the control traffic the
    decision needs. Samples to a decision go as 1/w_c + 1/w_l (leader-vs-control information), users on worse
    arms as 1 - w_l: with the leader clear and a 1% floor on every arm (4 arms), w_c = 1/2 needs 4.1 samples
    per unit of information with 51% of users on worse arms, w_c = 0.366 needs 4.4 (an equal 4-way split
    needs 8) with 38% on worse arms, i.e. 20% less regret until the decision for 7% more samples.
    (bench/learning.py, +10% arm, 400 runs: regret over the fixed test's horizon 0.56x -> 0.47x of the fixed
    split, samples at equal power about 0.40x -> 0.43x of the fixed test.) Below about 0.3 the per-arm sample
    cap binds on the leader first and power falls.
    `treatment_beta` replaces plain Thompson sampling among the treatments by top-two Thompson sampling with that
    beta, so a truly better treatment that drew a bad start keeps a challenger's share instead of the floor (it
    costs regret: 0.45x -> 0.58-0.68x at w_c = 1/3 in the same benchmark, so it is off by default).

    Two arms (one treatment and its control): the comparison's variance s^2/n_c + s^2/n_t is smallest at an
    equal split, and top-two Thompson with beta = 1/2 gives exactly 1/2 to each of two arms whatever the
    posterior; so for two arms adaptive allocation means an even split, and what it adds is the futility rule
    (an arm clearly behind stops receiving traffic, and the experiment ends).
    `excluded`: arms that receive no traffic (weight 0; `futile_arms` of the analysis: their always-valid
    interval lies below the target lift); the others share the traffic as above.
    """
    ids = [a.arm_id for a in arms]
    if not ids:
        return {}
    drop = [i for i in ids if i in excluded and i != control_id]

    def _without(weights: dict[str, float]) -> dict[str, float]:
        if not drop:
            return weights
        kept = {i: (0.0 if i in drop else w) for i, w in weights.items()}
        total = sum(kept.values())
        if total <= 0:  # everything excluded: keep the control, else what there is
            return weights
        return {i: w / total for i, w in kept.items()}

    def _unchanged() -> dict[str, float]:
        if current and all(i in current for i in ids) and sum(current[i] for i in ids) > 0:
            total = sum(float(current[i]) for i in ids)
            return _without({i: float(current[i]) / total for i in ids})
        return _without({i: 1.0 / len(ids) for i in ids})

    counts = [a.n if metric == METRIC_POSITIVE_RATE else a.star_n for a in arms]
    if min(counts) < min_feedback_per_arm or len(ids) == 1:
        return _unchanged()
    moments = [_rate_moments(a) if metric == METRIC_POSITIVE_RATE else _star_moments(a) for a in arms]
    post = _posterior_draws(metric, arms, moments, draws, seed)
    if post is None:
        return _unchanged()
    p_best = np.bincount(post.argmax(axis=1), minlength=len(ids)) / post.shape[0]
    if control_id in ids and len(ids) > 2:
        ci = ids.index(control_id)
        t_idx = [i for i in range(len(ids)) if i != ci]
        sub = post[:, t_idx]
        p_t = np.bincount(sub.argmax(axis=1), minlength=len(t_idx)) / sub.shape[0]
        if treatment_beta is not None:
            p_t = top_two_weights(p_t, treatment_beta)
        share = 1.0 - beta if control_share is None else min(max(float(control_share), 0.0), 1.0)
        w = np.empty(len(ids))
        w[ci] = share
        w[t_idx] = (1.0 - share) * p_t
    else:
        w = top_two_weights(p_best, beta)
    w = apply_floor(w, floor)
    return _without({i: float(x) for i, x in zip(ids, w, strict=True)})
