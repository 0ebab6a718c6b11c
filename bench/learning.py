"""Learning-efficiency benchmark: the optimizer's real decision code against the plan's naive design.

    python -m bench.learning            # default run (a few minutes at most on 2 cores)
    python -m bench.learning --quick    # smoke run, a few seconds, wide error bars

Simulated traffic, no HTTP: every "batch" (a quarter of a day) serves exposures to four arms according to
the current weights, a fixed share of exposures leaves a thumbs vote, and votes are Bernoulli with the arm's
true rate. After each batch the experiment is looked at, exactly as the service does: `stats.analyze` and
`stats.decide` for ours (adaptive mode also re-weights with `stats.thompson_weights`), and for the naive
design of the plan (fixed 25% split, 7-day minimum, two-proportion z-test vs control checked once a day,
"80% confidence" = two-sided alpha 0.2) a vectorised z-test.

Scenarios and figures:
* A/A: four identical arms, watched until the sample cap. False-winner rate = share of runs that ship any
  arm. Target: ours <= 5%.
* One better arm (+10% relative, the target lift): the reference is the fixed-horizon test of 80% power at
  that effect with the same Bonferroni-split alpha, which needs 4 x n_fixed feedback events in total.
  Samples = total feedback events until the run stops. "Same power": the sequential runs are truncated at the
  smallest total budget at which >= 80% of them have shipped the right arm (runs that have not by then are
  charged the whole budget), and the ratio is their mean samples / (4 x n_fixed). The untruncated figure
  (sample cap CAP_FACTOR x n_fixed per arm, power then above 80%) is printed beside it.
  Targets: test mode (fixed weights + always-valid stopping) <= 0.9x, adaptive <= 0.7x.
* Regret = feedback events on arms worse than the best, during the experiment. Target: adaptive <= 0.5x the
  fixed 25% split run as that fixed-horizon test (3 x n_fixed); the ratio against test mode is printed too.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from services.optimizer import stats

ARMS = ("control", "t1", "t2", "t3")
K = len(ARMS)
BASE_RATE = 0.60
TARGET_LIFT = 0.10
ALPHA = 0.05
FEEDBACK_RATE = 0.30  # votes per exposure
FEEDBACK_PER_DAY = 400.0  # votes per day, all arms together
BATCHES_PER_DAY = 4
NAIVE_ALPHA = 0.20  # the plan's winner_threshold 0.80
CAP_FACTOR = 3.0  # sample cap per arm = CAP_FACTOR x the fixed-horizon n per arm
ANALYZE_DRAWS = 2000  # Monte Carlo draws for P(best) inside the loop (ranking only; the tests are exact)


@dataclass(frozen=True)
class RunStats:
    ship_rate: float  # share of runs that shipped any arm
    correct_rate: float  # share of runs that shipped the truly best arm
    mean_samples: float  # total feedback events until the run stopped
    mean_regret: float  # feedback events on worse arms until the run stopped
    mean_days: float


def n_fixed_per_arm() -> float:
    """Fixed-horizon n per arm: 80% power at the target lift, alpha split over the three treatments."""
    h = abs(stats.cohens_h(BASE_RATE * (1 + TARGET_LIFT), BASE_RATE))
    return stats.z_test_nobs1(h, ALPHA / (K - 1))


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


def simulate_ours(
    rates: NDArray[np.float64], sims: int, cap: int, *, adaptive: bool, seed: int
) -> tuple[RunStats, NDArray[np.int64], NDArray[np.int64]]:
    """Run `sims` experiments through analyze/decide (and thompson_weights when adaptive)."""
    rng = np.random.default_rng(seed)
    config = stats.DecisionConfig(alpha=ALPHA, target_lift=TARGET_LIFT, max_feedback_per_arm=cap)
    batch_exposures = int(FEEDBACK_PER_DAY / FEEDBACK_RATE / BATCHES_PER_DAY)
    best = int(np.argmax(rates))
    worse = rates < rates.max()

    exp = np.zeros((sims, K), dtype=np.int64)
    n = np.zeros((sims, K), dtype=np.int64)
    pos = np.zeros((sims, K), dtype=np.int64)
    intended = np.zeros((sims, K))  # exposures the weights in force asked for (for the SRM check)
    weights = np.full((sims, K), 1.0 / K)
    active = np.ones(sims, dtype=bool)
    outcome = np.full(sims, -1, dtype=np.int64)  # shipped arm index, -1 none
    stop_day = np.zeros(sims)
    batch = 0
    while active.any():
        batch += 1
        idx = np.flatnonzero(active)
        new_exp = np.array([rng.multinomial(batch_exposures, weights[s]) for s in idx])
        new_n = rng.binomial(new_exp, FEEDBACK_RATE)
        new_pos = rng.binomial(new_n, rates)
        exp[idx] += new_exp
        n[idx] += new_n
        pos[idx] += new_pos
        intended[idx] += batch_exposures * weights[idx]
        elapsed_s = batch / BATCHES_PER_DAY * 86400.0
        for s in idx:
            arms = _arm_data(exp[s], n[s], pos[s])
            if adaptive:
                cur = dict(zip(ARMS, weights[s], strict=True))
                new_w = stats.thompson_weights(arms, current=cur, seed=batch, control_id="control")
                weights[s] = [new_w[a] for a in ARMS]
            # decide() answers "collecting" before the minimum duration whatever the data (SRM aside, which
            # the multinomial split cannot produce beyond chance), so skip the analysis until then.
            if elapsed_s < config.min_duration_s:
                continue
            analysis = stats.analyze(
                arms,
                "control",
                dict(zip(ARMS, intended[s], strict=True)),
                alpha=ALPHA,
                target_lift=TARGET_LIFT,
                tau=TARGET_LIFT * BASE_RATE,
                draws=ANALYZE_DRAWS,
                seed=batch,
            )
            decision = stats.decide(analysis, config, elapsed_s=elapsed_s)
            if decision.status == stats.DECISION_COLLECTING:
                continue
            active[s] = False
            stop_day[s] = elapsed_s / 86400.0
            if decision.status == stats.DECISION_SHIP and decision.arm_id is not None:
                outcome[s] = ARMS.index(decision.arm_id)
    samples = n.sum(axis=1)
    regret = (n * worse).sum(axis=1)
    return (
        RunStats(
            ship_rate=float(np.mean(outcome >= 0)),
            correct_rate=float(np.mean(outcome == best)) if worse.any() else 0.0,
            mean_samples=float(samples.mean()),
            mean_regret=float(regret.mean()),
            mean_days=float(stop_day.mean()),
        ),
        outcome,
        samples,
    )


def power_matched_ratio(
    outcome: NDArray[np.int64], samples: NDArray[np.int64], best: int, reference: float, power: float = 0.8
) -> tuple[float, float]:
    """Mean samples of the sequential runs truncated at the smallest total budget that keeps `power`.

    A run that shipped the best arm at or below the budget counts as a success with its own sample count;
    every other run is charged the budget. Returns (mean samples / reference, budget / reference), or
    (nan, nan) when the runs never reach that power.
    """
    hit = outcome == best
    for budget in np.unique(samples[hit]):
        if np.mean(hit & (samples <= budget)) >= power:
            used = np.where(hit & (samples <= budget), samples, budget)
            return float(used.mean() / reference), float(budget / reference)
    return math.nan, math.nan


def simulate_naive(rates: NDArray[np.float64], sims: int, cap: int, *, seed: int) -> RunStats:
    """The plan's design: 25% each, from day 7 a daily z-test vs control at alpha 0.2; ship the best arm."""
    rng = np.random.default_rng(seed)
    daily_exposures = int(FEEDBACK_PER_DAY / FEEDBACK_RATE)
    best = int(np.argmax(rates))
    worse = rates < rates.max()
    n = np.zeros((sims, K), dtype=np.int64)
    pos = np.zeros((sims, K), dtype=np.int64)
    active = np.ones(sims, dtype=bool)
    outcome = np.full(sims, -1, dtype=np.int64)
    stop_day = np.zeros(sims)
    day = 0
    while active.any():
        day += 1
        idx = np.flatnonzero(active)
        e = rng.multinomial(daily_exposures, np.full(K, 1.0 / K), size=len(idx))
        new_n = rng.binomial(e, FEEDBACK_RATE)
        n[idx] += new_n
        pos[idx] += rng.binomial(new_n, rates)
        if day < 7:
            continue
        nn, pp = n[idx], pos[idx]
        p_vals = stats.two_proportion_z_p_value(pp[:, 1:], nn[:, 1:], pp[:, :1], nn[:, :1])
        rate_hat = pp / np.maximum(nn, 1)
        sig_better = (p_vals < NAIVE_ALPHA) & (rate_hat[:, 1:] > rate_hat[:, :1])
        leader = np.argmax(rate_hat, axis=1)
        ships = sig_better.any(axis=1) & (leader > 0)
        at_cap = nn.max(axis=1) >= cap
        stop = ships | at_cap
        outcome[idx[ships]] = leader[ships]
        stop_day[idx[stop]] = day
        active[idx[stop]] = False
    return RunStats(
        ship_rate=float(np.mean(outcome >= 0)),
        correct_rate=float(np.mean(outcome == best)) if worse.any() else 0.0,
        mean_samples=float(n.sum(axis=1).mean()),
        mean_regret=float((n * worse).sum(axis=1).mean()),
        mean_days=float(stop_day.mean()),
    )


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fast smoke run (few simulations)")
    parser.add_argument("--sims", type=int, default=None, help="simulations per scenario")
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)
    sims = args.sims or (40 if args.quick else 300)
    t0 = time.perf_counter()

    n_fix = n_fixed_per_arm()
    cap = math.ceil(CAP_FACTOR * n_fix)
    fixed_total = K * n_fix
    aa = np.full(K, BASE_RATE)
    ab = np.array([BASE_RATE, BASE_RATE * (1 + TARGET_LIFT), BASE_RATE, BASE_RATE])

    aa_ours, _, _ = simulate_ours(aa, sims, cap, adaptive=False, seed=args.seed)
    aa_naive = simulate_naive(aa, sims * 10, cap, seed=args.seed + 1)
    test_mode, tm_out, tm_samples = simulate_ours(ab, sims, cap, adaptive=False, seed=args.seed + 2)
    adaptive, ad_out, ad_samples = simulate_ours(ab, sims, cap, adaptive=True, seed=args.seed + 3)
    naive_ab = simulate_naive(ab, sims * 10, cap, seed=args.seed + 4)
    fixed_power = simulated_fixed_power(ab, math.ceil(n_fix), sims * 20, args.seed + 5)
    fixed_regret = (K - 1) * n_fix

    def se(p: float, m: int) -> float:
        return math.sqrt(max(p * (1 - p), 1e-12) / m)

    print(f"Learning-efficiency benchmark ({'quick' if args.quick else 'default'} run, {sims} sims/scenario)")
    print(
        f"4 arms, control rate {BASE_RATE:.2f}, better arm +{TARGET_LIFT:.0%}, {FEEDBACK_PER_DAY:.0f} votes/day, "
        f"{BATCHES_PER_DAY} looks/day; fixed-horizon reference n={n_fix:.0f}/arm "
        f"(simulated power {fixed_power:.2f}), cap {cap}/arm"
    )
    print()
    rows: list[tuple[str, str, str, str]] = []
    fpr_ok = aa_ours.ship_rate <= 0.05
    rows.append(
        (
            "A/A false-winner rate",
            f"ours {aa_ours.ship_rate:.1%} +-{se(aa_ours.ship_rate, sims):.1%} | naive {aa_naive.ship_rate:.1%}",
            "ours <= 5%",
            _verdict(fpr_ok),
        )
    )
    tm_ratio, tm_budget = power_matched_ratio(tm_out, tm_samples, 1, fixed_total)
    tm_ok = tm_ratio <= 0.9
    rows.append(
        (
            "samples, test mode",
            f"{tm_ratio:.2f}x fixed at 80% power (budget {tm_budget:.2f}x); uncapped "
            f"{test_mode.mean_samples / fixed_total:.2f}x, power {test_mode.correct_rate:.2f}",
            "<= 0.9x",
            _verdict(tm_ok),
        )
    )
    ad_ratio, ad_budget = power_matched_ratio(ad_out, ad_samples, 1, fixed_total)
    ad_ok = ad_ratio <= 0.7
    rows.append(
        (
            "samples, adaptive",
            f"{ad_ratio:.2f}x fixed at 80% power (budget {ad_budget:.2f}x); uncapped "
            f"{adaptive.mean_samples / fixed_total:.2f}x, power {adaptive.correct_rate:.2f}",
            "<= 0.7x",
            _verdict(ad_ok),
        )
    )
    rows.append(
        (
            "samples, naive (info)",
            f"{naive_ab.mean_samples / fixed_total:.2f}x fixed (right arm {naive_ab.correct_rate:.2f}, "
            f"any ship {naive_ab.ship_rate:.2f})",
            "-",
            "-",
        )
    )
    rg_ratio = adaptive.mean_regret / fixed_regret
    rg_ok = rg_ratio <= 0.5
    rows.append(
        (
            "regret, adaptive",
            f"{rg_ratio:.2f}x fixed split ({adaptive.mean_regret / test_mode.mean_regret:.2f}x test mode)",
            "<= 0.5x",
            _verdict(rg_ok),
        )
    )
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("figure", "measured", "target", "result")
    width = [max(w, len(h)) for w, h in zip(width, header, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(header, width, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))
    print()
    verdicts = {"false-winner": fpr_ok, "test-mode samples": tm_ok, "adaptive samples": ad_ok, "regret": rg_ok}
    summary = ", ".join(f"{k} {_verdict(v)}" for k, v in verdicts.items())
    print(f"SUMMARY: {summary} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
