"""`make demo`: watch the system learn what its users like.

    python -m bench.demo                  # about 3 minutes on 2 cores
    python -m bench.demo --users 1500     # shorter
    python -m bench.demo --adaptive       # Thompson-sampling allocation instead of fixed splits
    python -m bench.demo --taste last-trait --users 9000   # users who like only what the generator tries last

The whole system starts as `make run` starts it (gateway.run.Stack: private Redis, gateway, one worker per
service, beat), with its clock sped up: an experiment may decide after seconds instead of 7 days, and variant
generation may run every few seconds instead of weekly. No API key is needed: the optimizer's offline
generator writes the variants (bullet points, a risk note, more concise, plain language) and the router's
offline provider honours those cues in the text it writes.

Simulated users then ask for explanations and vote through the public HTTP API. They have hidden tastes the
system is never told (`--taste`, profiles in bench/tastes.py): by default they like bullet points and a risk
note, dislike over-terse answers, and are neutral about plain language; `last-trait` users like only plain
language (the trait the generator lists last), `pair` users only bullet points with a risk note together,
`nothing` users nothing the generator can write. On the seed prompt about 60% of them vote thumbs up. They
judge only the text they get.
The optimizer must find out from their votes: it generates variants of the champion, splits traffic,
promotes the winner when the evidence is in, and starts the next round with the new champion as control.
At the end the demo prints the learning curve (positive rate per window of votes), the champion lineage, every
experiment's decision, and the dashboard's per-version figures from GET /api/admin/llm-learning.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.tastes import PROFILES, SEED_RATE, Profile
from gateway.redis_server import free_port
from gateway.run import Stack

FEEDBACK_RATE = 0.7  # share of users who vote at all
TICKERS = ("AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "META", "GOOG", "AMD", "NFLX", "JPM")
SIGNALS = ("BUY", "SELL", "HOLD")

FAST_CLOCK = {
    "OPTIMIZER_MIN_DURATION_S": "5",  # the plan's 7-day minimum, sped up
    "OPTIMIZER_FEEDBACK_RATE_GRACE_S": "2",  # the feedback rate's 10 minutes for votes on their way, sped up
    "OPTIMIZER_MIN_FEEDBACK_PER_ARM": "100",
    "OPTIMIZER_MAX_FEEDBACK_PER_ARM": "700",  # sample cap: no winner by then -> inconclusive
    "OPTIMIZER_DECISION_INTERVAL_S": "1",
    "OPTIMIZER_GENERATION_CHECK_INTERVAL_S": "2",
    "OPTIMIZER_GENERATION_MIN_INTERVAL_S": "5",  # "at most weekly", sped up
    "OPTIMIZER_AUTO_EXPERIMENT": "true",
    "OPTIMIZER_ADAPTIVE_BATCH": "60",
    "OUTBOX_RELAY_INTERVAL_S": "2",
    "BROKER_VISIBILITY_TIMEOUT": "30",
    "LOG_LEVEL": "WARNING",
    "OPENAI_API_KEY": "",
    "GROQ_API_KEY": "",
    # Every simulated user comes from this one machine: the per-client limits are raised to fit them all
    # (each user is its own session, so the per-session limits keep their defaults).
    "ROUTER_EXPLANATIONS_PER_CLIENT": "1000000/minute",
    "FEEDBACK_VOTES_PER_CLIENT": "1000000/minute",
}


def traits_seen(text: str) -> set[str]:
    """What a reader notices in the text: bullet lines, a risk note, a very short answer, plain words."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    seen = set()
    if lines and sum(ln.lstrip().startswith(("-", "•", "*")) for ln in lines) >= max(1, len(lines) // 2):
        seen.add("bullets")
    if "risk" in text.lower():
        seen.add("risk")
    body = text.lower().split("risk note")[0]
    if len(re.findall(r"[.!?](?:\s|$)", body)) <= 1:
        seen.add("concise")
    if "put simply" in text.lower() or "in plain" in text.lower():
        seen.add("plain")
    return seen


def like_probability(text: str, profile: Profile = PROFILES["demo"]) -> float:
    return profile.rate(traits_seen(text))


@dataclass
class Tally:
    window: int
    votes: list[tuple[int, str]] = field(default_factory=list)  # (thumbs up?, prompt version)
    per_version: dict[str, list[int]] = field(default_factory=dict)

    def add(self, up: bool, version: str) -> None:
        self.votes.append((int(up), version))
        pv = self.per_version.setdefault(version, [0, 0])
        pv[0] += int(up)
        pv[1] += 1

    def rate(self, votes: list[tuple[int, str]]) -> float:
        return sum(v for v, _ in votes) / len(votes) if votes else float("nan")

    def recent(self) -> float:
        return self.rate(self.votes[-self.window :])


def context_for(rng: random.Random) -> dict[str, Any]:
    return {
        "rsi": rng.randint(15, 85),
        "macd": rng.choice(["bullish crossover", "bearish crossover", "flat"]),
        "volume": f"{rng.uniform(0.5, 3):.1f}x average",
        "sma_50_vs_200": rng.choice(["above", "below"]),
    }


def simulate(
    stack: Stack, users: int, seed: int, window: int, max_minutes: float, profile: Profile = PROFILES["demo"]
) -> tuple[Tally, list[str]]:
    from tqdm import tqdm

    rng = random.Random(seed)
    tally = Tally(window)
    champions: list[str] = []
    deadline = time.monotonic() + max_minutes * 60
    admin = {"Authorization": f"Bearer {stack.env['ADMIN_TOKEN']}"}
    with httpx.Client(base_url=stack.url, timeout=30) as http, tqdm(total=users, unit="user", ncols=100) as bar:
        for i in range(users):
            if time.monotonic() > deadline:
                bar.write(f"time limit of {max_minutes:g} min reached after {i} users")
                break
            session = f"demo-{seed}-{i}"
            ticker, signal = rng.choice(TICKERS), rng.choice(SIGNALS)
            r = http.post(
                "/api/explanations",
                json={"ticker": ticker, "signal": signal, "context": context_for(rng), "session_id": session},
            )
            if r.status_code != 201:
                bar.write(f"explanation failed: {r.status_code} {r.text[:200]}")
                continue
            out = r.json()
            if rng.random() < FEEDBACK_RATE:
                up = rng.random() < like_probability(out["text"], profile)
                f = http.post(
                    f"/api/feedback/{out['explanation_id']}", json={"rating": 1 if up else -1, "session_id": session}
                )
                if f.status_code == 202:
                    tally.add(up, out["prompt_version"])
            if i % 100 == 0:
                champ = http.get("/api/prompts/explain_signal").json()["champion"]["version"]
                if not champions or champions[-1] != champ:
                    champions.append(champ)
                    if len(champions) > 1:
                        bar.write(f"  user {i}: the optimizer promoted {champ} to champion")
                running = http.get("/api/experiments", params={"status": "running"}).json()["experiments"]
                exp = running[0]["experiment_id"] if running else "-"
                bar.set_postfix_str(f"champion {champ}, experiment {exp}, recent {tally.recent():.0%} up")
            bar.update(1)
        # Let the last votes land and the last decision run before the summary.
        time.sleep(3)
        http.post("/api/experiments/decisions", headers=admin)
    return tally, champions


def summary(stack: Stack, tally: Tally, profile: Profile = PROFILES["demo"]) -> float:
    admin = {"Authorization": f"Bearer {stack.env['ADMIN_TOKEN']}"}
    print("\nLearning curve (thumbs-up rate per window of votes):")
    w = tally.window
    for start in range(0, len(tally.votes), w):
        chunk = tally.votes[start : start + w]
        if len(chunk) < w // 2:
            break
        rate = tally.rate(chunk)
        versions = sorted({v for _, v in chunk})
        print(
            f"  votes {start + 1:>5}-{start + len(chunk):<5} {rate:6.1%}  {'#' * int(rate * 50):<50} {', '.join(versions)}"
        )
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        prompt = http.get("/api/prompts/explain_signal").json()
        experiments = http.get("/api/experiments").json()["experiments"]
        stats = http.get("/api/admin/llm-learning", headers=admin)
    print("\nPrompt lineage (version <- parent: why; status):")
    for v in prompt["versions"]:
        print(f"  {v['version']:<6} <- {v['parent_version'] or '-':<6} {v['reason'][:60]:<60} {v['status']}")
    search = prompt.get("search") or {}
    if search:
        print("\nSearch rounds (GET /api/prompts/explain_signal -> search):")
        for k, r in enumerate(search.get("rounds", []), 1):
            tried = ", ".join(f"{t['version']} {_pct(t['lift'])}" for t in r["tried"])
            print(f"  round {k}: {r['control']['version']} vs {tried}; {r['votes']} votes; {r['learned'][:90]}")
        state = f"EXHAUSTED: {search['exhausted_reason']}" if search.get("exhausted") else "still searching"
        print(f"  search: {state} ({search.get('remaining')} combinations left)")
    print("\nChampion history:")
    for h in prompt["champion_history"]:
        print(f"  {h['version']:<6} {h['kind']:<10} {h['reason'][:110]}")
    print("\nExperiments (oldest first):")
    for e in reversed(experiments):
        arms = ", ".join(f"{a['arm_id']}={a['prompt_version']}" for a in e["arms"])
        print(f"  {e['experiment_id']}  {e['status']:<10} {e['decision'] or '-':<13} [{arms}]")
        print(f"      {e['reason'][:140]}")
    if stats.status_code == 200:
        body = stats.json()
        print("\nDashboard (GET /api/admin/llm-learning), per prompt version:")
        for row in body.get("per_prompt_version", []):
            rate = row.get("positive_rate")
            print(
                f"  {row.get('prompt_version'):<6} explanations {row.get('explanations', 0):>5}  votes {row.get('votes', 0):>5}  "
                f"positive {rate:.1%}"
                if rate is not None
                else f"  {row.get('prompt_version')}: no votes"
            )
    else:
        print(f"\n(dashboard answered {stats.status_code})")

    seed_votes = [(v, ver) for v, ver in tally.votes if ver == "v1.0"]
    first = tally.rate(seed_votes or tally.votes[:w])
    last = tally.rate(tally.votes[-w:])
    best_traits, best_rate = profile.best()
    target = (
        f"Plan's Phase 2 target: 60% -> 70%+: {'MET' if last >= 0.70 else 'NOT MET'}"
        if profile.reachable(0.10)
        else f"nothing these users like beats the seed (best {best_rate:.0%}): the loop should promote nothing"
    )
    champion = prompt["champion"]["version"]
    own = tally.per_version.get(champion, [0, 0])
    print(
        f"\nPositive rate: {first:.1%} on the seed prompt v1.0 -> {last:.1%} over the last {min(w, len(tally.votes))} "
        f"votes (champion now {champion}: {own[0] / max(1, own[1]):.1%} of its own {own[1]} votes; the rest of the "
        f"recent votes are the running experiment's).  {target}"
    )
    return last


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=6000, help="simulated users (one request each, most vote)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--window", type=int, default=400, help="votes per point of the learning curve")
    parser.add_argument("--max-minutes", type=float, default=6.0, help="stop the traffic after this long")
    parser.add_argument("--adaptive", action="store_true", help="adaptive (Thompson) allocation")
    parser.add_argument("--taste", choices=sorted(PROFILES), default="demo", help="the users' hidden taste profile")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temporary folder")
    args = parser.parse_args(argv)

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="selflearn-demo-"))
    env = dict(FAST_CLOCK, OPTIMIZER_AUTO_ALLOCATION="adaptive" if args.adaptive else "fixed", REDIS_URL="")
    print(f"starting the system (data in {data_dir}) ...", flush=True)
    stack = Stack(data_dir=data_dir, port=free_port(), env_overrides=env)
    try:
        stack.start()
        print(f"up at {stack.url}; admin token in {data_dir}/secrets.env\n", flush=True)
        profile = PROFILES[args.taste]
        print(
            f"Hidden user tastes ({profile.name}): base {SEED_RATE:.0%} thumbs up; {profile.description}.\n", flush=True
        )
        tally, _ = simulate(stack, args.users, args.seed, args.window, args.max_minutes, profile)
        final = summary(stack, tally, profile)
    finally:
        stack.stop()
    return 0 if final >= 0.70 or not profile.reachable(0.10) else 1


if __name__ == "__main__":
    sys.exit(main())
