"""Multi-round learning loop benchmark: the optimizer's real generator, registry, experiment and decision code
over many rounds, with simulated users of several tastes, today's loop against the loop that remembers.

    python -m bench.search_loop            # default run: 3 loops per profile and mode (several minutes on 2 cores)
    python -m bench.search_loop --quick    # smoke run: one loop per profile and mode, shorter horizon

What runs is the optimizer itself, without HTTP and without the queue: a real SQLite store per loop,
`handlers.auto_cycle` (variant generation with its guardrails and rate limit, the next experiment),
`experiments.run_decisions` (`analysis.analyze` / `decision.decide`: promotion, conclusion, reweighting; any rule
added to them, such as futility stopping, is picked up as it is), and the exposures and votes go in as the
router's and the feedback service's events through `handlers.on_explanation_created` /
`on_feedback_recorded` (many per transaction, for speed; the handlers are the real ones). The clock is
simulated at the demo's pace and with the demo's settings (`bench.demo.FAST_CLOCK`: 5 s minimum duration,
100-700 votes per arm, generation every 5 s at most, checked every 2 s, decisions every second, 3 variants
per generation, fixed split), 33 users a second, 70% of users vote.

Users judge the style traits of the version they are shown (`traits_of` its template: the cues the router's
offline provider follows); a taste profile gives each trait combination a true thumbs-up rate. Profiles:
* demo: the demo's users (bullet points +15 points, a risk note +12, over-terse -5, plain language 0);
* last-trait: only plain language helps (+12), the trait the generator lists last; the first three leave the
  users cold or put them off;
* pair: only bullet points and a risk note together help (+12); either alone does nothing;
* nothing: no trait or combination beats the seed (each costs 1-4 points).

Loops: "today" is the generator as it was (`OfflineGenerator(remember=False)`: one trait per variant in a
fixed order, no memory) in the loop as it is: after its first round it proposes the same variants again, they
are rejected (now as repeats, before as near-duplicates), and after three such generations the search is
announced exhausted (before, it kept generating and rejecting every check: the same stall, unannounced);
"memory" is the generator with the search history (`OfflineGenerator()`).

Figures per profile and loop (medians over the runs, and how many runs got there):
* users / votes until +10 points: until the champion (what every user outside an experiment gets) has a true
  rate at least 10 points above the seed's; "never" within the horizon.
* votes on rounds that could not win: votes collected by experiments in which no treatment was truly better
  than its control by the target lift (10% relative, what a round is sized to detect).
* false promotions: promotions of a version whose true rate is not above the champion it replaced.
* exhausted: whether the search announced it has nothing left (and after how many votes).
Goal (issue 9): every profile with a reachable +10-point variant reaches it within 6,000 votes with the
memory loop; today's loop never does on last-trait and pair; nothing promotes nothing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

from bench.demo import FAST_CLOCK
from bench.tastes import PROFILES, SEED_RATE, Profile
from services.optimizer import experiments, handlers, registry
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import OfflineGenerator, traits_of
from services.optimizer.store import ArmRow, ExperimentRow, SqlUnitOfWork, Store
from shared.contracts import ExplanationCreated, FeedbackRecorded, utcnow
from shared.db import UnitOfWork
from shared.prompts import PROMPT_NAME

MODEL = "offline/template-v1"
TARGET_POINTS = 0.10  # the goal: the champion 10 points above the seed
GOAL_VOTES = 6000
FEEDBACK_RATE = 0.7  # as in the demo
USERS_PER_S = 33.0  # the demo's pace (about 6,000 users in 3 minutes)
BATCH_USERS = 11  # users between two looks at the clock (a third of a second)


DECISION_INTERVAL_S = float(FAST_CLOCK["OPTIMIZER_DECISION_INTERVAL_S"])  # beat's schedule in the demo
GENERATION_CHECK_S = float(FAST_CLOCK["OPTIMIZER_GENERATION_CHECK_INTERVAL_S"])


def demo_settings() -> OptimizerSettings:
    """The optimizer's settings in `make demo` (FAST_CLOCK), promotion automatic."""
    values: dict[str, Any] = {
        k.removeprefix("OPTIMIZER_").lower(): v for k, v in FAST_CLOCK.items() if k.startswith("OPTIMIZER_")
    }
    return OptimizerSettings(**values, auto_allocation="fixed", promotion_mode="auto", openai_api_key=None)


class BatchUnitOfWork(UnitOfWork[Any]):
    """Many handler calls in one transaction: a handler enters it and commits as usual, the bench commits
    the whole batch once. Only the commit granularity differs from the service."""

    def __init__(self, store: Store) -> None:
        super().__init__(store.factory, store.make_repo, store.outbox)
        self.session = store.factory()
        self.repo = self.make_repo(self.session)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def commit(self) -> None:
        self.session.flush()
        self.committed = True

    def finish(self) -> None:
        self.session.commit()
        self.session.close()


@dataclass
class Round:
    experiment_id: str
    control_rate: float
    treatment_rates: list[float]
    votes: int = 0
    decision: str | None = None
    winner_rate: float | None = None

    def could_win(self, target_lift: float) -> bool:
        return any(r >= self.control_rate * (1 + target_lift) - 1e-9 for r in self.treatment_rates)


@dataclass
class LoopResult:
    votes: int = 0
    users: int = 0
    users_to_target: int | None = None
    votes_to_target: int | None = None
    rounds: list[Round] = field(default_factory=list)
    promotions: list[tuple[float, float]] = field(default_factory=list)  # (old champion rate, new)
    exhausted_at_votes: int | None = None
    stalled_at_votes: int | None = None
    generations: int = 0
    final_rate: float = SEED_RATE

    def wasted(self, target_lift: float) -> int:
        return sum(r.votes for r in self.rounds if not r.could_win(target_lift))

    def false_promotions(self) -> int:
        return sum(1 for old, new in self.promotions if new <= old + 1e-9)


def run_loop(profile: Profile, remember: bool, seed: int, max_votes: int, workdir: Path) -> LoopResult:
    settings = demo_settings()
    store = Store(f"sqlite:///{workdir / f'optimizer-{profile.name}-{remember}-{seed}.db'}")
    registry.ensure_seeded(store.uow(), MODEL)
    generator = OfflineGenerator(remember=remember)
    rng = random.Random(seed)
    now = utcnow()
    res = LoopResult()
    rates: dict[str, float] = {}
    rounds: dict[str, Round] = {}

    def rate_of(uow: SqlUnitOfWork, version: str) -> float:
        if version not in rates:
            row = uow.repo.version(PROMPT_NAME, version)
            assert row is not None
            rates[version] = profile.rate(traits_of(row["template"]))
        return rates[version]

    def serving() -> tuple[ExperimentRow | None, list[ArmRow], str]:
        with store.uow() as uow:
            champion = uow.repo.champion(PROMPT_NAME)
            assert champion is not None
            exp = uow.repo.active_experiment(PROMPT_NAME)
            arms = uow.repo.arms(exp["experiment_id"]) if exp else []
            for a in arms:
                rate_of(uow, a["prompt_version"])
            rate_of(uow, champion["version"])
            if exp and exp["experiment_id"] not in rounds:
                control = next(a for a in arms if a["is_control"])
                rounds[exp["experiment_id"]] = Round(
                    exp["experiment_id"],
                    rates[control["prompt_version"]],
                    [rates[a["prompt_version"]] for a in arms if not a["is_control"]],
                )
            return exp, arms, champion["version"]

    exp, arms, champion = serving()
    next_decision = now + timedelta(seconds=DECISION_INTERVAL_S)
    next_generation = now
    stalled_checks = 0
    while res.votes < max_votes:
        batch = BatchUnitOfWork(store)
        for _ in range(BATCH_USERS):
            res.users += 1
            if exp is not None:
                weights = [float(exp["weights"].get(a["arm_id"], 0.0)) for a in arms]
                arm = rng.choices(arms, weights=weights)[0]
                version, experiment_id, arm_id = arm["prompt_version"], exp["experiment_id"], arm["arm_id"]
            else:
                version, experiment_id, arm_id = champion, None, None
            session = f"s{seed}-{res.users}"
            explanation_id = uuid.uuid4()
            handlers.on_explanation_created(
                ExplanationCreated(
                    explanation_id=explanation_id,
                    request_key="bench",
                    ticker="AAPL",
                    signal="BUY",
                    prompt_name=PROMPT_NAME,
                    prompt_version=version,
                    model=MODEL,
                    provider="offline",
                    experiment_id=experiment_id,
                    arm_id=arm_id,
                    prompt_text="",
                    text="",
                    tokens_in=100,
                    tokens_out=60,
                    cost_usd=0.0,
                    latency_ms=5.0,
                    created_at=now,
                    session_key=session,
                ),
                batch,
            )
            if rng.random() < FEEDBACK_RATE:
                up = rng.random() < rates[version]
                handlers.on_feedback_recorded(
                    FeedbackRecorded(
                        feedback_id=uuid.uuid4(),
                        explanation_id=explanation_id,
                        session_key=session,
                        rating=1 if up else -1,
                        submitted_at=now,
                        prompt_name=PROMPT_NAME,
                        prompt_version=version,
                        model=MODEL,
                        signal="BUY",
                        ticker="AAPL",
                        experiment_id=experiment_id,
                        arm_id=arm_id,
                    ),
                    batch,
                )
                res.votes += 1
                if experiment_id is not None:
                    rounds[experiment_id].votes += 1
            now += timedelta(seconds=1 / USERS_PER_S)
        batch.finish()
        changed = False
        if now >= next_decision:
            next_decision = now + timedelta(seconds=DECISION_INTERVAL_S)
            for r in experiments.run_decisions(store.uow, settings, now):
                changed = True
                if r.get("action") == "promoted":
                    old = rates[champion]
                    exp_after, _, champion_after = serving()
                    res.promotions.append((old, rates[champion_after]))
        if now >= next_generation:
            next_generation = now + timedelta(seconds=GENERATION_CHECK_S)
            for r in handlers.auto_cycle(store.uow, generator, settings, now):
                changed = True
                if r.get("generated") or r["action"] in ("no_candidates",):
                    res.generations += 1
                if r["action"] == "exhausted" and res.exhausted_at_votes is None:
                    res.exhausted_at_votes = res.votes
                stalled_checks = stalled_checks + 1 if r["action"] in ("no_candidates", "exhausted") else 0
        if changed:
            exp, arms, champion = serving()
        if res.users_to_target is None and rates[champion] >= SEED_RATE + TARGET_POINTS - 1e-9:
            res.users_to_target, res.votes_to_target = res.users, res.votes
        if exp is None and stalled_checks >= 3:
            res.stalled_at_votes = res.votes  # nothing will change any more: the rest is the champion's
            break
    for done in rounds.values():
        with store.uow() as uow:
            row = uow.repo.experiment(done.experiment_id)
        assert row is not None
        done.decision = row["decision"] or row["status"]
    res.rounds = list(rounds.values())
    res.final_rate = rates[champion]
    store.dispose()
    return res


def _median(xs: list[int | None]) -> str:
    got = [x for x in xs if x is not None]
    if len(got) * 2 <= len(xs):  # the median run never got there
        return "never"
    ordered = sorted(xs, key=lambda x: float("inf") if x is None else x)
    mid = ordered[(len(ordered) - 1) // 2]
    return "never" if mid is None else f"{mid:,}"


def summarise(profile: Profile, loop: str, runs: list[LoopResult], target_lift: float) -> dict[str, str]:
    reached = sum(1 for r in runs if r.users_to_target is not None)
    within = sum(1 for r in runs if r.votes_to_target is not None and r.votes_to_target <= GOAL_VOTES)
    exhausted = [r.exhausted_at_votes for r in runs]
    return {
        "profile": profile.name,
        "loop": loop,
        "users to +10": _median([r.users_to_target for r in runs]),
        "votes to +10": _median([r.votes_to_target for r in runs]),
        f"<= {GOAL_VOTES} votes": f"{within}/{len(runs)}" + (f" (any {reached})" if reached != within else ""),
        "votes on rounds that could not win": f"{statistics.mean(r.wasted(target_lift) for r in runs):,.0f}",
        "of all votes": f"{statistics.mean(r.wasted(target_lift) / max(1, r.votes) for r in runs):.0%}",
        "rounds": f"{statistics.mean(len(r.rounds) for r in runs):.1f}",
        "false promotions": str(sum(r.false_promotions() for r in runs)),
        "promotions": str(sum(len(r.promotions) for r in runs)),
        "exhausted": f"{sum(x is not None for x in exhausted)}/{len(runs)}"
        + (f" @{_median([x for x in exhausted if x is not None])}" if any(x is not None for x in exhausted) else ""),
        "stalled": f"{sum(r.stalled_at_votes is not None for r in runs)}/{len(runs)}",
        "final rate": f"{statistics.mean(r.final_rate for r in runs):.0%}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one loop per profile and mode, 8,000-vote horizon")
    parser.add_argument("--runs", type=int, default=None, help="loops per profile and mode (default 3)")
    parser.add_argument("--max-votes", type=int, default=None, help="horizon per loop (default 12,000 votes)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--loops", default="today,memory", help="which loops to run: today, memory or both")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    max_votes = args.max_votes or (8000 if args.quick else 12000)
    wanted = [PROFILES[name] for name in args.profiles.split(",")]
    settings = demo_settings()
    t0 = time.perf_counter()
    print(
        f"Multi-round loop benchmark: {runs} loop(s) per profile and mode, horizon {max_votes:,} votes, the demo's "
        f"settings (min {settings.min_feedback_per_arm} / cap {settings.max_feedback_per_arm} votes per arm, "
        f"{settings.generation_count} variants per round, target lift {settings.target_lift:.0%}), seed rate "
        f"{SEED_RATE:.0%}, {FEEDBACK_RATE:.0%} of users vote"
    )
    rows: list[dict[str, str]] = []
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="search-loop-") as tmp:
        for index, profile in enumerate(wanted):
            print(f"\n{profile.name}: {profile.description}", flush=True)
            results: dict[str, list[LoopResult]] = {}
            for loop, remember in (("today", False), ("memory", True)):
                if loop not in args.loops.split(","):
                    continue
                results[loop] = [
                    run_loop(profile, remember, args.seed + 1000 * k + 100 * index, max_votes, Path(tmp))
                    for k in range(runs)
                ]
                row = summarise(profile, loop, results[loop], settings.target_lift)
                rows.append(row)
                print("  " + "  ".join(f"{k}: {v}" for k, v in row.items() if k not in ("profile",)), flush=True)
            if "memory" not in results:
                continue
            mem = results["memory"]
            if profile.reachable(TARGET_POINTS):
                ok = all(r.votes_to_target is not None and r.votes_to_target <= GOAL_VOTES for r in mem)
                verdicts.append(f"{profile.name} memory within {GOAL_VOTES}: {'PASS' if ok else 'MISS'}")
                if profile.name in ("last-trait", "pair") and "today" in results:
                    never = all(r.votes_to_target is None for r in results["today"])
                    verdicts.append(f"{profile.name} today never: {'PASS' if never else 'MISS'}")
            else:
                none = all(not r.promotions or r.false_promotions() == 0 for r in mem) and all(
                    not r.promotions for r in mem
                )
                verdicts.append(f"{profile.name} promotes nothing: {'PASS' if none else 'MISS'}")
    print()
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(width[c]) for c in cols))
    print(
        "\nnote: 'never' = the median loop did not get there within the horizon; '<= 6000 votes' counts the loops "
        "that did; 'stalled' = no experiment and three generation checks in a row with nothing to test (the "
        "loop stopped learning: today's loop re-proposes the same variants, the guardrails reject them); "
        "'exhausted' = the search announced it has nothing left (SearchExhausted), median votes at that point."
    )
    print(f"\nSUMMARY: {', '.join(verdicts)} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
