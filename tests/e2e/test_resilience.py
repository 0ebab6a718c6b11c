"""Health and supervision of the whole system as `make run` starts it: a frozen Redis or a broken store is
reported by /healthz (503, naming what is down) while explanations are still served (their events wait in
the outbox); a killed redis-server and a killed worker are restarted and the system works again."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAST_ENV, start_stack
from tests.support import wait_for

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {FAST_ENV['ADMIN_TOKEN']}"}
EXPLAIN = {"ticker": "AAPL", "signal": "BUY", "context": {"rsi": 28.5}, "session_id": "resilience-1"}
#: "within about a second": the request path's broker deadline is 1 s; this bound leaves room for a busy machine
BOUND_S = 3.0


def _health(url: str) -> httpx.Response:
    return httpx.get(url + "/healthz", timeout=BOUND_S)


def _explanations(url: str) -> int:
    r = httpx.get(url + "/api/admin/llm-learning", headers=ADMIN, timeout=10)
    return int(r.json()["totals"]["explanations"]) if r.status_code == 200 else -1


def test_health_reports_what_is_down_and_requests_do_not_wait_on_a_frozen_broker(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "system")
    try:
        url = stack.url
        ok = _health(url)
        assert ok.status_code == 200, ok.text
        assert ok.json()["services"]["router"]["checks"] == {"store": "ok", "broker": "ok"}
        # private from the start: the data folder, the secrets, the stores, the private Redis has a password
        assert stat.S_IMODE(stack.data_dir.stat().st_mode) == 0o700
        for name in ("router.db", "feedback.db", "redis/redis-auth.conf", "logs/gateway.log"):
            assert stat.S_IMODE((stack.data_dir / name).stat().st_mode) == 0o600, name
        assert (
            stack.redis is not None and stack.redis.password and f":{stack.redis.password}@" in stack.env["REDIS_URL"]
        )

        # each service's dead letters, through the gateway, for admins only
        assert httpx.get(url + "/services/router/dead-letters", timeout=5).status_code == 401
        listed = httpx.get(url + "/services/feedback/dead-letters", headers=ADMIN, timeout=5)
        assert listed.status_code == 200 and listed.json()["items"] == []

        before = _explanations(url)
        assert stack.redis.process is not None
        pid = stack.redis.process.pid
        os.kill(pid, signal.SIGSTOP)  # Redis frozen: connections open, nothing answers
        try:
            started = time.monotonic()
            down = _health(url)
            took = time.monotonic() - started
            assert down.status_code == 503, (down.text, took)
            assert {"router.broker", "feedback.broker", "dashboard.broker"} <= set(down.json()["down"]), down.text
            started = time.monotonic()
            created = httpx.post(url + "/api/explanations", json=EXPLAIN, timeout=BOUND_S)
            took = time.monotonic() - started
            assert created.status_code == 201, (created.text, took)
        finally:
            os.kill(pid, signal.SIGCONT)
        # the explanation's event waited in the router's outbox and reaches the dashboard once Redis answers
        wait_for(lambda: _explanations(url) == before + 1, timeout_s=60, interval_s=0.5, what="the relayed event")
        assert _health(url).status_code == 200

        # a broken store: the router's file is gone
        db = stack.data_dir / "router.db"
        moved = db.with_name("router.db.moved")
        db.rename(moved)
        try:
            broken = _health(url)
            assert broken.status_code == 503 and "router.store" in broken.json()["down"], broken.text
            assert "feedback.store" not in broken.json()["down"]
        finally:
            moved.rename(db)
        wait_for(lambda: _health(url).status_code == 200, timeout_s=10, what="healthy again")

        # supervision: redis-server and a worker die; `make run`'s loop restarts both and says so
        stack.redis.process.kill()
        os.kill(stack.procs["worker-feedback"].pid, signal.SIGKILL)
        said: list[str] = []

        def restarted() -> bool:
            said.extend(stack.supervise_once())
            return any(s.startswith("redis-server exited") and "restarted" in s for s in said) and any(
                s.startswith("worker-feedback exited") and "restarted" in s for s in said
            )

        wait_for(restarted, timeout_s=30, interval_s=0.5, what="both restarted")
        wait_for(lambda: _health(url).status_code == 200, timeout_s=60, interval_s=0.5, what="healthy after restarts")
        # and the system works: an explanation and a vote on it reach the dashboard
        served = httpx.post(url + "/api/explanations", json={**EXPLAIN, "session_id": "after"}, timeout=10).json()
        wait_for(lambda: _explanations(url) == before + 2, timeout_s=60, interval_s=0.5, what="the new explanation")
        vote = httpx.post(
            url + f"/api/feedback/{served['explanation_id']}", json={"rating": 1, "session_id": "after"}, timeout=10
        )
        assert vote.status_code == 202, vote.text

        def votes() -> int:
            r = httpx.get(url + "/api/admin/llm-learning", headers=ADMIN, timeout=10)
            return int(r.json()["totals"]["votes"])

        wait_for(lambda: votes() >= 1, timeout_s=60, interval_s=0.5, what="the vote stored by the restarted worker")
    finally:
        stack.stop()
