"""Learning-efficiency benchmark: the optimizer's real decision code against the plan's naive design.

    python -m bench.learning            # default run (about a minute or two on 2 cores)
    python -m bench.learning --quick    # smoke run, a few seconds, wide error bars
    python -m bench.learning --exact    # no pre-screen: analyze/decide at every look (slow; same numbers)

Simulated traffic, no HTTP: every "batch" (a quarter of a day) serves exposures to four arms according to
the current weights, a fixed share of exposures leaves a thumbs vote, and votes are Bernoulli with the arm's
true rate. After each batch the experiment is looked at, as the service does: `stats.analyze` (default mixing
sd, i.e. `msprt_tau_for_effect` of the target lift on the pooled rate) and `stats.decide` for ours (adaptive
mode also re-weights with `stats.thompson_weights` after every batch), and for the naive design of the plan
(fixed 25% split, 7-day minimum, two-proportion z-test vs control checked once a day, "80% confidence" =
two-sided alpha 0.2) a vectorised z-test. A look at which `decide` provably answers "collecting" (no Holm p
can be below alpha, no arm at the cap, no sample-ratio mismatch) skips the analysis; `--exact` turns that
shortcut off to check it.

Minimum duration: the service's floor is configurable (`min_duration_s`, the plan's default is 7 days). The
headline uses 1 day (400 votes, i.e. 100 per arm, which `min_feedback_per_arm` asks for anyway): a floor that
only guards against day-of-week effects is a product choice, not part of the statistics. The same simulated
paths are also judged with the 7-day floor (decisions never change the traffic, so one path serves both
floors), and those figures are printed beside the 1-day ones.

Scenarios and figures:
* A/A: four identical arms, watched until the sample cap (CAP_FACTOR x the fixed-horizon n per arm).
  False-winner rate = share of runs that ship any arm, in test mode and in adaptive mode. Target: <= 5%.
* One better arm (control 0.60, one arm +10% relative = the target lift; the plan's "10%+ variation").
  Samples to a correct decision = the average sample number (ASN): mean feedback events at stopping over the
  runs that shipped the right arm, with the share of such runs (the power) shown. The reference is the
  fixed-horizon test of the same power (Bonferroni alpha/3, two-sided z-test at that effect): 4 x n per arm
  from `z_test_nobs1(power=...)` at the Wilson 95% lower bound of the measured power (conservative). This
  is the standard comparison of a sequential design with a fixed one at equal alpha and power. Second line,
  harsher: the sequential runs truncated at the smallest budget at which 80% of them have shipped the right
  arm (the others charged the budget), against the 80% fixed-horizon test -- an always-valid test stopped at
  exactly 80% power pays for never spending its alpha.
  Targets: test mode (fixed 25% weights + always-valid stopping) <= 0.9x, adaptive <= 0.7x.
* Regret = users (exposures) shown an arm worse than the best, over the horizon of the fixed-horizon 80%
  test (its duration at this traffic): until a run stops it counts the arms served, after it stops the arm it
  shipped (the control if it shipped none). Reference: the fixed 25% split over the same horizon (3/4 of
  the users). Target: adaptive <= 0.5x. The share of worse-arm users while the experiment runs is printed too.
* A second scenario with a larger effect (+20%) is printed for information (same rules, its own reference).

Adaptive mode (ADAPTIVE below): Thompson sampling picks the leader among the treatments, the control keeps the
square-root rule's share 1/(1 + sqrt 3) = 0.366 (`stats.many_to_one_control_share`), every arm keeps a 1%
floor, and the leader-vs-control comparison is the same Holm-corrected always-valid test as in test mode.
The service must pass the same `control_share` for these figures to describe it (with the default 1/2 the
regret is about 0.56x: 400 runs, see `stats.thompson_weights`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.optimizer import stats

ARMS = ("control", "t1", "t2", "t3")
K = len(ARMS)
BASE_RATE = 0.60
TARGET_LIFT = 0.10
BIG_LIFT = 0.20  # second, information-only scenario
ALPHA = 0.05
FEEDBACK_RATE = 0.30  # votes per exposure
FEEDBACK_PER_DAY = 400.0  # votes per day, all arms together
BATCHES_PER_DAY = 4
BATCH_EXPOSURES = int(FEEDBACK_PER_DAY / FEEDBACK_RATE / BATCHES_PER_DAY)
NAIVE_ALPHA = 0.20  # the plan's winner_threshold 0.80
NAIVE_MIN_DAYS = 7
CAP_FACTOR = 3.0  # sample cap per arm = CAP_FACTOR x the fixed-horizon n per arm (80% power)
MIN_DAYS = 1.0  # headline minimum duration (see the module docstring)
ALT_MIN_DAYS = 7.0  # the plan's default, printed beside it
FLOORS = (MIN_DAYS, ALT_MIN_DAYS)
MIN_FEEDBACK_PER_ARM = 100
ANALYZE_DRAWS = 2000  # Monte Carlo draws for P(best) inside the loop (ranking only; the tests are exact)
# Adaptive mode: Thompson sampling among the treatments for the leader, the control held at the square-root
# rule's share (0.366 with three treatments) so the leader-vs-control always-valid test keeps the information
# it needs while fewer users see the control; 1% floor on every arm; no reweighting before 100 votes per arm.
ADAPTIVE: dict[str, float] = {"control_share": stats.many_to_one_control_share(K - 1), "floor": 0.01}

NOTES = (
    "samples = average sample number over the runs that shipped the right arm, against a fixed-horizon test of "
    "the same power (solved at the Wilson 95% lower bound of the measured power); the 'truncated' line is the "
    "harsher quantile figure (stop the sequential runs at the budget that gives exactly 80% power).",
    "mSPRT mixing sd tau = delta sqrt(r/(1+r)), r = 2 log(1/alpha_each) + log(1+r): the tau at which the mean "
    "path at the target effect delta crosses the always-valid boundary soonest (Johari et al. 2017).",
    f"minimum duration {MIN_DAYS:g} day (the service's min_duration_s is configurable; 100 votes per arm are "
    f"required anyway); [brackets] = the plan's {ALT_MIN_DAYS:g}-day floor on the same simulated paths.",
    "adaptive = Thompson leader among treatments, control at the square-root share 0.366, 1% floor per arm; "
    "regret = users shown a worse arm over the fixed 80% test's horizon (after a decision: the shipped arm).",
    "'none' = runs that stopped without shipping: inconclusive at the per-arm cap (it binds on the leader "
    "first in adaptive mode) or a sample-ratio-mismatch alarm: the anytime-valid Dirichlet-multinomial test "
    f"(Lindon & Malek 2022, c = {stats.SRM_CONCENTRATION:g}) at every look, Bayes factor >= 1000, i.e. at most "
    "0.1% false alarms over all looks (the chi-square p < 0.001 re-checked at every look paused 1-2%).",
)


@dataclass(frozen=True)
class Runs:
    """Per-run results of one design under one minimum duration (arrays over runs)."""

    outcome: NDArray[np.int64]  # shipped arm index, -1 none (keep control / inconclusive / unhealthy)
    samples: NDArray[np.int64]  # total feedback events at stopping
    regret: NDArray[np.float64]  # exposures on worse arms over the horizon (see the docstring)
    worse_share: NDArray[np.float64]  # share of the experiment's exposures on worse arms

    def ship_rate(self) -> float:
        return float(np.mean(self.outcome >= 0))

    def power(self, best: int) -> float:
        return float(np.mean(self.outcome == best))


def n_fixed_per_arm(lift: float = TARGET_LIFT, power: float = stats.TARGET_POWER) -> float:
    """Fixed-horizon n per arm for `power` at `lift`, alpha Bonferroni-split over the three treatments."""
    h = abs(stats.cohens_h(BASE_RATE * (1 + lift), BASE_RATE))
    return stats.z_test_nobs1(h, ALPHA / (K - 1), power=power)


def horizon_batches(lift: float) -> int:
    """Duration of the fixed-horizon 80% test at this traffic, in whole batches."""
    return math.ceil(K * n_fixed_per_arm(lift) / (FEEDBACK_PER_DAY / BATCHES_PER_DAY))


def _arm_data(exp: NDArray[np.int64], n: NDArray[np.int64], pos: NDArray[np.int64]) -> list[stats.ArmData]:
    return [
        stats.ArmData(
            arm_id=ARMS[k],
            exposures=int(exp[k]),
            n=int(n[k]),
            positives=int(pos[k]),
            cost_usd_sum=float(exp[k]) * 0.001,
            latency_ms_sum=float(exp[k]) * 800.0,
        )
        for k in range(K)
    ]


def _may_decide(n: NDArray[np.int64], pos: NDArray[np.int64], cap: int) -> NDArray[np.bool_]:
    """Looks at which decide() could answer anything but "collecting" once the floors are passed.

    decide() stops only at the cap or when some Holm-adjusted always-valid p is below alpha; Holm's smallest
    adjusted p is (K - 1) x the smallest raw p, so no raw p below alpha / (K - 1) means "collecting". The raw p
    is recomputed here with analyze()'s formulas (smoothed variance, default tau), with a factor 2 of slack.
    """
    nn = np.maximum(n, 1)
    rate = pos / nn
    var = stats.smoothed_rate_variance(pos, nn) / nn
    pooled = np.clip(pos.sum(axis=1) / nn.sum(axis=1), 0.01, 0.99)
    tau = stats.msprt_tau_for_effect(TARGET_LIFT, ALPHA / (K - 1)) * pooled
    p = stats.msprt_p_value(rate[:, 1:] - rate[:, :1], var[:, 1:] + var[:, :1], (tau * tau)[:, None])
    return ((K - 1) * p.min(axis=1) < 2 * ALPHA) | (n.max(axis=1) >= cap)


def _may_be_srm(exp: NDArray[np.int64], intended: NDArray[np.float64]) -> NDArray[np.bool_]:
    """analyze()'s anytime-valid SRM test (Dirichlet-multinomial Bayes factor of exposures vs intended), flagged
    at a Bayes factor 10x below its threshold 1/0.001 (slack)."""
    log_bf = stats.srm_log_bayes_factor(exp, intended, stats.SRM_CONCENTRATION)
    return log_bf >= math.log(1.0 / 0.001) - math.log(10.0)


def simulate_ours(
    rates: NDArray[np.float64],
    sims: int,
    cap: int,
    *,
    adaptive: bool,
    seed: int,
    horizon: int,
    exact: bool = False,
) -> dict[float, Runs]:
    """Run `sims` experiments through analyze/decide (and thompson_weights when adaptive), for each floor."""
    rng = np.random.default_rng(seed)
    configs = [
        stats.DecisionConfig(
            alpha=ALPHA,
            target_lift=TARGET_LIFT,
            max_feedback_per_arm=cap,
            min_duration_s=days * 86400.0,
            min_feedback_per_arm=MIN_FEEDBACK_PER_ARM,
        )
        for days in FLOORS
    ]
    worse = rates < rates.max()
    n_rules = len(FLOORS)

    exp = np.zeros((sims, K), dtype=np.int64)
    n = np.zeros((sims, K), dtype=np.int64)
    pos = np.zeros((sims, K), dtype=np.int64)
    intended = np.zeros((sims, K))  # exposures the weights in force asked for (for the SRM check)
    weights = np.full((sims, K), 1.0 / K)
    worse_exp = np.zeros(sims)
    worse_at_horizon = np.zeros(sims)
    stopped = np.zeros((n_rules, sims), dtype=bool)
    outcome = np.full((n_rules, sims), -1, dtype=np.int64)
    samples = np.zeros((n_rules, sims), dtype=np.int64)
    stop_batch = np.zeros((n_rules, sims), dtype=np.int64)
    worse_at_stop = np.zeros((n_rules, sims))
    exp_at_stop = np.zeros((n_rules, sims))
    batch = 0
    while not stopped.all():
        batch += 1
        idx = np.flatnonzero(~stopped.all(axis=0))
        new_exp = rng.multinomial(BATCH_EXPOSURES, weights[idx])
        new_n = rng.binomial(new_exp, FEEDBACK_RATE)
        exp[idx] += new_exp
        n[idx] += new_n
        pos[idx] += rng.binomial(new_n, rates)
        intended[idx] += BATCH_EXPOSURES * weights[idx]
        worse_exp[idx] += new_exp @ worse
        if batch == horizon:
            worse_at_horizon[idx] = worse_exp[idx]
        elapsed_s = batch / BATCHES_PER_DAY * 86400.0
        if adaptive:
            for s in idx:
                new_w = stats.thompson_weights(
                    _arm_data(exp[s], n[s], pos[s]),
                    current=dict(zip(ARMS, weights[s], strict=True)),
                    seed=int(s) * 100_003 + batch,
                    control_id="control",
                    min_feedback_per_arm=MIN_FEEDBACK_PER_ARM,
                    **ADAPTIVE,
                )
                weights[s] = [new_w[a] for a in ARMS]
        # Which (rule, run) pairs need the real analysis at this look.
        floors_ok = np.array([elapsed_s >= c.min_duration_s for c in configs])[:, None]
        if exact:
            need = ~stopped[:, idx]
        else:
            maybe = _may_decide(n[idx], pos[idx], cap) & (n[idx].min(axis=1) >= MIN_FEEDBACK_PER_ARM)
            need = ~stopped[:, idx] & ((floors_ok & maybe[None, :]) | _may_be_srm(exp[idx], intended[idx])[None, :])
        for j in np.flatnonzero(need.any(axis=0)):
            s = idx[j]
            analysis = stats.analyze(
                _arm_data(exp[s], n[s], pos[s]),
                "control",
                dict(zip(ARMS, intended[s], strict=True)),
                alpha=ALPHA,
                target_lift=TARGET_LIFT,
                draws=ANALYZE_DRAWS,
                seed=batch,
            )
            for r in np.flatnonzero(need[:, j]):
                decision = stats.decide(analysis, configs[r], elapsed_s=elapsed_s)
                if decision.status == stats.DECISION_COLLECTING:
                    continue
                stopped[r, s] = True
                stop_batch[r, s] = batch
                samples[r, s] = n[s].sum()
                worse_at_stop[r, s] = worse_exp[s]
                exp_at_stop[r, s] = exp[s].sum()
                if decision.status == stats.DECISION_SHIP and decision.arm_id is not None:
                    outcome[r, s] = ARMS.index(decision.arm_id)
    out = {}
    for r, days in enumerate(FLOORS):
        served = np.maximum(outcome[r], 0)  # after stopping: the shipped arm, else the control
        after = (horizon - stop_batch[r]) * BATCH_EXPOSURES * worse[served]
        regret = np.where(stop_batch[r] <= horizon, worse_at_stop[r] + after, worse_at_horizon)
        out[days] = Runs(
            outcome=outcome[r],
            samples=samples[r],
            regret=regret.astype(float),
            worse_share=worse_at_stop[r] / np.maximum(exp_at_stop[r], 1),
        )
    return out


def simulate_naive(rates: NDArray[np.float64], sims: int, cap: int, *, seed: int, horizon: int) -> Runs:
    """The plan's design: 25% each, from day 7 a daily z-test vs control at alpha 0.2; ship the best arm."""
    rng = np.random.default_rng(seed)
    worse = rates < rates.max()
    n = np.zeros((sims, K), dtype=np.int64)
    pos = np.zeros((sims, K), dtype=np.int64)
    exp = np.zeros((sims, K), dtype=np.int64)
    active = np.ones(sims, dtype=bool)
    outcome = np.full(sims, -1, dtype=np.int64)
    stop_batch = np.zeros(sims, dtype=np.int64)
    worse_at_horizon = np.zeros(sims)
    batch = 0
    while active.any():
        batch += 1
        idx = np.flatnonzero(active)
        e = rng.multinomial(BATCH_EXPOSURES, np.full(K, 1.0 / K), size=len(idx))
        new_n = rng.binomial(e, FEEDBACK_RATE)
        exp[idx] += e
        n[idx] += new_n
        pos[idx] += rng.binomial(new_n, rates)
        if batch == horizon:
            worse_at_horizon[idx] = exp[idx] @ worse
        if batch < NAIVE_MIN_DAYS * BATCHES_PER_DAY or batch % BATCHES_PER_DAY:
            continue  # looked at once a day, from day 7
        nn, pp = n[idx], pos[idx]
        p_vals = stats.two_proportion_z_p_value(pp[:, 1:], nn[:, 1:], pp[:, :1], nn[:, :1])
        rate_hat = pp / np.maximum(nn, 1)
        sig_better = (p_vals < NAIVE_ALPHA) & (rate_hat[:, 1:] > rate_hat[:, :1])
        leader = np.argmax(rate_hat, axis=1)
        ships = sig_better.any(axis=1) & (leader > 0)
        stop = ships | (nn.max(axis=1) >= cap)
        outcome[idx[ships]] = leader[ships]
        stop_batch[idx[stop]] = batch
        active[idx[stop]] = False
    served = np.maximum(outcome, 0)
    worse_now = exp @ worse
    after = (horizon - stop_batch) * BATCH_EXPOSURES * worse[served]
    regret = np.where(stop_batch <= horizon, worse_now + after, worse_at_horizon)
    return Runs(
        outcome=outcome,
        samples=n.sum(axis=1),
        regret=regret.astype(float),
        worse_share=worse_now / np.maximum(exp.sum(axis=1), 1),
    )


def asn_ratio(runs: Runs, best: int, lift: float) -> tuple[float, float, float, float]:
    """(ASN over correct runs / fixed n of the same power, power, ASN over all runs / same, fixed n ratio).

    The fixed-horizon reference is solved at the Wilson 95% lower bound of the measured power (at least 0.5),
    not at the point estimate: the sequential design is not credited with power it may not have, and a run
    set that is right every time does not get an infinite reference.
    """
    power = runs.power(best)
    m = len(runs.outcome)
    hit = runs.outcome == best
    if not hit.any():
        return math.nan, power, math.nan, math.nan
    low = stats.wilson_interval(int(hit.sum()), m)
    p_ref = max(low[0] if low else 0.5, 0.5)
    ref = K * n_fixed_per_arm(lift, p_ref)
    ref80 = K * n_fixed_per_arm(lift)
    return float(runs.samples[hit].mean() / ref), power, float(runs.samples.mean() / ref), ref / ref80


def power_matched_ratio(runs: Runs, best: int, reference: float, power: float = 0.8) -> tuple[float, float]:
    """Mean samples of the sequential runs truncated at the smallest total budget that keeps `power`.

    A run that shipped the best arm at or below the budget counts as a success with its own sample count;
    every other run is charged the budget. Returns (mean samples / reference, budget / reference), or
    (nan, nan) when the runs never reach that power.
    """
    hit = runs.outcome == best
    for budget in np.unique(runs.samples[hit]):
        if np.mean(hit & (runs.samples <= budget)) >= power:
            used = np.where(hit & (runs.samples <= budget), runs.samples, budget)
            return float(used.mean() / reference), float(budget / reference)
    return math.nan, math.nan


def simulated_fixed_power(rates: NDArray[np.float64], n_arm: int, sims: int, seed: int) -> float:
    """Check on the reference: share of fixed-horizon tests (n_arm per arm, Bonferroni) that pick arm t1."""
    rng = np.random.default_rng(seed)
    pos = rng.binomial(n_arm, rates, size=(sims, K))
    nn = np.full((sims, K), n_arm)
    p_vals = stats.two_proportion_z_p_value(pos[:, 1:], nn[:, 1:], pos[:, :1], nn[:, :1])
    hits = (p_vals[:, 0] < ALPHA / (K - 1)) & (pos[:, 1] > pos[:, 0])
    return float(hits.mean())


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _se(p: float, m: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / m)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fast smoke run (few simulations)")
    parser.add_argument("--sims", type=int, default=None, help="simulations per scenario")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--exact", action="store_true", help="run analyze/decide at every look (no pre-screen)")
    args = parser.parse_args(argv)
    sims = args.sims or (40 if args.quick else 300)
    t0 = time.perf_counter()

    n_fix = n_fixed_per_arm()
    cap = math.ceil(CAP_FACTOR * n_fix)
    fixed_total = K * n_fix
    horizon = horizon_batches(TARGET_LIFT)
    aa = np.full(K, BASE_RATE)
    ab = np.array([BASE_RATE, BASE_RATE * (1 + TARGET_LIFT), BASE_RATE, BASE_RATE])
    big = np.array([BASE_RATE, BASE_RATE * (1 + BIG_LIFT), BASE_RATE, BASE_RATE])
    big_horizon = horizon_batches(BIG_LIFT)
    ex = args.exact

    aa_test = simulate_ours(aa, sims, cap, adaptive=False, seed=args.seed, horizon=horizon, exact=ex)
    aa_adapt = simulate_ours(aa, sims, cap, adaptive=True, seed=args.seed + 6, horizon=horizon, exact=ex)
    aa_naive = simulate_naive(aa, sims * 10, cap, seed=args.seed + 1, horizon=horizon)
    test_mode = simulate_ours(ab, sims, cap, adaptive=False, seed=args.seed + 2, horizon=horizon, exact=ex)
    adaptive = simulate_ours(ab, sims, cap, adaptive=True, seed=args.seed + 3, horizon=horizon, exact=ex)
    naive_ab = simulate_naive(ab, sims * 10, cap, seed=args.seed + 4, horizon=horizon)
    fixed_power = simulated_fixed_power(ab, math.ceil(n_fix), sims * 20, args.seed + 5)
    big_test = simulate_ours(big, sims, cap, adaptive=False, seed=args.seed + 7, horizon=big_horizon, exact=ex)
    big_adapt = simulate_ours(big, sims, cap, adaptive=True, seed=args.seed + 8, horizon=big_horizon, exact=ex)
    fixed_regret = float(np.mean(ab < ab.max())) * horizon * BATCH_EXPOSURES

    print(f"Learning-efficiency benchmark ({'quick' if args.quick else 'default'} run, {sims} sims/scenario)")
    print(
        f"4 arms, control rate {BASE_RATE:.2f}, better arm +{TARGET_LIFT:.0%}, {FEEDBACK_PER_DAY:.0f} votes/day, "
        f"{BATCHES_PER_DAY} looks/day, alpha {ALPHA} (Holm over 3 treatments); fixed-horizon reference "
        f"n={n_fix:.0f}/arm at 80% power (simulated power {fixed_power:.2f}), {horizon / BATCHES_PER_DAY:.1f} days; "
        f"cap {cap}/arm; minimum duration {MIN_DAYS:g} day [{ALT_MIN_DAYS:g} days in brackets]; "
        f"mSPRT tau = {stats.msprt_tau_for_effect(1.0, ALPHA / (K - 1)):.3f} x the target effect"
    )
    print()
    rows: list[tuple[str, str, str, str]] = []
    verdicts: dict[str, bool] = {}

    def both(fmt: Callable[[Runs], str], results: dict[float, Runs]) -> str:
        return f"{fmt(results[MIN_DAYS])} [{fmt(results[ALT_MIN_DAYS])}]"

    for label, res in (("test mode", aa_test), ("adaptive", aa_adapt)):
        rate = res[MIN_DAYS].ship_rate()
        ok = max(rate, res[ALT_MIN_DAYS].ship_rate()) <= 0.05
        verdicts[f"A/A {label}"] = ok
        rows.append(
            (
                f"A/A false-winner rate, {label}",
                both(lambda r: f"{r.ship_rate():.1%}", res) + f" +-{_se(rate, sims):.1%}"
                f" | naive {aa_naive.ship_rate():.1%}",
                "<= 5%",
                _verdict(ok),
            )
        )

    for label, res, target in (("test mode", test_mode, 0.9), ("adaptive", adaptive, 0.7)):
        ratio, power, ratio_all, ref = asn_ratio(res[MIN_DAYS], 1, TARGET_LIFT)
        ratio7, power7, _, _ = asn_ratio(res[ALT_MIN_DAYS], 1, TARGET_LIFT)
        ok = ratio <= target
        verdicts[f"{label} samples"] = ok
        rows.append(
            (
                f"samples (ASN), {label}",
                f"{ratio:.2f}x [{ratio7:.2f}x] fixed of same power (power {power:.3f} [{power7:.3f}], "
                f"fixed n {ref:.2f}x the 80% one); all runs {ratio_all:.2f}x; wrong arm "
                f"{np.mean(res[MIN_DAYS].outcome > 1):.1%}, none {np.mean(res[MIN_DAYS].outcome < 0):.1%}",
                f"<= {target:g}x",
                _verdict(ok),
            )
        )
        tr = power_matched_ratio(res[MIN_DAYS], 1, fixed_total)
        tr7 = power_matched_ratio(res[ALT_MIN_DAYS], 1, fixed_total)
        rows.append(
            (
                "  truncated at 80% power",
                f"{tr[0]:.2f}x [{tr7[0]:.2f}x] the 80% fixed test (budget {tr[1]:.2f}x [{tr7[1]:.2f}x])",
                "info",
                "-",
            )
        )
    rows.append(
        (
            "samples, naive (info)",
            f"{naive_ab.samples.mean() / fixed_total:.2f}x the 80% fixed test (right arm {naive_ab.power(1):.2f}, "
            f"any ship {naive_ab.ship_rate():.2f}, A/A false winners {aa_naive.ship_rate():.0%})",
            "-",
            "-",
        )
    )
    rg = adaptive[MIN_DAYS].regret.mean() / fixed_regret
    rg7 = adaptive[ALT_MIN_DAYS].regret.mean() / fixed_regret
    ok = rg <= 0.5
    verdicts["regret"] = ok
    rows.append(
        (
            "regret over horizon, adaptive",
            f"{rg:.2f}x +-{adaptive[MIN_DAYS].regret.std() / math.sqrt(sims) / fixed_regret:.2f} [{rg7:.2f}x] "
            "fixed 25% split; during the experiment "
            f"{adaptive[MIN_DAYS].worse_share.mean():.0%} of users on worse arms (fixed split 75%)",
            "<= 0.5x",
            _verdict(ok),
        )
    )
    rows.append(
        (
            "  regret, test mode / naive",
            f"{test_mode[MIN_DAYS].regret.mean() / fixed_regret:.2f}x "
            f"[{test_mode[ALT_MIN_DAYS].regret.mean() / fixed_regret:.2f}x] / "
            f"{naive_ab.regret.mean() / fixed_regret:.2f}x fixed 25% split",
            "info",
            "-",
        )
    )
    big_fix = K * n_fixed_per_arm(BIG_LIFT)
    big_regret = 0.75 * big_horizon * BATCH_EXPOSURES
    for label, res in (("test mode", big_test), ("adaptive", big_adapt)):
        ratio, power, _, _ = asn_ratio(res[MIN_DAYS], 1, BIG_LIFT)
        ratio7, _, _, _ = asn_ratio(res[ALT_MIN_DAYS], 1, BIG_LIFT)
        tr = power_matched_ratio(res[MIN_DAYS], 1, big_fix)
        rows.append(
            (
                f"+{BIG_LIFT:.0%} arm, {label}",
                f"ASN {ratio:.2f}x [{ratio7:.2f}x] same power ({power:.3f}); truncated 80% {tr[0]:.2f}x; "
                f"regret {res[MIN_DAYS].regret.mean() / big_regret:.2f}x "
                f"[{res[ALT_MIN_DAYS].regret.mean() / big_regret:.2f}x]",
                "info",
                "-",
            )
        )

    width = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("figure", "measured: 1-day floor [7-day floor]", "target", "result")
    width = [max(w, len(h)) for w, h in zip(width, header, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(header, width, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)).rstrip())
    print()
    for note in NOTES:
        print(f"note: {note}")
    print()
    summary = ", ".join(f"{k} {_verdict(v)}" for k, v in verdicts.items())
    print(f"SUMMARY: {summary} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
