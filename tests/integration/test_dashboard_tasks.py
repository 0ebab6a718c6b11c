"""The dashboard's Celery tasks through a real worker on a real Redis: events in any order, redelivered,
replaced and erased, end as the right figures; the beat tasks run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery

from gateway.redis_server import RedisServer
from services.dashboard import handlers
from services.dashboard.store import Store
from shared.bus import SUBSCRIPTIONS, declare_topology, make_celery
from shared.contracts import (
    FeedbackErased,
    FeedbackRecorded,
    FineTuneProgress,
    Message,
    ModelRegistered,
    SearchExhausted,
)
from shared.settings import ServiceSettings
from tests.support import celery_worker, explanation_created, feedback_recorded, wait_for, worker_env

ROOT = Path(__file__).resolve().parents[2]
POLICY = handlers.ReadPolicy()


@pytest.fixture
def worker(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Celery, Store]]:
    env = worker_env(redis_server.url, tmp_path)
    sender = make_celery("dashboard-test", ServiceSettings(redis_url=redis_server.url))
    declare_topology(sender)
    sender.connection_for_write().default_channel.client.delete("dashboard")  # nothing left from other tests
    store = Store(f"sqlite:///{tmp_path / 'dashboard.db'}")
    with celery_worker("dashboard", env, tmp_path / "worker.log"):
        yield sender, store
    store.dispose()


def send(app: Celery, task: str, message: Message) -> None:
    app.send_task(task, kwargs={"payload": message.to_payload()}, queue="dashboard")


def test_every_subscribed_dashboard_task_is_registered() -> None:
    from gateway.beat import schedule
    from services.dashboard.tasks import app

    wanted = {t for tasks in SUBSCRIPTIONS.values() for t in tasks if t.startswith("dashboard.")}
    wanted |= {t for t in schedule() if t.startswith("dashboard.")}
    assert wanted <= set(app.tasks), wanted - set(app.tasks)


def test_worker_builds_the_figures_from_events_in_any_order(worker: tuple[Celery, Store]) -> None:
    app, store = worker
    now = datetime.now(UTC)
    ex = explanation_created(
        None, "s", ticker="NVDA", prompt_name="explain", tokens_in=3, tokens_out=4, cost_usd=0.003, latency_ms=30.0
    )

    def vote(rating: int, fid: uuid.UUID, at: datetime) -> FeedbackRecorded:
        return feedback_recorded(ex, rating, feedback_id=fid, stars=3, submitted_at=at)

    kept, erased = uuid.uuid4(), uuid.uuid4()
    first, replacement = vote(-1, kept, now), vote(1, kept, now + timedelta(seconds=1))
    # votes first (their explanation arrives later), one redelivered, one replaced, one erased
    send(app, "dashboard.on_feedback_recorded", replacement)
    send(app, "dashboard.on_feedback_recorded", first)  # older: stays replaced
    send(app, "dashboard.on_feedback_recorded", replacement)  # redelivery
    send(app, "dashboard.on_feedback_recorded", vote(-1, erased, now))
    send(
        app,
        "dashboard.on_feedback_erased",
        FeedbackErased(session_key="s", feedback_ids=[erased], explanation_ids=[ex.explanation_id], erased_at=now),
    )
    send(app, "dashboard.on_explanation_created", ex)
    send(app, "dashboard.on_model_registered", ModelRegistered(model_id="m", model="local/ft", base_model="tiny"))
    send(app, "dashboard.on_finetune_progress", FineTuneProgress(job_id="j", state="done", progress=1.0))

    def settled() -> dict | None:
        s = handlers.stats(store.uow(), 30, POLICY)
        return s if s["finetune_jobs"] and s["totals"]["explanations"] == 1 else None

    s = wait_for(settled, timeout_s=30, what="the worker to apply every event")
    t = s["totals"]
    assert (t["explanations"], t["votes"], t["positive_rate"], t["feedback_rate"], t["avg_rating"]) == (
        1, 1, 1.0, 1.0, 3.0,
    )  # fmt: skip
    assert s["models"][0]["model"] == "local/ft"


def test_beat_tasks_run_on_the_worker(worker: tuple[Celery, Store]) -> None:
    app, store = worker
    before = handlers.revision(store.uow())
    app.send_task("dashboard.check_anomalies", queue="dashboard")
    ex = explanation_created(None, "s", ticker="X", signal="BUY", prompt_name="explain")
    send(app, "dashboard.on_explanation_created", ex)  # queued after the beat tasks: proves they were consumed
    wait_for(lambda: handlers.revision(store.uow()) > before, timeout_s=30, what="the worker to get past beat tasks")


def test_an_exhausted_search_reaches_the_dashboard_as_an_alert(worker: tuple[Celery, Store]) -> None:
    app, store = worker
    event = SearchExhausted(prompt_name="explain_signal", champion_version="v1.2", versions_tried=15, reason="spent")
    for task in SUBSCRIPTIONS[SearchExhausted.type]:
        send(app, task, event)
        send(app, task, event)  # redelivered: one alert

    def alerts() -> list | None:
        found = handlers.stats(store.uow(), 30, POLICY)["alerts"]
        return found or None

    (alert,) = wait_for(alerts, timeout_s=30, what="the worker to store the alert")
    assert alert["kind"] == "search_exhausted" and "v1.2" in alert["message"]
