"""Feedback intake benchmark: `POST /api/feedback/{id}` against a bare FastAPI endpoint, in one run.

Both servers run the same way (one uvicorn process each, same flags) on this machine, side by side, and the
same load generator drives one at a time. Printed as ratios to the bare endpoint:
- accepted feedback per second (closed loop, 32 connections), in alternating slices (`--rounds`): the speed of
  a shared machine drifts over seconds, and two back-to-back blocks would put that drift into the ratio,
- p50 / p99 latency at a fixed 1,000 requests/s (open loop, measured from the scheduled send time),
- the server process's CPU per request in the closed loop (the ratio is bare / feedback: what throughput the
  route could reach against the bare endpoint if its process had a core to itself; it moves least with the
  other load on the machine),
- and how fast one worker drains the queue into SQLite (stored votes per second).
The issue's goal: throughput >= 0.5x the bare endpoint, p99 < 20 ms at 1,000 req/s.
"""

from __future__ import annotations

import argparse
import functools
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.loadgen import Result, closed_loop, open_loop
from gateway.redis_server import RedisServer, free_port
from gateway.run import process_env, worker_command

ROOT = Path(__file__).resolve().parent.parent


def _serve(factory: str, port: int, env: dict[str, str], timeout_s: float = 30.0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            factory,
            "--factory",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"{factory} did not start")


SESSIONS = 1000  # votes cycle over this many (explanation, session) pairs: only the served session's vote counts


def seed_explanations(env: dict[str, str], n: int, services: tuple[str, ...] = ("feedback",)) -> list[uuid.UUID]:
    """n explanations, written into the stores of `services` by their own handlers (in batches, as their workers
    would digest the ExplanationCreated events), in a process with `env`; explanation i was served to session
    f"bench-{i}"."""
    code = (
        "import importlib, uuid\n"
        "from datetime import datetime, UTC\n"
        "from services.feedback.config import get_settings\n"
        "from shared.contracts import ExplanationCreated\n"
        "from shared.db import run_in_one_transaction\n"
        "from shared.privacy import session_key\n"
        "s = get_settings()\n"
        "sinks = []\n"
        f"for service in {list(services)!r}:\n"
        "    handlers, store, config = (importlib.import_module(f'services.{service}.{m}')"
        " for m in ('handlers', 'store', 'config'))\n"
        "    sinks.append((handlers.on_explanation_created, store.Store(config.get_settings().db_url)))\n"
        "events = []\n"
        f"for i in range({n}):\n"
        "    eid = uuid.uuid4(); print(eid)\n"
        "    events.append(ExplanationCreated(explanation_id=eid, request_key='r', ticker='AAPL', signal='BUY',"
        " prompt_name='explain_signal', prompt_version='v1.0', model='offline/template-v1', provider='offline',"
        " prompt_text='p', text='t', tokens_in=1, tokens_out=1, cost_usd=0.0, latency_ms=1.0,"
        " created_at=datetime.now(UTC), session_key=session_key(f'bench-{i}', s.require_session_hash_key())))\n"
        "for k in range(0, len(events), 500):\n"
        "    for each, store in sinks:\n"
        "        assert all(ok for ok, _ in run_in_one_transaction(store.uow(), events[k:k + 500], each))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return [uuid.UUID(line) for line in out.stdout.split()][-n:]


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; None where /proc is not there."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vote(prefix: str, eids: list[uuid.UUID], i: int) -> tuple[str, dict]:
    k = i % SESSIONS
    return f"{prefix}/{eids[k]}", {"rating": 1 if i % 3 else -1, "session_id": f"bench-{k}"}


def _interleaved(
    servers: dict[str, tuple[int, subprocess.Popen, Callable[[int], tuple[str, dict]]]], seconds: float, rounds: int
) -> dict[str, tuple[Result, float | None]]:
    """Closed-loop throughput and server CPU per request of each server, measured in `rounds` alternating slices
    (the order flips each round) that add up to `seconds` each: this machine's speed drifts over seconds, and
    back-to-back blocks would put the drift into the ratio."""
    totals: dict[str, list[float]] = {name: [0, 0, 0.0, 0.0] for name in servers}  # ok, errors, seconds, cpu
    cpu_known = True
    for r in range(rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        for name in order:
            port, proc, make = servers[name]
            before = cpu_seconds(proc.pid)
            res = closed_loop("127.0.0.1", port, make, conns=32, seconds=seconds / rounds)
            after = cpu_seconds(proc.pid)
            t = totals[name]
            t[0], t[1], t[2] = t[0] + res.ok, t[1] + res.errors, t[2] + res.seconds
            if before is None or after is None:
                cpu_known = False
            else:
                t[3] += after - before
    out: dict[str, tuple[Result, float | None]] = {}
    for name, (ok, errors, secs, cpu) in totals.items():
        requests = ok + errors
        cpu_ms = 1000 * cpu / requests if cpu_known and requests else None
        out[name] = (Result(sent=int(requests), ok=int(ok), errors=int(errors), seconds=secs, latencies_ms=[]), cpu_ms)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=6, help="alternating throughput slices per server")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        env = process_env(
            redis_server.url,
            tmp,
            admin_token="bench",
            session_hash_key="bench",
            LOG_LEVEL="WARNING",
            FEEDBACK_VERIFY_UNKNOWN_WITH_ROUTER="false",
            # One load generator is one client: its limit is raised so the doors are measured, not hit. The
            # per-session limit stays at its default (about 10 votes per session in a default run).
            FEEDBACK_VOTES_PER_CLIENT="100000000/minute",
        )
        eids = seed_explanations(env, SESSIONS)

        servers: dict[str, tuple[int, subprocess.Popen, Callable[[int], tuple[str, dict]]]] = {}
        for name, factory, prefix in (
            ("bare", "bench.bare_app:create_app", "/bare"),
            ("feedback", "services.feedback.main:create_app", "/api/feedback"),
        ):
            port = free_port()

            servers[name] = (port, _serve(factory, port, env), functools.partial(_vote, prefix, eids))
        try:
            for port, _, make in servers.values():
                closed_loop("127.0.0.1", port, make, conns=8, seconds=1.0)  # warm-up
            measured = _interleaved(servers, args.seconds, args.rounds)
            (bare_tp, bare_cpu), (fb_tp, fb_cpu) = measured["bare"], measured["feedback"]
            bare_lat, fb_lat = (
                open_loop("127.0.0.1", port, make, rate=args.rate, seconds=args.seconds, conns=64)
                for port, _, make in servers.values()
            )
        finally:
            for _, proc, _ in servers.values():
                proc.terminate()
                proc.wait()

        accepted = fb_tp.ok + fb_lat.ok
        worker = subprocess.Popen(worker_command("feedback"), env=env, cwd=ROOT)
        start = time.perf_counter()
        db = Path(tmp) / "feedback.db"
        stored = 0
        drain_deadline = start + 60
        while time.perf_counter() < drain_deadline:
            time.sleep(0.5)
            if db.exists():
                with sqlite3.connect(db) as conn:
                    processed = conn.execute("select count(*) from processed_messages").fetchone()[0]
                    stored = conn.execute("select count(*) from feedback").fetchone()[0]
                if processed >= accepted:  # warm-up votes included
                    break
        drain_s = time.perf_counter() - start
        worker.terminate()
        worker.wait()

    print(
        f"\nFeedback intake benchmark ({datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, one uvicorn process each)"
    )
    print(f"{'':34}{'bare endpoint':>16}{'POST /api/feedback':>20}{'ratio':>8}")
    print(
        f"{'throughput (req/s, 32 conns)':34}{bare_tp.throughput:>16.0f}{fb_tp.throughput:>20.0f}{fb_tp.throughput / bare_tp.throughput:>8.2f}"
    )
    for q in (50, 99):
        b, f = bare_lat.percentile(q), fb_lat.percentile(q)
        print(f"{f'p{q} latency at {args.rate:.0f} req/s (ms)':34}{b:>16.2f}{f:>20.2f}{f / b:>8.2f}")
    if bare_cpu is not None and fb_cpu is not None:
        print(f"{'server CPU per request (ms)':34}{bare_cpu:>16.3f}{fb_cpu:>20.3f}{bare_cpu / fb_cpu:>8.2f}")
    print(f"{'errors (non-2xx)':34}{bare_tp.errors + bare_lat.errors:>16}{fb_tp.errors + fb_lat.errors:>20}")
    print(
        f"worker drain: {stored} votes stored ({processed} messages) in {drain_s:.1f}s = {processed / drain_s:.0f} msg/s"
    )
    ratio_ok = fb_tp.throughput / bare_tp.throughput >= 0.5
    p99_ok = fb_lat.percentile(99) < 20
    print(
        f"goal throughput >= 0.5x bare: {'PASS' if ratio_ok else 'MISS'}; p99 < 20 ms at {args.rate:.0f} req/s: {'PASS' if p99_ok else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
