"""`make chaos`: the whole system (as `make run` starts it, on 127.0.0.1 only) under steady load while its
processes are killed, then drained and compared against what it acknowledged.

Load: explanations, votes on them (30% followed by a replacement vote from the same session), and erasures of
some sessions, through the gateway. Chaos: a random worker SIGKILLed every 5 s (the supervisor of `make run`
restarts it), and Redis restarted twice (append-only file on). Then the traffic stops, the system drains, and
this prints: acknowledged votes lost (goal 0), duplicates (goal 0), messages dead-lettered and why, erased
sessions still found anywhere: stores, outboxes, dead letters, intake journal, queues (goal 0), 5xx outside the Redis outages (goal 0), seconds to recover.

Bounded: `--minutes` (default 5; `--quick` is 1), and the drain stops after 3 minutes whatever happens.
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.traces import found_in_redis, found_in_sqlite
from gateway.redis_server import free_port
from gateway.run import Stack
from shared.contracts import SERVICES
from shared.privacy import parse_hash_keys, session_key, session_keys
from shared.ratelimit import COUNTER_PREFIX

FAST = {
    "BROKER_VISIBILITY_TIMEOUT": "10",
    "OUTBOX_RELAY_INTERVAL_S": "2",
    "FEEDBACK_JOURNAL_SWEEP_INTERVAL_S": "2",
    "FEEDBACK_JOURNAL_GRACE_S": "15",
    "FEEDBACK_QUARANTINE_RESEND_AFTER_S": "15",
    "MISSING_EVENT_AFTER_S": "15",
    "MISSING_EVENT_CHECK_INTERVAL_S": "5",
    "OPTIMIZER_DECISION_INTERVAL_S": "30",
    "LOG_LEVEL": "WARNING",
    "REDIS_URL": "",  # always the private one: this run kills it
    "HOST": "127.0.0.1",
}
EXPLAIN = {"ticker": "AAPL", "signal": "BUY", "context": {"rsi": 31.0}}
#: tables whose rows are the erasure itself (a keyed hash kept so that votes arriving late are dropped)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: (session, explanation) -> (sequence, rating) of the last acknowledged vote
    acked: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    erased: set[str] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    errors_5xx: list[tuple[float, str, int]] = field(default_factory=list)
    transport_errors: list[tuple[float, str]] = field(default_factory=list)
    seq: int = 0


def _traffic(url: str, tally: Tally, stop: threading.Event, worker: int, seed: int) -> None:
    rng = random.Random(seed + worker)
    with httpx.Client(base_url=url, timeout=10) as client:
        n = 0
        while not stop.is_set():
            n += 1
            erasable = n % 13 == 0  # one iteration in 13: a session used once, then erased
            session = f"chaos-{worker}-erase-{n}" if erasable else f"chaos-{worker}-{n % 40}"
            try:
                r = client.post("/api/explanations", json={**EXPLAIN, "session_id": session})
                _note(tally, "explain", r.status_code)
                if r.status_code != 201:
                    time.sleep(0.2)
                    continue
                eid = r.json()["explanation_id"]
                for _ in range(2 if rng.random() < 0.3 else 1):  # 30%: a replacement vote
                    rating = rng.choice((1, -1))
                    with tally.lock:
                        tally.seq += 1
                        seq = tally.seq
                    v = client.post(f"/api/feedback/{eid}", json={"rating": rating, "session_id": session})
                    _note(tally, "vote", v.status_code)
                    if v.status_code == 202 and not erasable:
                        with tally.lock:
                            tally.acked[(session, eid)] = (seq, rating)
                if erasable:
                    d = client.delete(f"/api/feedback/sessions/{session}")
                    _note(tally, "erase", d.status_code)
                    if d.status_code < 300:
                        with tally.lock:
                            tally.erased.add(session)
            except httpx.HTTPError as exc:
                with tally.lock:
                    tally.transport_errors.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.2)
            time.sleep(0.02)


def _note(tally: Tally, what: str, status: int) -> None:
    with tally.lock:
        tally.statuses[(what, status)] += 1
        if status >= 500:
            tally.errors_5xx.append((time.monotonic(), what, status))


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _rows(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return conn.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="one minute")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--kill-every-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    minutes = 1.0 if args.quick else args.minutes
    data_dir = Path(tempfile.mkdtemp(prefix="selflearn-chaos-"))
    stack = Stack(data_dir=data_dir, port=free_port(), env_overrides=FAST)
    print(f"starting the system (data in {data_dir}) ...", flush=True)
    try:
        stack.start()
    except Exception:
        stack.stop()  # leave no process behind
        raise
    url = stack.url
    tally = Tally()
    stop = threading.Event()
    rng = random.Random(args.seed)
    clients = [
        threading.Thread(target=_traffic, args=(url, tally, stop, i, args.seed), daemon=True)
        for i in range(args.clients)
    ]
    for t in clients:
        t.start()
    outages: list[tuple[float, float]] = []
    recoveries: list[float] = []
    kills: Counter = Counter()
    restarts: list[str] = []
    started = time.monotonic()
    end = started + minutes * 60
    redis_restarts_at = [started + minutes * 60 / 3, started + 2 * minutes * 60 / 3]
    next_kill = started + args.kill_every_s
    print(f"load and chaos for {minutes:g} min ...", flush=True)
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            restarts += stack.supervise_once()
            if now >= next_kill:
                name = rng.choice(sorted(n for n in stack.procs if n.startswith("worker-")))
                proc = stack.procs[name]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills[name] += 1
                next_kill = now + args.kill_every_s
            if redis_restarts_at and now >= redis_restarts_at[0]:
                redis_restarts_at.pop(0)
                assert stack.redis is not None
                down_at = time.monotonic()
                stack.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
                time.sleep(2.0)
                stack.redis.start()
                back = time.monotonic()
                while not _healthy(url) and time.monotonic() - back < 60:
                    restarts += stack.supervise_once()
                    time.sleep(0.2)
                up_at = time.monotonic()
                recoveries.append(up_at - back)
                outages.append((down_at, up_at + 2.0))
                print(f"  redis restarted; healthy {up_at - back:.1f}s after it was back", flush=True)
            time.sleep(0.5)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=15)
    print("draining ...", flush=True)
    feedback_db = data_dir / "feedback.db"
    drain_end = time.monotonic() + 180
    last, stable_since = -1, time.monotonic()
    import redis as redis_client

    r = redis_client.Redis.from_url(stack.env["REDIS_URL"])
    while time.monotonic() < drain_end:
        restarts += stack.supervise_once()
        count = _rows(feedback_db, "select count(*) from feedback")
        n = count[0][0] if count else -1
        held = _rows(feedback_db, "select count(*) from quarantine")  # votes waiting for their explanation
        for replica, known in (("dashboard", "explanations"), ("optimizer", "exposures")):  # same, in replicas
            orphans = _rows(
                data_dir / f"{replica}.db",
                f"select count(*) from votes v where not exists (select 1 from {known} e "
                "where e.explanation_id = v.explanation_id)",
            )
            held = [(held[0][0] + orphans[0][0],)] if held and orphans else held
        busy = r.hlen("journal:feedback") + sum(r.llen(q) for q in SERVICES) + (held[0][0] if held else 0)
        if n != last or busy:
            last, stable_since = n, time.monotonic()
        elif time.monotonic() - stable_since > 15:
            break
        time.sleep(1.0)
    r.close()
    secret = stack.env["SESSION_HASH_KEY"].encode()
    by_pair = {
        (sk, eid): rating
        for sk, eid, rating in _rows(feedback_db, "select session_key, explanation_id, rating from feedback")
    }
    lost = wrong = 0
    for (session, eid), (_, rating) in tally.acked.items():
        got = by_pair.get((session_key(session, secret), eid))
        if got is None:
            lost += 1
        elif got != rating:
            wrong += 1
    dup = _rows(
        feedback_db,
        "select count(*) from (select session_key, explanation_id, count(*) c from feedback group by 1, 2 having c > 1)",
    )
    duplicates = dup[0][0] if dup else 0
    dash_votes = _rows(data_dir / "dashboard.db", "select coalesce(sum(votes), 0) from explanations")
    # Erased sessions, found anywhere: their keyed hash (under every version of the secret) or their raw id in
    # any column of any table of any store (outboxes and dead letters included, JSON read as text), or in any
    # Redis key or value (queues and the intake journal, task messages decoded). Rate-limit counters name the
    # key too; they expire with their window and are reported apart.
    versions = parse_hash_keys(stack.env.get("SESSION_HASH_KEYS", ""), stack.env.get("SESSION_HASH_KEY"))
    secrets = [secret for _, secret in versions]
    erased_needles = {k for s in tally.erased for k in session_keys(s, secrets)} | set(tally.erased)
    shape = re.compile(r"[0-9a-f]{64}|chaos-\d+-erase-\d+")
    found = Counter(found_in_sqlite(sorted(data_dir.glob("*.db")), erased_needles, token=shape))
    in_redis = found_in_redis(stack.env["REDIS_URL"], erased_needles, token=shape)
    limits = [h for h in in_redis if h.startswith(COUNTER_PREFIX)]
    found.update(f"redis {h}" for h in in_redis if not h.startswith(COUNTER_PREFIX))
    dead: Counter = Counter()
    for db in sorted(data_dir.glob("*.db")):
        for task, reason, n in _rows(db, "select task, reason, count(*) from dead_letters group by 1, 2"):
            dead[f"{db.stem}: {task} ({reason})"] += n
    outside = [e for e in tally.errors_5xx if not any(a <= e[0] <= b for a, b in outages)]
    stack.stop()

    votes_acked = sum(c for (what, status), c in tally.statuses.items() if what == "vote" and status == 202)
    print(f"\nchaos run: {minutes:g} min, {args.clients} clients, {sum(kills.values())} worker SIGKILLs "
          f"({', '.join(f'{k} {v}' for k, v in sorted(kills.items()))}), {len(outages)} Redis restarts")  # fmt: skip
    print(f"requests: {dict(sorted((f'{w} {s}', c) for (w, s), c in tally.statuses.items()))}")
    print(
        f"votes acknowledged: {votes_acked} ({len(tally.acked)} (session, explanation) pairs checked, erased sessions aside)"
    )
    print(f"acknowledged votes lost: {lost} (goal 0); stored with an older replacement's rating: {wrong}")
    print(f"duplicates (two rows for one session and explanation): {duplicates} (goal 0); "
          f"feedback rows {last}, dashboard votes {dash_votes[0][0] if dash_votes else '?'}")  # fmt: skip
    print(f"dead letters: {dict(dead) or 'none'}")
    copies = {
        "router": "select count(*) from explanations",
        "feedback": "select count(*) from explanations",
        "optimizer": "select count(*) from exposures",
        "dashboard": "select count(*) from explanations",
    }
    counts = {name: (_rows(data_dir / f"{name}.db", sql) or [("?",)])[0][0] for name, sql in copies.items()}
    vote_sql = {"feedback": "feedback", "optimizer": "votes", "dashboard": "votes", "finetune": "votes"}
    voted = {name: (_rows(data_dir / f"{name}.db", f"select count(*) from {t}") or [("?",)])[0][0] for name, t in vote_sql.items()}  # fmt: skip
    print(f"explanations per store (router is the source): {counts}; votes per store: {voted}")
    print(
        f"erased sessions: {len(tally.erased)}; still found anywhere (stores, outboxes, dead letters, journal, "
        f"queues): {sorted(found) or 'nowhere'} (goal: nowhere); rate-limit counters naming them (expire): {len(limits)}"
    )
    print(f"5xx outside the Redis outages: {len(outside)} (goal 0) {Counter((w, s) for _, w, s in outside) or ''}")
    print(f"transport errors (connection refused/reset): {len(tally.transport_errors)}")
    print(f"seconds to healthy after each Redis restart: {[round(x, 1) for x in recoveries]}")
    print(f"data (logs, stores) kept in {data_dir}")
    return 0 if lost == 0 and duplicates == 0 and not found and not outside else 1


if __name__ == "__main__":
    sys.exit(main())
