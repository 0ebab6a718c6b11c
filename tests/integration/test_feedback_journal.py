"""An accepted vote survives being lost between the queue and a killed worker: kombu's Redis transport
pops a message before it records it as unacknowledged, so a SIGKILL in between loses that message. The
intake journal keeps a copy until the worker has stored the vote, and the sweep sends it again."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer, free_port
from services.feedback import handlers
from services.feedback.config import FeedbackSettings
from services.feedback.main import create_app
from shared.contracts import ExplanationCreated, derived_id
from shared.privacy import session_key
from tests.support import celery_worker, explanation_created, store_in_router, wait_for, worker_env

ROOT = Path(__file__).resolve().parents[2]


def _explanation(eid: uuid.UUID, session: str) -> ExplanationCreated:
    return explanation_created(eid, session_key(session, b"k"))


def _settings(redis_url: str, data_dir: Path) -> FeedbackSettings:
    return FeedbackSettings(
        redis_url=redis_url,
        admin_token=SecretStr("a"),
        session_hash_key=SecretStr("k"),
        data_dir=data_dir,
        gateway_url=f"http://127.0.0.1:{free_port()}",
    )


def _votes_accepted(redis_url: str, data_dir: Path, sessions: list[str]) -> None:
    """Each session votes on an explanation of its own through a feedback app on this Redis: accepted (202)."""
    app = create_app(_settings(redis_url, data_dir))
    with TestClient(app) as client:
        for session in sessions:
            eid = uuid.uuid4()
            handlers.on_explanation_created(_explanation(eid, session), app.state.store.uow())
            assert client.post(f"/api/feedback/{eid}", json={"rating": 1, "session_id": session}).status_code == 202


def _rows(data_dir: Path, table: str) -> int:
    """Rows in a table of the feedback service's SQLite file."""
    with sqlite3.connect(data_dir / "feedback.db") as conn:
        return int(conn.execute(f"select count(*) from {table}").fetchone()[0])


def test_accepted_vote_is_journalled_with_its_queue_message_and_cleared_once_stored(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        _votes_accepted(server.url, tmp_path, ["s"])
        r = redis.Redis.from_url(server.url)
        assert r.llen("feedback") == 1 and r.hlen("journal:feedback") == 1
        r.close()


@pytest.mark.slow
def test_vote_lost_between_the_queue_and_a_killed_worker_is_sent_again_and_stored_once(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        _votes_accepted(server.url, tmp_path, ["s0", "s1", "s2"])
        r = redis.Redis.from_url(server.url)
        # A worker took one message off the queue and was killed before kombu recorded it as unacked.
        assert r.rpop("feedback") is not None
        assert r.llen("feedback") == 2 and r.hlen("journal:feedback") == 3

        env = worker_env(server.url, tmp_path, FEEDBACK_JOURNAL_GRACE_S="1")
        with celery_worker("feedback", env, tmp_path / "worker.log"):

            def stored() -> int:
                return _rows(tmp_path, "feedback")

            wait_for(
                lambda: stored() == 2 and r.hlen("journal:feedback") == 1, timeout_s=30, what="the two queued votes"
            )
            # beat's sweep, sent by name as beat sends it
            sender = Celery(broker=server.url)
            wait_for(
                lambda: sender.send_task("feedback.sweep_journal", queue="feedback") and stored() == 3,
                timeout_s=30,
                interval_s=1.5,
                what="the lost vote sent again and stored",
            )
            assert r.hlen("journal:feedback") == 0
            with sqlite3.connect(tmp_path / "feedback.db") as conn:
                assert conn.execute("select count(distinct session_key) from feedback").fetchone()[0] == 3
        r.close()


@pytest.mark.slow
def test_a_vote_whose_explanation_event_was_lost_is_stored_once_the_router_sends_the_event_again(
    tmp_path: Path,
) -> None:
    """The same gap for an event: the feedback service's copy of an `ExplanationCreated` is lost (taken by a
    worker killed before kombu recorded it), so the vote on it waits in the quarantine. The sweep asks the
    router to publish the event again (`ResendExplanations`), and the vote is released and stored."""
    from services.router import handlers as router_handlers
    from services.router.store import Store as RouterStore

    with RedisServer(tmp_path / "redis") as server:
        settings = _settings(server.url, tmp_path)
        event = _explanation(uuid.uuid4(), "s")
        eid = event.explanation_id
        store_in_router(tmp_path, event)  # the router has it; its event never reached the feedback service
        router_store = RouterStore(f"sqlite:///{tmp_path / 'router.db'}")
        again = router_handlers.explanation_events(router_store.uow(), [eid, uuid.uuid4()])  # an unknown id: skipped
        router_store.dispose()
        assert [e.message_id for e in again] == [
            derived_id("explanation.created", eid)
        ]  # the id it was first sent with
        assert again[0].session_key == event.session_key and again[0].text == event.text

        app = create_app(settings)
        with TestClient(app) as client:
            assert client.post(f"/api/feedback/{eid}", json={"rating": 1, "session_id": "s"}).status_code == 202

        env = worker_env(server.url, tmp_path, FEEDBACK_QUARANTINE_RESEND_AFTER_S="0")

        with (
            celery_worker("feedback", env, tmp_path / "feedback-worker.log"),
            celery_worker("router", env, tmp_path / "router-worker.log"),
        ):
            wait_for(lambda: _rows(tmp_path, "quarantine") == 1, timeout_s=30, what="the vote held in the quarantine")
            sender = Celery(broker=server.url)
            wait_for(
                lambda: (
                    sender.send_task("feedback.sweep_journal", queue="feedback") and _rows(tmp_path, "feedback") == 1
                ),
                timeout_s=45,
                interval_s=2.0,
                what="the explanation's event sent again and the vote released and stored",
            )
            assert _rows(tmp_path, "quarantine") == 0
