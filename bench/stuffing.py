"""Ballot stuffing against the real system: can fresh session ids vote an arm up?

    python -m bench.stuffing                 # about a minute on 2 cores
    python -m bench.stuffing --attackers 500

The whole system starts as `make run` starts it (private Redis, gateway, one worker per service, beat). An
operator starts an A/A experiment (two prompt versions the simulated users like equally: 60% thumbs up on
both). Honest users, one session each, ask for an explanation and vote on it. Then the attack from the review
(issue 7): `--attackers` fresh session ids up-vote one explanation served on the treatment arm, in two waves:

1. the race: the feedback worker is stopped, so the feedback service has not yet learnt of the explanation
   when the votes arrive; they are accepted (202) and held until the explanation's event is handled, then
   checked against the session it was served to;
2. the door: once the feedback service knows the explanation, the same attack is refused at once (403).

The figure is measured against the router's own record of which session each explanation was served to
(router.db), not the feedback service's: votes stored by the feedback service from any other session, and the
votes the optimizer counts per arm against the honest votes sent. Target: 0 votes from sessions not served.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

from gateway.redis_server import free_port
from gateway.run import Stack
from shared.prompts import SEED_TEMPLATE

LIKE_RATE = 0.60  # the same on both arms: an A/A experiment for these users
BULLETS = SEED_TEMPLATE.replace(
    "Explain in 3-4 sentences why the indicators support a {signal} signal for {ticker}. "
    "Mention the most important indicator first.",
    "Answer with 3 bullet points, one per key indicator, strongest first, on why {ticker} is a {signal}.",
)
ENV = {
    "OPTIMIZER_AUTO_EXPERIMENT": "false",
    "OPTIMIZER_DECISION_INTERVAL_S": "3600",  # the figure is what is counted, not what a decision does with it
    "OUTBOX_RELAY_INTERVAL_S": "2",
    "BROKER_VISIBILITY_TIMEOUT": "30",
    "LOG_LEVEL": "WARNING",
    "OPENAI_API_KEY": "",
    "GROQ_API_KEY": "",
    "REDIS_URL": "",
    "FEEDBACK_JOURNAL_SWEEP_INTERVAL_S": "2",
    "FEEDBACK_JOURNAL_GRACE_S": "10",
    # One machine plays every user: the per-client limits are raised so the honest traffic fits (the attack
    # comes from one client too, so the rate limits are not what stops it here: the session check is).
    "ROUTER_EXPLANATIONS_PER_CLIENT": "1000000/minute",
    "FEEDBACK_VOTES_PER_CLIENT": "1000000/minute",
}


def _wait(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what} (last: {value!r})")


def _db(stack: Stack, service: str, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(stack.data_dir / f"{service}.db") as conn:
        return conn.execute(sql, args).fetchall()


def run(stack: Stack, honest: int, attackers: int, seed: int) -> int:
    rng = random.Random(seed)
    admin = {"Authorization": f"Bearer {stack.env['ADMIN_TOKEN']}"}
    with httpx.Client(base_url=stack.url, timeout=30) as http:
        treatment = http.post("/api/prompts/explain_signal/versions", json={"template": BULLETS}, headers=admin)
        treatment.raise_for_status()
        version = treatment.json()["version"]
        model = http.get("/api/prompts/explain_signal").json()["champion"]["model"]
        exp = http.post(
            "/api/experiments",
            headers=admin,
            json={
                "prompt_name": "explain_signal",
                "allocation": "fixed",
                "arms": [
                    {"prompt_version": "v1.0", "model": model, "weight": 0.5, "is_control": True},
                    {"prompt_version": version, "model": model, "weight": 0.5},
                ],
            },
        )
        exp.raise_for_status()
        experiment_id = exp.json()["experiment_id"]

        def explain(session: str) -> dict:
            r = http.post(
                "/api/explanations",
                json={"ticker": "NVDA", "signal": "BUY", "context": {"rsi": 28}, "session_id": session},
            )
            r.raise_for_status()
            return r.json()

        _wait(lambda: explain("probe")["experiment_id"] == experiment_id, 30, "the router to serve the experiment")

        # Honest users: one session each, each votes on what it was served.
        sent_per_arm: Counter[str] = Counter()
        for i in range(honest):
            out = explain(f"honest-{i}")
            up = rng.random() < LIKE_RATE
            r = http.post(
                f"/api/feedback/{out['explanation_id']}", json={"rating": 1 if up else -1, "session_id": f"honest-{i}"}
            )
            r.raise_for_status()
            sent_per_arm[out["arm_id"]] += 1

        def served_on_treatment(prefix: str) -> dict[str, Any]:
            """An explanation served on the treatment arm: new sessions ask until the router picks that arm."""
            for i in range(200):
                out = explain(f"{prefix}-{i}")
                if out["prompt_version"] == version:
                    return out
            raise AssertionError("the router never served the treatment arm")

        # The target: an explanation served on the treatment arm.
        target = served_on_treatment("victim")
        target_id = target["explanation_id"]

        def stuff(wave: str) -> Counter[int]:
            def vote(k: int) -> int:
                with httpx.Client(base_url=stack.url, timeout=30) as c:
                    r = c.post(
                        f"/api/feedback/{target_id}",
                        json={"rating": 1, "stars": 5, "session_id": f"stuffer-{wave}-{k}"},
                    )
                    return r.status_code

            with ThreadPoolExecutor(8) as pool:
                return Counter(pool.map(vote, range(attackers)))

        journal = redis.Redis.from_url(stack.env["REDIS_URL"])

        def drained() -> tuple[int, int, bool]:
            pending = journal.hlen("journal:feedback")  # accepted votes no worker has handled yet
            stored = _db(stack, "feedback", "select count(*) from feedback")[0][0]
            held = bool(_db(stack, "feedback", "select 1 from quarantine limit 1"))
            return (pending, stored, held) if pending == 0 and stored >= honest and not held else ()  # type: ignore[return-value]

        # Wave 1, the race: a second explanation on the treatment arm that the feedback service cannot know
        # yet (its worker is stopped), attacked at once. The worker is stopped once it has stored the honest
        # votes (a kill in the middle of one would only delay it until the broker hands it out again).
        _wait(drained, 120, "the honest votes to be stored")
        stack.kill("worker-feedback")
        target, first_target = served_on_treatment("victim-race"), target
        race = stuff("race")
        stack.start_process("worker-feedback")

        # Wave 2, the door: the feedback service knows the first target by now.
        target = first_target
        _wait(
            lambda: _db(
                stack, "feedback", "select 1 from explanations where explanation_id = ?", target["explanation_id"]
            ),
            30,
            "the feedback service to learn of the target",
        )
        door = stuff("door")

        # Drain: every honest vote stored, the race wave's votes handled, the optimizer caught up.
        _wait(drained, 120, "the feedback worker to drain")
        journal.close()

        def counted() -> dict[str, int]:
            """Votes per arm in the optimizer's own analysis of the experiment."""
            view = http.get(f"/api/experiments/{experiment_id}", headers=admin).json()
            return {a["arm_id"]: int(a.get("n", 0)) for a in (view.get("analysis") or {}).get("arms", [])}

        _wait(lambda: sum(counted().values()) >= honest, 60, "the optimizer to count the honest votes")
        time.sleep(3)  # anything late would show up now
        per_arm = counted()
        dropped = http.get("/api/feedback/quarantine", headers=admin).json().get("dropped", {})

    served = dict(_db(stack, "router", "select explanation_id, session_key from explanations"))
    stored = _db(stack, "feedback", "select explanation_id, session_key from feedback")
    not_served = sum(1 for eid, key in stored if served.get(eid) != key)
    extra = sum(max(0, n - sent_per_arm.get(arm, 0)) for arm, n in per_arm.items())

    print(f"\nStuffing an A/A experiment ({honest} honest sessions, {attackers} fresh session ids per wave)")
    print(f"  race wave (feedback worker stopped): HTTP {dict(sorted(race.items()))}")
    print(f"  door wave (explanation known):       HTTP {dict(sorted(door.items()))}")
    print(f"  dropped by the worker, by reason:    {dropped}")
    print(f"  honest votes sent per arm:           {dict(sorted(sent_per_arm.items()))}")
    print(f"  votes the optimizer counts per arm:  {dict(sorted(per_arm.items()))}")
    print(f"\n{'figure':48}{'measured':>10}{'target':>8}")
    print(f"{'votes stored from sessions not served':48}{not_served:>10}{0:>8}")
    print(f"{'votes counted by the optimizer beyond honest':48}{extra:>10}{0:>8}")
    ok = not_served == 0 and extra == 0
    print(f"\nstuffing goal (0 votes counted from sessions not served): {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--honest", type=int, default=200, help="honest sessions (one explanation and vote each)")
    parser.add_argument("--attackers", type=int, default=150, help="fresh session ids per attack wave")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="selflearn-stuffing-"))
    stack = Stack(data_dir=data_dir, port=free_port(), env_overrides=ENV)
    try:
        stack.start()
        return run(stack, args.honest, args.attackers, args.seed)
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
