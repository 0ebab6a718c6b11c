"""Consumers digest their messages in batches (shared.bus.BatchTask): one transaction for many messages, with
the guarantees of one message kept for each: a message whose handler raises is rolled back and dead-lettered
alone; a worker killed in the middle of a batch loses nothing and duplicates nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
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
from services.feedback.store import Store
from shared.contracts import ExplanationCreated, RecordFeedback
from shared.db import run_in_one_transaction
from shared.privacy import session_key
from tests.support import celery_worker, explanation_created, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _explanation(eid: uuid.UUID, session: str) -> ExplanationCreated:
    return explanation_created(eid, session_key(session, b"k"))


def _vote(eid: uuid.UUID, session: str) -> RecordFeedback:
    return handlers.new_vote(eid, session_key(session, b"k"), 1, None, None)


def _unacked_but_sweeps(r: redis.Redis) -> int:
    """Messages taken and not yet acknowledged, other than the journal sweeps the test itself keeps sending (the
    latest of which may be in a worker's hands at the moment of the check)."""
    return sum(1 for raw in r.hvals("unacked") if b'"feedback.sweep_journal"' not in raw)


def _count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql).fetchone()[0])


def test_a_batch_commits_once_and_a_failing_message_is_rolled_back_alone(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    eids = [uuid.uuid4() for _ in range(5)]
    for i, eid in enumerate(eids):
        handlers.on_explanation_created(_explanation(eid, f"s{i}"), store.uow())
    votes = [_vote(eid, f"s{i}") for i, eid in enumerate(eids)]

    def handle(cmd: RecordFeedback, uow: object) -> str:
        outcome = handlers.record_feedback(cmd, uow)  # type: ignore[arg-type]
        if cmd is votes[2]:  # its writes are done: the savepoint must take them back
            raise RuntimeError("poison")
        return outcome

    results = run_in_one_transaction(store.uow(), [*votes, votes[0]], handle)
    assert [ok for ok, _ in results] == [True, True, False, True, True, True]
    assert [r for ok, r in results if ok] == ["stored", "stored", "stored", "stored", "duplicate"]
    db = tmp_path / "feedback.db"
    assert _count(db, "select count(*) from feedback") == 4
    assert _count(db, f"select count(*) from feedback where feedback_id = '{votes[2].feedback_id}'") == 0
    assert _count(db, "select count(*) from processed_messages") == 5 + 4  # explanations + stored votes
    assert _count(db, "select count(*) from outbox where event_type = 'feedback.recorded'") == 4
    # the batch helper of the service: the vote that failed is handled on its own later
    again = run_in_one_transaction(store.uow(), [votes[2], votes[3]], handlers.record_feedback)
    assert again == [(True, "stored"), (True, "duplicate")]
    store.dispose()


def test_a_batch_that_cannot_begin_reports_every_message_failed(tmp_path: Path) -> None:
    db = tmp_path / "feedback.db"
    store = Store(f"sqlite:///{db}")
    eid = uuid.uuid4()
    handlers.on_explanation_created(_explanation(eid, "s"), store.uow())
    os.environ["SQLITE_BUSY_TIMEOUT_MS"] = "200"
    try:
        quick = Store(f"sqlite:///{db}")
    finally:
        del os.environ["SQLITE_BUSY_TIMEOUT_MS"]
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        results = run_in_one_transaction(quick.uow(), [_vote(eid, "s")], handlers.record_feedback)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(results) == 1 and results[0][0] is False and "locked" in str(results[0][1])
    assert _count(db, "select count(*) from feedback") == 0
    store.dispose()
    quick.dispose()


def _settings(server: RedisServer, tmp_path: Path) -> FeedbackSettings:
    return FeedbackSettings(
        redis_url=server.url, admin_token=SecretStr("a"), session_hash_key=SecretStr("k"), data_dir=tmp_path,
        gateway_url=f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip


def _env(server: RedisServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ, "REDIS_URL": server.url, "DATA_DIR": str(tmp_path), "ADMIN_TOKEN": "a",
        "SESSION_HASH_KEY": "k", "PYTHONPATH": str(ROOT), **extra,
    }  # fmt: skip


@pytest.mark.slow
def test_a_poison_message_in_a_batch_is_dead_lettered_alone(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
        sender = Celery(broker=server.url)
        eids = [uuid.uuid4() for _ in range(20)]
        for i, eid in enumerate(eids):
            handlers.on_explanation_created(_explanation(eid, f"s{i}"), store.uow())
        payloads = [_vote(eid, f"s{i}").to_payload() for i, eid in enumerate(eids)]
        payloads.insert(7, {**payloads[0], "message_id": str(uuid.uuid4()), "rating": 5})  # does not validate
        for p in payloads:
            sender.send_task("feedback.record", kwargs={"payload": p}, queue="feedback")
        with celery_worker("feedback", _env(server, tmp_path, TASK_BATCH_SIZE="50"), tmp_path / "worker.log"):
            db = tmp_path / "feedback.db"
            wait_for(lambda: _count(db, "select count(*) from feedback") == 20, timeout_s=30, what="the good votes")
            letters = wait_for(lambda: store.dead_letters.list() or None, timeout_s=10, what="the dead letter")
        assert len(letters) == 1 and letters[0]["task"] == "feedback.record" and letters[0]["reason"] == "invalid"
        r = redis.Redis.from_url(server.url)
        assert r.llen("feedback") == 0
        # the batch's messages were acknowledged together: none is left to come back after the visibility timeout
        wait_for(lambda: r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0, timeout_s=10, what="the acks")
        store.dispose()


@pytest.mark.slow
def test_worker_killed_in_the_middle_of_a_batch_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    """The worker has taken a batch off the queue and is inside its transaction (waiting for the store's lock,
    which the test holds) when it is SIGKILLed. Restarted, it stores every accepted vote exactly once."""
    n = 120
    with RedisServer(tmp_path / "redis") as server:
        app = create_app(_settings(server, tmp_path))
        r = redis.Redis.from_url(server.url)
        db = tmp_path / "feedback.db"
        env = _env(server, tmp_path, TASK_BATCH_SIZE="40", BROKER_VISIBILITY_TIMEOUT="3", FEEDBACK_JOURNAL_GRACE_S="2")
        sender = Celery(broker=server.url)
        eids = [uuid.uuid4() for _ in range(n)]
        with TestClient(app) as client, celery_worker("feedback", env, tmp_path / "worker-1.log") as proc:
            for i, eid in enumerate(eids):  # the worker learns of the explanations (and opens its store)
                payload = _explanation(eid, f"s{i}").to_payload()
                sender.send_task("feedback.on_explanation_created", kwargs={"payload": payload}, queue="feedback")
            wait_for(lambda: _count(db, "select count(*) from explanations") == n, timeout_s=30, what="the replica")
            proc.send_signal(signal.SIGSTOP)  # paused while the votes are accepted
            for i, eid in enumerate(eids):
                assert client.post(f"/api/feedback/{eid}", json={"rating": 1, "session_id": f"s{i}"}).status_code == 202
            holder = sqlite3.connect(db, isolation_level=None, timeout=30)
            holder.execute("BEGIN IMMEDIATE")  # the worker's next batch waits for this lock inside its transaction
            proc.send_signal(signal.SIGCONT)
            wait_for(lambda: r.hlen("unacked") > 0, timeout_s=30, what="the worker to take a batch")
            time.sleep(1.0)  # the batch is flushed and waits at BEGIN IMMEDIATE
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            holder.execute("ROLLBACK")
            holder.close()
        assert _count(db, "select count(*) from feedback") == 0  # nothing of the batch was committed
        assert r.hlen("journal:feedback") == n
        with celery_worker("feedback", env, tmp_path / "worker-2.log"):
            sender = Celery(broker=server.url)
            wait_for(
                lambda: (
                    sender.send_task("feedback.sweep_journal", queue="feedback")
                    and _count(db, "select count(*) from feedback") == n
                    and r.hlen("journal:feedback") == 0
                    and _unacked_but_sweeps(r) == 0
                ),
                timeout_s=60,
                interval_s=1.0,
                what="every accepted vote stored",
            )
        assert _count(db, "select count(distinct session_key) from feedback") == n
        # once each: one processed id per vote, one FeedbackRecorded per vote (re-sent ones were recognised)
        assert _count(db, "select count(*) from processed_messages") == 2 * n  # n explanations + n votes
        assert _count(db, "select count(*) from outbox where event_type = 'feedback.recorded'") == n
        assert not Store(f"sqlite:///{db}").dead_letters.list()
        r.close()


def test_batch_task_dead_letters_the_poison_alone_and_hands_the_rest_on() -> None:
    from types import SimpleNamespace

    from shared.bus import batch_task, make_celery, use_dead_letters
    from shared.settings import ServiceSettings

    app = make_celery("feedback", ServiceSettings(redis_url="redis://127.0.0.1:1/0"), batches=True)
    letters: list[tuple[str, str]] = []

    class Sink:
        def add(self, task: str, *, reason: str, **_: object) -> None:
            letters.append((task, reason))

    use_dead_letters(app, lambda: Sink())
    handed: list[list[int]] = []

    def parse(payload: dict) -> int:
        return int(payload["n"])  # {"n": "x"} does not parse: ValueError, not transient

    def handle(ns: list[int]) -> list[tuple[bool, object]]:
        return [(False, RuntimeError("boom")) if n == 13 else (True, n) for n in ns]

    task = batch_task(app, name="feedback.test_batch", parse=parse, handle=handle, after=handed.append)
    requests = [
        SimpleNamespace(kwargs={"payload": p}, request_dict={"retries": 0})
        for p in ({"n": 1}, {"n": "x"}, {"n": 13}, None, {"n": 2})
    ]
    assert task.digest(requests, parse, handle, handed.append) == []  # nothing goes back on the queue
    assert handed == [[1, 2]]
    assert letters == [("feedback.test_batch", "failed")] * 3  # the unparsable, the raising, the empty one

    def broken(ns: list[int]) -> list[tuple[bool, object]]:
        raise RuntimeError("the store cannot be opened")

    letters.clear()
    assert task.digest(requests[:1], parse, broken) == []
    assert letters == [("feedback.test_batch", "failed")]
