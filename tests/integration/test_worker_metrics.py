"""Every worker's metrics page (WORKER_METRICS_PORT) shows its queue's depth and lag, and what its tasks did:
durations by outcome and dead letters, from a real worker on a real Redis."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from gateway.redis_server import RedisServer, free_port
from services.dashboard.store import Store
from shared.bus import declare_topology, make_celery
from shared.contracts import FeedbackErased, utcnow
from shared.settings import ServiceSettings
from shared.worker_metrics import oldest_age_s, queue_lag
from tests.support import celery_worker, wait_for, worker_env

ROOT = Path(__file__).resolve().parents[2]


def _series(text: str, name: str, **labels: str) -> float | None:
    """The sum of the series `name` whose labels include `labels` (None: no such series)."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    ]
    return sum(values) if values else None


def test_queue_depth_and_lag_are_read_from_the_waiting_messages(redis_server: RedisServer) -> None:
    sender = make_celery("metrics-test", ServiceSettings(redis_url=redis_server.url))
    declare_topology(sender)
    client = sender.connection_for_write().default_channel.client
    client.delete("dashboard")
    old = FeedbackErased(session_key="k" * 64, feedback_ids=[], explanation_ids=[], erased_at=utcnow())
    old = old.model_copy(update={"occurred_at": utcnow() - timedelta(seconds=90)})
    sender.send_task("dashboard.on_feedback_erased", kwargs={"payload": old.to_payload()}, queue="dashboard")
    sender.send_task("dashboard.on_feedback_erased", kwargs={"payload": old.to_payload()}, queue="dashboard")
    depth, age = queue_lag(client, "dashboard")
    assert depth == 2
    assert age is not None and 85 <= age < 600
    client.delete("dashboard")
    assert queue_lag(client, "dashboard") == (0, 0.0)
    assert oldest_age_s(b"not a kombu message") is None


@pytest.mark.slow
def test_a_worker_serves_task_durations_failures_and_its_queue_lag(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    env = worker_env(redis_server.url, tmp_path, WORKER_METRICS_PORT=str(port))
    sender = make_celery("metrics-test", ServiceSettings(redis_url=redis_server.url))
    declare_topology(sender)
    sender.connection_for_write().default_channel.client.delete("dashboard")
    store = Store(f"sqlite:///{tmp_path / 'dashboard.db'}")
    with celery_worker("dashboard", env, tmp_path / "worker.log"):
        erased = FeedbackErased(
            session_key="k" * 64, feedback_ids=[], explanation_ids=[uuid.uuid4()], erased_at=utcnow()
        )
        sender.send_task("dashboard.on_feedback_erased", kwargs={"payload": erased.to_payload()}, queue="dashboard")
        sender.send_task("dashboard.on_feedback_erased", kwargs={"payload": {"not": "valid"}}, queue="dashboard")

        def page() -> str | None:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                return None
            done = _series(text, "celery_task_duration_seconds_count", task="dashboard.on_feedback_erased")
            return text if done and done >= 2 else None

        text = wait_for(page, timeout_s=60, what="the worker's metrics page to count both tasks")
    store.dispose()
    assert _series(text, "celery_queue_depth", queue="dashboard") == 0
    assert _series(text, "celery_task_duration_seconds_count", task="dashboard.on_feedback_erased", outcome="success")
    # the invalid message is not a crash: it is dead-lettered (shared.deadletter), and counted as such
    assert _series(text, "celery_task_dead_letters_total", task="dashboard.on_feedback_erased", reason="invalid"), text
