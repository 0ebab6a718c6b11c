"""Experiment statistics for the optimizer: pure functions over plain counts (gbstats style).

The modules, in the order a look at an experiment uses them:

* `results`: what goes in and comes out -- `ArmData` (an arm's sums over sessions), `ArmResult`, `SegmentResult`,
  `Analysis`, and the status and metric codes.
* `frequentist`: the fixed-horizon and sequential tests -- Wilson intervals, the pooled z-test, the mSPRT
  (p-values, confidence sequences, the mixing sd), Holm, power and sample sizes, the session-clustered variance
  and its design effect, and the sample-ratio-mismatch test.
* `moments`: each arm's mean and variance of a metric (`rate_moments`, `star_moments`) with the design effect
  applied, and `subtract_arm`.
* `bayesian`: posterior draws and the bandits: top-two and many-vs-control Thompson sampling (`thompson_weights`).
* `analysis`: `analyze`, which puts those together per arm, with the novelty check and the segments.
* `decision`: the policy over an `Analysis` -- `decide` (ship, keep the control, futility, novelty, the sample
  cap), the guardrails and `futile_arms`, with `DecisionConfig` and `Decision`.

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
* Novelty: the lift among the sessions first served in the recent half against the early half (`analysis._novelty`).
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
