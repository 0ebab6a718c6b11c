"""What the statistics take and give: an arm's collected sums (`ArmData`), the per-arm and per-segment
results and the whole `Analysis`, with the status and metric codes. Plain frozen dataclasses, no maths."""

from __future__ import annotations

from dataclasses import dataclass

STATUS_OK = "OK"
STATUS_INSUFFICIENT = "INSUFFICIENT_SAMPLES"
STATUS_SRM = "SRM"

METRIC_POSITIVE_RATE = "positive_rate"
METRIC_AVG_STARS = "avg_stars"
METRICS = (METRIC_POSITIVE_RATE, METRIC_AVG_STARS)


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
    # The feedback rate's own counts: the exposures and votes of the sessions first served before a grace period
    # (their votes have had time to arrive; a vote travels one more hop than its explanation's event, and under
    # an allocation that changes, arms differ in how much of their traffic is that fresh). None: all of them.
    feedback_exposures: int | None = None
    feedback_n: int | None = None


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
    feedback_rate: (
        float | None
    )  # n / exposures (`ArmData.feedback_n / feedback_exposures` when given); None: no exposures
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
    futile: bool = False  # the always-valid interval at the futility level lies wholly below the target lift
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
