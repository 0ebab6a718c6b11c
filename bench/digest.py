"""Sustained feedback: votes accepted and fully digested per second, the lag until the dashboard shows them,
and how the feedback worker's drain rate scales, in one run (one uvicorn process per API, one Celery worker
per service, as `make run` starts them). Printed as ratios:

1. sustained: 32 connections post votes for `--seconds` while the feedback, optimizer and dashboard workers
   digest them; "digested" means stored by feedback and counted by optimizer and dashboard (their processed
   ids). The digest rate is the accepted votes over the time from the first vote to the last one digested,
   beside the intake rate of the same phase (goal >= 0.9x).
2. lag: votes at a fixed `--rate` (open loop, one new session each); `GET /api/admin/llm-learning` is polled
   every 50 ms, and a vote's lag is from its 202 to the first poll whose vote count includes it (the k-th
   vote answered is taken as visible once the count has grown by k: first in, first out). p50/p99 (goal p99
   < 1 s at 500 votes/s).
3. drain: a backlog of `--backlog` votes queued with no worker, then drained by one feedback worker digesting
   one message per transaction (TASK_BATCH_SIZE=1, the way every consumer worked before batches), by one
   batching worker taking its messages one per round trip as kombu's Redis transport does (BROKER_BULK_TAKE=0),
   by one batching worker (taking a backlog in bulk: shared.redis_transport), and by two (ratios to the one
   batching worker). Timed from the first vote stored to the last (the workers' start is not counted).
4. store: `--store-votes` explanations, then a vote on each, digested in batches of 100 straight into each
   store (no queue), by the one-message handlers each in its savepoint (`run_in_one_transaction`) and by the
   set-based batch handlers (`run_batch`), on fresh stores: time per message and the ratio, per service and
   kind of message (`--store-only`: this phase alone).
5. events to a message: `--events` ExplanationCreated and a FeedbackRecorded on each, published as outbox relays
   publish them (`publish_many`, 50 at a time) with no worker running, then digested by one optimizer and one
   dashboard worker; once with every event a task message of its own, once many to a message
   (`shared.bus.MANY_TO_A_MESSAGE`), each on fresh stores. Per worker: events per second from the first
   handled to the last, and the worker's CPU time per event over the same span (/proc), with the ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.feedback_throughput import _serve, seed_explanations
from bench.loadgen import closed_loop, open_loop
from gateway.redis_server import RedisServer, free_port
from gateway.run import worker_command

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bench"


def _count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def _worker(service: str, env: dict[str, str], name: str | None = None, **extra: str) -> subprocess.Popen:
    cmd = worker_command(service)
    if name:
        cmd[cmd.index("-n") + 1] = f"{name}@%h"
    return subprocess.Popen(cmd, env={**env, **extra}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(check: Callable[..., Any], timeout_s: float, interval_s: float = 0.05) -> float | None:
    """Seconds until check() is true (polled), or None at the timeout."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if check():
            return time.perf_counter() - start
        time.sleep(interval_s)
    return None


def store_phase(tmp: Path, n: int) -> dict[str, tuple[float, float]]:
    """Milliseconds per message, (one message per savepoint, set-based), per store and kind of message
    (phase 4): n ExplanationCreated, then a vote on each explanation (the feedback service's RecordFeedback, the
    others' FeedbackRecorded)."""
    from services.dashboard import handlers as dh
    from services.dashboard.store import Store as DashboardStore
    from services.feedback import handlers as fh
    from services.feedback.store import Store as FeedbackStore
    from services.finetune import handlers as th
    from services.finetune.store import Store as FinetuneStore
    from services.optimizer import handlers as oh
    from services.optimizer.store import Store as OptimizerStore
    from shared.contracts import ExplanationCreated, FeedbackRecorded
    from shared.privacy import session_key

    keys = [session_key(f"store-{i}", b"bench") for i in range(n)]
    created = [
        ExplanationCreated(
            explanation_id=uuid.uuid4(), request_key="r", ticker="AAPL", signal="BUY", prompt_name="explain_signal",
            prompt_version="v1.0", model="offline/template-v1", provider="offline", prompt_text="p", text="t",
            tokens_in=1, tokens_out=1, cost_usd=0.0, latency_ms=1.0, created_at=datetime.now(UTC), session_key=k,
        )
        for k in keys
    ]  # fmt: skip
    cast = [fh.new_vote(e.explanation_id, k, 1, None, None) for e, k in zip(created, keys, strict=True)]
    recorded = [
        FeedbackRecorded(
            feedback_id=v.feedback_id, explanation_id=v.explanation_id, session_key=v.session_key, rating=1,
            stars=None, has_comment=False, replaced=False, submitted_at=v.submitted_at,
            prompt_name="explain_signal", prompt_version="v1.0", model="offline/template-v1", signal="BUY",
            ticker="AAPL",
        )
        for v in cast
    ]  # fmt: skip
    services: list[tuple[str, Any, Any, Any, Any, list[Any]]] = [
        ("feedback", FeedbackStore, fh, fh.record_feedback, fh.record_feedback_batch, cast),
        ("optimizer", OptimizerStore, oh, oh.on_feedback_recorded, oh.on_feedback_recorded_batch, recorded),
        ("dashboard", DashboardStore, dh, dh.on_feedback_recorded, dh.on_feedback_recorded_batch, recorded),
        ("finetune", FinetuneStore, th, th.on_feedback_recorded, th.on_feedback_recorded_batch, recorded),
    ]
    out: dict[str, tuple[float, float]] = {}
    for name, make, module, each, many, messages in services:
        explanations, votes = [], []
        for way in ("each", "many"):
            store = make(f"sqlite:///{tmp / f'store-{name}-{way}.db'}")
            set_based = way == "many"
            batch_of_explanations = module.on_explanation_created_batch if set_based else None
            explanations.append(_digest_ms(store, created, module.on_explanation_created, batch_of_explanations))
            votes.append(_digest_ms(store, messages, each, many if set_based else None))
            store.dispose()
        out[f"{name} explanations"] = (explanations[0], explanations[1])
        out[f"{name} votes"] = (votes[0], votes[1])
    return out


def _digest_ms(store: Any, messages: list[Any], each: Any, many: Any, batch: int = 100) -> float:
    """Milliseconds per message to digest `messages` into `store` in batches of `batch`: by the one-message
    handler `each` in savepoints (`run_in_one_transaction`), or by the set-based `many` (`run_batch`)."""
    from shared.db import run_batch, run_in_one_transaction

    started = time.perf_counter()
    for k in range(0, len(messages), batch):
        part = messages[k : k + batch]
        results = run_batch(store.uow(), part, many, each) if many else run_in_one_transaction(store.uow(), part, each)
        assert all(ok for ok, _ in results), results
    return (time.perf_counter() - started) / len(messages) * 1000


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _events(n: int) -> list[Any]:
    """n ExplanationCreated and, after them, a FeedbackRecorded on each (one session each)."""
    from shared.contracts import ExplanationCreated, FeedbackRecorded

    now = datetime.now(UTC)
    served = [
        ExplanationCreated(
            explanation_id=uuid.uuid4(), request_key="r", ticker="AAPL", signal="BUY", prompt_name="explain_signal",
            prompt_version="v1.0", model="offline/template-v1", provider="offline", prompt_text="p", text="t",
            tokens_in=1, tokens_out=1, cost_usd=0.0, latency_ms=1.0, created_at=now, session_key=f"{i:064x}",
        )
        for i in range(n)
    ]  # fmt: skip
    votes = [
        FeedbackRecorded(
            feedback_id=uuid.uuid4(), explanation_id=e.explanation_id, session_key=e.session_key or "", rating=1,
            submitted_at=now, prompt_name=e.prompt_name, prompt_version=e.prompt_version, model=e.model,
            signal=e.signal, ticker=e.ticker,
        )
        for e in served
    ]  # fmt: skip
    return [*served, *votes]


def events_phase(tmp: Path, redis_url: str, env: dict[str, str], n: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Phase 5: per mode ("one", "many"), per worker: (events/s from the first handled to the last, CPU ms per
    event over that span)."""
    import redis

    from shared.bus import CeleryBus, declare_topology, make_celery
    from shared.settings import ServiceSettings

    app = make_celery("bench", ServiceSettings(redis_url=redis_url))
    declare_topology(app)
    r = redis.Redis.from_url(redis_url)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for mode in ("one", "many"):
        data = tmp / f"events-{mode}"
        data.mkdir()
        bus = CeleryBus(app, deadline_s=10.0, many_to_a_message=mode == "many")
        events = _events(n)
        for k in range(0, len(events), 50):
            bus.publish_many(events[k : k + 50])
        r.delete("feedback", "finetune")  # their consumers are not measured here
        services = ("optimizer", "dashboard")
        workers = {s: _worker(s, {**env, "DATA_DIR": str(data)}) for s in services}
        try:
            for service, proc in workers.items():
                db = data / f"{service}.db"
                handled = lambda db=db: _count(db, "select count(*) from processed_messages")  # noqa: E731
                _wait(lambda h=handled: h() > 0, timeout_s=120, interval_s=0.01)
                first, cpu0, t0 = handled(), _cpu_s(proc.pid), time.perf_counter()
                _wait(lambda h=handled, total=len(events): h() >= total, timeout_s=600, interval_s=0.02)
                took, cpu = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0
                done = handled() - first
                out.setdefault(mode, {})[service] = (done / took, cpu * 1000 / max(1, done))
        finally:
            _stop(*workers.values())
    r.close()
    return out


class Stores:
    def __init__(self, data_dir: Path, seeded: int) -> None:
        self.feedback = data_dir / "feedback.db"
        self.optimizer = data_dir / "optimizer.db"
        self.dashboard = data_dir / "dashboard.db"
        self.seeded = seeded

    def votes_stored(self) -> int:
        """Vote messages the feedback worker has handled (its processed ids less the explanations')."""
        return _count(self.feedback, "select count(*) from processed_messages") - self.seeded

    def recorded(self) -> int:
        return _count(self.feedback, "select count(*) from outbox where event_type = 'feedback.recorded'")

    def counted(self, db: Path) -> int:
        """FeedbackRecorded events a downstream service has handled."""
        return _count(db, "select count(*) from processed_messages") - self.seeded


def _bench_env(redis_url: str, data_dir: str) -> dict[str, str]:
    """The environment of the bench's servers and workers: this Redis and data folder."""
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATA_DIR": data_dir,
        "ADMIN_TOKEN": ADMIN,
        "SESSION_HASH_KEY": "bench",
        "LOG_LEVEL": "WARNING",
        "FEEDBACK_VERIFY_UNKNOWN_WITH_ROUTER": "false",
        # One load generator is one client with few sessions: the doors are measured elsewhere, not hit here.
        "FEEDBACK_VOTES_PER_CLIENT": "100000000/minute",
        "FEEDBACK_VOTES_PER_SESSION": "100000000/minute",
        "FEEDBACK_MAX_BACKLOG": "100000000",  # no backpressure: the digest rate is what is measured
        "PYTHONPATH": str(ROOT),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument(
        "--backlog",
        type=int,
        default=10_000,
        help="votes queued before each drain; a worker prefetches two batches of messages, and with votes many to"
        " a message that can be a few thousand votes: a second worker only helps with a backlog larger than that",
    )
    parser.add_argument("--store-votes", type=int, default=2000)
    parser.add_argument("--store-only", action="store_true", help="phase 4 alone")
    parser.add_argument("--events", type=int, default=3000, help="phase 5: explanations (and as many votes)")
    parser.add_argument("--events-only", action="store_true", help="phase 5 alone")
    args = parser.parse_args(argv)
    lag_votes = int(args.rate * args.seconds)
    loop_sessions = 1000
    seeded = loop_sessions + lag_votes

    per_store = per_events = None
    if not args.events_only:
        with tempfile.TemporaryDirectory() as tmp:
            per_store = store_phase(Path(tmp), args.store_votes)
    if not args.store_only:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
            per_events = events_phase(Path(tmp), redis_server.url, _bench_env(redis_server.url, tmp), args.events)
    if args.store_only or args.events_only:
        _print_phases(per_store, per_events)
        return 0
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        env = _bench_env(redis_server.url, tmp)
        stores = Stores(Path(tmp), seeded)
        t0 = time.perf_counter()
        eids = seed_explanations(env, seeded, ("feedback", "optimizer", "dashboard"))
        seed_s = time.perf_counter() - t0
        fb_port, dash_port = free_port(), free_port()
        apis = [
            _serve("services.feedback.main:create_app", fb_port, env, 180),
            _serve("services.dashboard.main:create_app", dash_port, env, 180),
        ]
        workers = [_worker(s, env) for s in ("feedback", "optimizer", "dashboard")]
        time.sleep(5)  # the workers start (and open their stores) before the load
        try:
            # 1. sustained
            def loop_vote(i: int) -> tuple[str, dict]:
                k = i % loop_sessions
                return f"/api/feedback/{eids[k]}", {"rating": 1 if i % 3 else -1, "session_id": f"bench-{k}"}

            # Who spends the two cores (from /proc): the processes of the system, Redis, and this one (the load
            # generator, and the polling of the stores).
            procs = {"feedback API": apis[0].pid, "feedback worker": workers[0].pid,
                     "optimizer worker": workers[1].pid, "dashboard worker": workers[2].pid}  # fmt: skip
            if redis_server.process is not None:
                procs["Redis"] = redis_server.process.pid
            procs["load generator (this process)"] = os.getpid()
            cpu_before = {name: _cpu_s(pid) for name, pid in procs.items()}
            started = time.perf_counter()
            tp = closed_loop("127.0.0.1", fb_port, loop_vote, conns=32, seconds=args.seconds)
            finished: dict[str, float] = {}  # store -> seconds from the start until it held every vote

            def digested() -> bool:
                now = time.perf_counter() - started
                if "feedback" not in finished and stores.votes_stored() >= tp.ok:
                    finished["feedback"] = now
                if "feedback" not in finished:
                    return False
                recorded = stores.recorded()
                for name, db in (("optimizer", stores.optimizer), ("dashboard", stores.dashboard)):
                    if name not in finished and stores.counted(db) >= recorded:
                        finished[name] = now
                return len(finished) == 3

            digest_wait = _wait(digested, timeout_s=600, interval_s=0.05)
            digest_s = time.perf_counter() - started if digest_wait is not None else float("nan")
            cpu_used = {name: _cpu_s(pid) - cpu_before[name] for name, pid in procs.items()}
            intake = tp.ok / tp.seconds
            digest = tp.ok / digest_s

            # 2. lag at a fixed rate, one new session per vote
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{dash_port}", headers={"Authorization": f"Bearer {ADMIN}"}
            )

            def visible_votes() -> int:
                return int(client.get("/api/admin/llm-learning").json()["totals"]["votes"])

            base = visible_votes()
            polls: list[tuple[float, int]] = []
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    polls.append((time.time(), visible_votes()))
                    time.sleep(0.05)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()

            def lag_vote(i: int) -> tuple[str, dict]:
                k = loop_sessions + i
                return f"/api/feedback/{eids[k]}", {"rating": 1, "session_id": f"bench-{k}"}

            lat = open_loop("127.0.0.1", fb_port, lag_vote, rate=args.rate, seconds=args.seconds, conns=64)
            _wait(lambda: bool(polls) and polls[-1][1] - base >= lat.ok, timeout_s=120)
            stop.set()
            poller.join()
            client.close()
            answered = sorted(t for _, t in lat.answered_at)
            lags: list[float] = []
            j = 0
            for k, t in enumerate(answered, start=1):
                while j < len(polls) and polls[j][1] - base < k:
                    j += 1
                if j == len(polls):
                    break
                lags.append(max(0.0, polls[j][0] - t))
            lags.sort()
            missing = len(answered) - len(lags)
        finally:
            _stop(*apis)
        _stop(*workers)

        # 3. drain of a backlog: batch of one, one batching worker, two batching workers
        import redis

        r = redis.Redis.from_url(redis_server.url)
        fb = _serve("services.feedback.main:create_app", fb_port, env, 180)
        drains: dict[str, float] = {}
        try:
            for label, count, extra in (
                ("1 worker, 1 message per transaction", 1, {"TASK_BATCH_SIZE": "1"}),
                ("1 worker, batches, kombu's one-by-one take", 1, {"BROKER_BULK_TAKE": "0"}),
                ("1 worker, batches", 1, {}),
                ("2 workers, batches", 2, {}),
            ):
                before = stores.votes_stored()

                def backlog_vote(i: int, before: int = before) -> tuple[str, dict]:
                    k = (before + i) % seeded
                    return f"/api/feedback/{eids[k]}", {"rating": 1, "session_id": f"bench-{k}"}

                queued = 0
                while queued < args.backlog:
                    queued += closed_loop("127.0.0.1", fb_port, backlog_vote, conns=32, seconds=0.5).ok
                ws = [_worker("feedback", env, name=f"feedback{i}", **extra) for i in range(count)]
                # Timed from the first vote stored, not from the start of the processes: a worker's start (a second
                # or two of imports, both at once on two cores) would otherwise be a large share of a fast drain.
                _wait(lambda b=before: stores.votes_stored() > b, timeout_s=120, interval_s=0.01)
                first = stores.votes_stored() - before
                took = _wait(lambda b=before, q=queued: stores.votes_stored() >= b + q, timeout_s=600)
                _stop(*ws)
                drains[label] = (queued - first) / took if took else float("nan")
                r.delete("feedback")  # anything a stopped worker gave back would count in the next round
        finally:
            _stop(fb)
            r.close()

    p = lambda q: lags[min(len(lags) - 1, int(q / 100 * len(lags)))] * 1000 if lags else float("nan")  # noqa: E731
    print(f"\nSustained feedback ({datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores; one worker per service,"
          f" TASK_BATCH_SIZE={os.environ.get('TASK_BATCH_SIZE', '100')}; seeding {seeded} explanations took"
          f" {seed_s:.1f} s)")  # fmt: skip
    print(f"{'intake, 32 connections (votes/s)':46}{intake:>10.0f}")
    print(f"{'accepted and fully digested (votes/s)':46}{digest:>10.0f}   ratio {digest / intake:.2f} (goal >= 0.9)")
    wall = tp.seconds if math.isnan(digest_s) else digest_s
    print(f"  the intake ran {tp.seconds:.1f} s; each store held every vote after "
          + ", ".join(f"{name} {at:.1f} s" for name, at in finished.items()))  # fmt: skip
    print(f"  CPU from the first vote to the last digested ({wall:.1f} s, {os.cpu_count()} cores), ms per vote and"
          " share of the machine:")  # fmt: skip
    for name, used in cpu_used.items():
        print(f"    {name:40}{used / tp.ok * 1000:>8.3f}{used / (wall * (os.cpu_count() or 1)):>8.0%}")
    print(f"{f'lag 202 -> visible, p50 at {args.rate:.0f} votes/s (ms)':46}{p(50):>10.0f}")
    print(f"{f'lag 202 -> visible, p99 at {args.rate:.0f} votes/s (ms)':46}{p(99):>10.0f}   (goal < 1000)"
          + (f"; {missing} votes never seen" if missing else ""))  # fmt: skip
    print(f"  (answered at the rate: {lat.ok} of {lat.sent}, p99 of the 202 {lat.percentile(99):.1f} ms)")
    one = drains.get("1 worker, batches") or float("nan")
    for label, rate in drains.items():
        print(f"{'drain, ' + label + ' (votes/s)':46}{rate:>10.0f}   ratio {rate / one:.2f}")
    _print_phases(per_store, per_events)
    return 0


def _print_phases(
    per_store: dict[str, tuple[float, float]] | None, per_events: dict[str, dict[str, tuple[float, float]]] | None
) -> None:
    for name, (each_ms, many_ms) in (per_store or {}).items():
        print(f"{'store ' + name + ', ms/message: savepoints / set-based':64}{each_ms:>5.2f} / {many_ms:.2f}"
              f"   ratio {each_ms / many_ms:.1f}x")  # fmt: skip
    if per_events:
        for service, (one_rate, one_cpu) in per_events["one"].items():
            many_rate, many_cpu = per_events["many"][service]
            print(f"{'events ' + service + ', CPU ms/event: one / many to a message':64}{one_cpu:>5.3f} / "
                  f"{many_cpu:.3f}   ratio {many_cpu / one_cpu:.2f}x")  # fmt: skip
            print(f"{'events ' + service + ', events/s: one / many to a message':64}{one_rate:>5.0f} / "
                  f"{many_rate:.0f}   ratio {many_rate / one_rate:.2f}x")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
