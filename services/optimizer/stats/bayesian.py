"""Bayesian summaries and the bandits: posterior draws of each arm's metric (Beta for rates, normal for stars),
top-two Thompson sampling and the many-vs-control allocation the optimizer uses (`thompson_weights`), the
square-root control share and the traffic floor."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from services.optimizer.stats.moments import Moments, rate_moments, star_moments
from services.optimizer.stats.results import METRIC_POSITIVE_RATE, ArmData


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


def posterior_draws(
    metric: str, arms: Sequence[ArmData], moments: Sequence[Moments], draws: int, seed: int
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
    moments = [rate_moments(a) if metric == METRIC_POSITIVE_RATE else star_moments(a) for a in arms]
    post = posterior_draws(metric, arms, moments, draws, seed)
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
