"""The live stream over real HTTP (uvicorn in a subprocess): a snapshot at once, another when the read model
changes, heartbeat comments in between, and the server stays responsive while streams are open."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.redis_server import RedisServer, free_port
from services.dashboard import handlers
from services.dashboard.store import Store
from tests.support import explanation_created, feedback_recorded, wait_for, worker_env

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "stream-token"


@pytest.fixture
def server(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[str, Store]]:
    port = free_port()
    env = worker_env(
        redis_server.url, tmp_path, ADMIN_TOKEN=TOKEN, DASHBOARD_STREAM_POLL_S="0.1", DASHBOARD_STREAM_HEARTBEAT_S="0.3"
    )
    log = open(tmp_path / "uvicorn.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.dashboard.main:create_app", "--factory", "--port", str(port),
         "--log-level", "warning"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    store = Store(f"sqlite:///{tmp_path / 'dashboard.db'}")
    try:
        wait_for(up, timeout_s=30, what="the dashboard to start")
        yield url, store
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        store.dispose()


def add_vote(store: Store) -> None:
    ex = explanation_created(None, "s", ticker="AMD", signal="SELL", prompt_name="explain", prompt_version="v2.0")
    handlers.on_explanation_created(ex, store.uow())
    handlers.on_feedback_recorded(feedback_recorded(ex, 1, submitted_at=ex.created_at), store.uow())


def test_stream_sends_snapshots_on_change_and_heartbeats_between(server: tuple[str, Store]) -> None:
    url, store = server
    snapshots: list[dict] = []
    heartbeats = 0
    changed = False
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 20
    with httpx.stream("GET", url + "/api/admin/llm-learning/stream", headers=headers, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            assert time.monotonic() < deadline, (snapshots, heartbeats)
            if line.startswith(": heartbeat"):
                heartbeats += 1
            elif line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "snapshot":
                snapshots.append(json.loads(line[5:]))
                if len(snapshots) == 1:
                    # while this stream is open, the server still answers other requests at once
                    assert httpx.get(url + "/healthz", timeout=2).status_code == 200
                    assert "llm_learning_stream_clients 1.0" in httpx.get(url + "/metrics", timeout=2).text
            if heartbeats >= 1 and not changed:
                add_vote(store)  # the read model changes: new snapshots follow
                changed = True
            if snapshots and snapshots[-1]["totals"]["votes"] == 1:
                break
    assert snapshots[0]["totals"]["votes"] == 0
    assert heartbeats >= 1  # nothing changed for a while: a heartbeat comment, not a repeated snapshot
    assert snapshots[-1]["per_prompt_version"][0]["prompt_version"] == "v2.0"

    # the client left: the server notices and ends that stream
    def streams_open() -> str:
        return httpx.get(url + "/metrics", timeout=2).text

    wait_for(lambda: "llm_learning_stream_clients 0.0" in streams_open(), timeout_s=10, what="the stream to end")
    # and a new stream starts with the current figures
    with httpx.stream("GET", url + "/api/admin/llm-learning/stream?max_events=1", headers=headers, timeout=10) as r:
        body = "".join(r.iter_text())
    assert '"votes": 1' in body


def test_stream_refuses_without_the_token(server: tuple[str, Store]) -> None:
    url, _ = server
    r = httpx.get(url + "/api/admin/llm-learning/stream", timeout=5)
    assert r.status_code == 401
    assert r.json()["error"]["status"] == 401
