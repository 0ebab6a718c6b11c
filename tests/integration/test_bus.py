"""The bus writes task messages that a real Celery worker consumes: events through the pipelined publish,
commands through the group-commit sender."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from pathlib import Path

import pytest
import redis

from gateway.redis_server import RedisServer
from services.feedback import handlers
from services.feedback.intake import GroupCommitSender
from shared.bus import SUBSCRIPTIONS, CeleryBus, declare_topology, make_celery
from shared.contracts import ExplanationCreated
from shared.settings import ServiceSettings
from tests.support import celery_worker, explanation_created, wait_for, worker_env


def _event(session_key: str | None = None) -> ExplanationCreated:
    return explanation_created(session_key=session_key, ticker="AMD")


def _rows(db: Path, table: str) -> int:
    """Rows in a table of a worker's store; 0 before the worker has made it."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return int(conn.execute(f"select count(*) from {table}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


@pytest.mark.slow
def test_published_event_and_group_committed_command_are_consumed_by_a_real_worker(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        settings = ServiceSettings(redis_url=server.url, data_dir=tmp_path)
        app = make_celery("feedback", settings)
        declare_topology(app)
        bus = CeleryBus(app)
        event = _event()
        bus.publish(event)
        # votes count only from the session an explanation was served to: ten explanations, one per session
        served = [_event(session_key=f"k{i}") for i in range(10)]
        r = redis.Redis.from_url(server.url)
        # one message per subscriber, each on its own service's queue
        for task in SUBSCRIPTIONS[event.type]:
            assert r.llen(task.split(".")[0]) == 1

        for e in served:
            bus.publish(e)

        async def send() -> None:
            sender = GroupCommitSender(app)
            await asyncio.gather(
                *(
                    sender.send(handlers.new_vote(e.explanation_id, f"k{i}", -1, None, None))
                    for i, e in enumerate(served)
                )
            )
            await sender.aclose()

        asyncio.run(send())
        # 11 explanation events, and the 10 votes of one group commit in one message (`MANY_TO_A_MESSAGE`)
        assert r.llen("feedback") == 12
        raw = r.lindex("feedback", 0)
        assert isinstance(raw, bytes)
        newest = json.loads(raw)
        assert newest["headers"]["task"] == "feedback.record"
        assert len(json.loads(base64.b64decode(newest["body"]))[1]["payloads"]) == 10

        with celery_worker("feedback", worker_env(server.url, tmp_path), tmp_path / "worker.log"):
            db = tmp_path / "feedback.db"
            wait_for(lambda: _rows(db, "feedback") == 10, timeout_s=30, what="ten votes stored by the worker")
            assert r.llen("feedback") == 0
        r.close()


@pytest.mark.slow
def test_a_relay_batch_goes_many_to_a_message_and_a_real_worker_digests_each_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`publish_many` sends the subscribers in `MANY_TO_A_MESSAGE` up to `TASK_BATCH_SIZE` events a message
    (any other subscriber one message an event); a real worker stores every event of them, dead-letters a
    payload that does not validate alone, and stores nothing twice when a message comes again."""
    import base64
    import json

    from services.feedback.store import Store
    from shared.bus import MANY_TO_A_MESSAGE, TaskMessageEncoder
    from shared.contracts import FeedbackErased, utcnow

    with RedisServer(tmp_path / "redis") as server:
        monkeypatch.setenv("TASK_BATCH_SIZE", "40")  # this process's publisher: messages of 40 events
        app = make_celery("feedback", ServiceSettings(redis_url=server.url, data_dir=tmp_path))
        declare_topology(app)
        bus = CeleryBus(app)
        events = [_event(session_key=f"k{i}") for i in range(100)]
        erased = FeedbackErased(session_key="k0", feedback_ids=[], explanation_ids=[], erased_at=utcnow())
        bus.publish_many([*events[:50], erased, *events[50:]])
        monkeypatch.delenv("TASK_BATCH_SIZE")  # the worker's batches: the default
        r = redis.Redis.from_url(server.url)
        for queue in ("optimizer", "finetune", "dashboard"):
            raws = r.lrange(queue, 0, -1)[::-1]  # oldest first
            bodies = [json.loads(base64.b64decode(json.loads(raw)["body"]))[1] for raw in raws]
            tasks = [json.loads(raw)["headers"]["task"] for raw in raws]
            many = [b["payloads"] for b, t in zip(bodies, tasks, strict=True) if t in MANY_TO_A_MESSAGE]
            assert [len(m) for m in many] == [40, 40, 20], queue  # the 100 explanations in order, 40 a message
            assert [p["explanation_id"] for m in many for p in m] == [str(e.explanation_id) for e in events]
            assert tasks.count(f"{queue}.on_feedback_erased") == 1  # not in MANY_TO_A_MESSAGE: one message
        assert r.llen("feedback") == 3
        # a message of three: one again (already stored by then), one that does not validate, one new
        again, new = events[0], _event(session_key="k-new")
        encoder = TaskMessageEncoder(app)
        body = encoder.body_of_many([again.payload_json(), '{"explanation_id": "not an id"}', new.payload_json()])
        queue, raw = encoder.encode_body("feedback.on_explanation_created", body)

        db = tmp_path / "feedback.db"
        stored = lambda: _rows(db, "explanations")  # noqa: E731
        with celery_worker("feedback", worker_env(server.url, tmp_path), tmp_path / "worker.log"):
            wait_for(lambda: stored() == 100, timeout_s=30, what="the 100 explanations stored")
            r.lpush(queue, raw)
            wait_for(lambda: stored() == 101, timeout_s=30, what="the new one stored")
            store = Store(f"sqlite:///{db}")
            letters = wait_for(lambda: store.dead_letters.list() or None, timeout_s=10, what="the dead letter")
            wait_for(lambda: r.llen("feedback") == 0 and r.hlen("unacked") == 0, timeout_s=10, what="all acked")
        assert len(letters) == 1 and letters[0]["task"] == "feedback.on_explanation_created"
        assert letters[0]["reason"] == "invalid" and letters[0]["payload"] == {"explanation_id": "not an id"}
        with sqlite3.connect(db) as conn:
            assert conn.execute("select count(*) from processed_messages").fetchone()[0] == 101
        store.dispose()
        r.close()
