"""Nothing poisonous blocks a queue, nothing acknowledged is lost: against real Celery workers on a real Redis.

For every service's queue: a message that does not validate and one with an unknown schema version end in
that service's dead-letter store (with the error, without the input values in any log line), and the
message behind them is processed. A transient error (a locked store) is retried with backoff until it
passes. The journal sweep dead-letters an unreadable entry and re-sends the rest. A dead letter replayed by
the command reaches the worker again."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from gateway.redis_server import RedisServer
from services.feedback.handlers import new_vote
from shared.bus import TaskMessageEncoder, declare_topology
from shared.contracts import SERVICES, ExplanationCreated, ModelRegistered
from shared.db import make_engine
from shared.deadletter import for_engine
from tests.support import celery_worker, wait_for

ROOT = Path(__file__).resolve().parents[2]
SECRET_COMMENT = "please call me on 555-0100"

pytestmark = pytest.mark.slow  # starts Celery workers


def _explanation() -> ExplanationCreated:
    return ExplanationCreated(
        explanation_id=uuid.uuid4(), request_key="rk", ticker="IBM", signal="HOLD", prompt_name="explain_signal",
        prompt_version="v1.0", model="offline/template-v1", provider="offline", prompt_text="p", text="t",
        tokens_in=1, tokens_out=1, cost_usd=0.0, latency_ms=1.0, created_at=datetime.now(UTC),
    )  # fmt: skip


def _model() -> ModelRegistered:
    return ModelRegistered(model_id=f"m-{uuid.uuid4().hex[:6]}", model="local/ft-test", base_model="tiny")


#: per queue: a task that takes a message, and a valid message for it
CASES: dict[str, tuple[str, Any]] = {
    "router": ("router.on_model_registered", _model),
    "feedback": ("feedback.on_explanation_created", _explanation),
    "optimizer": ("optimizer.on_explanation_created", _explanation),
    "finetune": ("finetune.on_explanation_created", _explanation),
    "dashboard": ("dashboard.on_explanation_created", _explanation),
}


def _env(tmp_path: Path, server: RedisServer, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": server.url,
        "DATA_DIR": str(tmp_path),
        "ADMIN_TOKEN": "a",
        "SESSION_HASH_KEY": "k",
        "OPENAI_API_KEY": "",
        "GROQ_API_KEY": "",
        "PYTHONPATH": str(ROOT),
        "TASK_RETRY_BACKOFF_S": "0.2",
        **extra,
    }


def _sender(server: RedisServer) -> Celery:
    app = Celery(broker=server.url)
    app.conf.task_queues = None
    declare_topology(app)
    return app


def _send(app: Celery, task: str, payload: dict) -> None:
    app.send_task(task, kwargs={"payload": payload}, queue=task.split(".")[0])


def _rows(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the worker has not created its tables yet
            return []


def _processed(db: Path, message_id: object) -> bool:
    return bool(_rows(db, f"select 1 from processed_messages where message_id = '{message_id}'"))


def _dead(db: Path) -> list[tuple]:
    return _rows(db, "select task, reason, error, message_id, replayed_at from dead_letters order by id")


@pytest.mark.parametrize("service", SERVICES)
def test_poison_messages_are_dead_lettered_and_the_next_message_is_processed(service: str, tmp_path: Path) -> None:
    task, make = CASES[service]
    good, versioned = make(), make()
    with RedisServer(tmp_path / "redis") as server:
        sender = _sender(server)
        _send(sender, task, {"garbage": True, "comment": SECRET_COMMENT})
        _send(sender, task, {**versioned.to_payload(), "schema_version": 99})
        _send(sender, task, good.to_payload())
        db = tmp_path / f"{service}.db"
        log = tmp_path / "worker.log"
        with celery_worker(service, _env(tmp_path, server), log, loglevel="INFO"):
            wait_for(
                lambda: _processed(db, good.message_id), timeout_s=60, what=f"{service} to process the good message"
            )
            wait_for(lambda: len(_dead(db)) == 2, timeout_s=10, what="two dead letters")
        dead = _dead(db)  # (in any order: the finetune worker runs two threads)
        assert [(d[0], d[1]) for d in dead] == [(task, "invalid"), (task, "invalid")]
        [version_error] = [d[2] for d in dead if d[3] == str(versioned.message_id)]
        assert "unknown schema version 99" in version_error
        assert not _processed(db, versioned.message_id)
        assert redis.Redis.from_url(server.url).llen(service) == 0  # nothing left stuck on the queue
        text = log.read_text()
        assert SECRET_COMMENT not in text and "555-0100" not in text
        assert "dead-lettered" in text


def test_a_transient_error_is_retried_with_backoff_until_it_passes(tmp_path: Path) -> None:
    """The router's store is locked by someone else for two seconds: the worker's write fails ("database is
    locked", after a short busy timeout here), is retried with backoff, and lands once the lock is gone."""
    with RedisServer(tmp_path / "redis") as server:
        sender = _sender(server)
        db = tmp_path / "router.db"
        env = _env(tmp_path, server, SQLITE_BUSY_TIMEOUT_MS="200", TASK_MAX_RETRIES="8")
        log = tmp_path / "worker.log"
        with celery_worker("router", env, log, loglevel="INFO"):
            first = _model()
            _send(sender, "router.on_model_registered", first.to_payload())
            wait_for(lambda: _processed(db, first.message_id), timeout_s=60, what="the store to exist")
            locker = sqlite3.connect(db, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")
            second = _model()
            _send(sender, "router.on_model_registered", second.to_payload())
            wait_for(lambda: "transient OperationalError" in log.read_text(), timeout_s=20, what="a retry")
            # retried again while the lock is held, and still not stored
            wait_for(lambda: log.read_text().count("transient OperationalError") >= 2, timeout_s=30, what="a 2nd retry")
            assert not _processed(db, second.message_id)
            locker.execute("COMMIT")
            locker.close()
            wait_for(lambda: _processed(db, second.message_id), timeout_s=30, what="the retried message")
        assert _dead(db) == []


def test_the_sweep_dead_letters_an_unreadable_journal_entry_and_resends_the_rest(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        r = redis.Redis.from_url(server.url)
        sender = _sender(server)
        old = time.time() - 3600
        votes = [new_vote(uuid.uuid4(), f"key-{i}", 1, None, SECRET_COMMENT) for i in range(2)]
        encoder = TaskMessageEncoder(sender)
        r.hset("journal:feedback", "broken-1", b"not-a-time|garbage")
        for vote in votes:  # accepted, journalled, and lost before any worker stored them
            _, raw = encoder.encode("feedback.record", vote)
            r.hset("journal:feedback", str(vote.message_id), f"{old!r}|".encode() + raw)
        r.hset("journal:feedback", "broken-2", f"{old!r}|{{not json".encode())
        db = tmp_path / "feedback.db"
        log = tmp_path / "worker.log"
        with celery_worker("feedback", _env(tmp_path, server, FEEDBACK_JOURNAL_GRACE_S="1"), log, loglevel="INFO"):
            sender.send_task("feedback.sweep_journal", queue="feedback")
            wait_for(
                lambda: all(_processed(db, v.message_id) for v in votes) and r.hlen("journal:feedback") == 0,
                timeout_s=60,
                what="both lost votes stored and the journal empty",
            )
        dead = _dead(db)
        assert sorted(d[3] for d in dead) == ["broken-1", "broken-2"]
        assert {(d[0], d[1]) for d in dead} == {("feedback.sweep_journal", "unreadable")}
        assert SECRET_COMMENT not in log.read_text()
        r.close()


def test_a_dead_letter_replayed_by_the_command_is_handled_by_the_worker(tmp_path: Path) -> None:
    """A message that failed during an outage waits in the dead letters; `python -m shared.deadletter replay`
    sends it again once the cause is gone, and marks it replayed."""
    with RedisServer(tmp_path / "redis") as server:
        db = tmp_path / "dashboard.db"
        env = _env(tmp_path, server)
        log = tmp_path / "worker.log"
        event = _explanation()
        with celery_worker("dashboard", env, log, loglevel="INFO"):
            probe = _explanation()
            _send(_sender(server), "dashboard.on_explanation_created", probe.to_payload())
            wait_for(lambda: _processed(db, probe.message_id), timeout_s=60, what="the store to exist")
            engine = make_engine(f"sqlite:///{db}")
            for_engine(engine).add(
                "dashboard.on_explanation_created",
                reason="retries_exhausted",
                error="OperationalError: database is locked",
                payload=event.to_payload(),
            )
            engine.dispose()
            listed = subprocess.run(
                [sys.executable, "-m", "shared.deadletter", "list", "dashboard"],
                env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert listed.returncode == 0 and "retries_exhausted" in listed.stdout, listed.stderr
            replayed = subprocess.run(
                [sys.executable, "-m", "shared.deadletter", "replay", "dashboard"],
                env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert replayed.returncode == 0 and "replayed 1 dead letter" in replayed.stdout, replayed.stderr
            wait_for(lambda: _processed(db, event.message_id), timeout_s=30, what="the replayed message handled")
            again = subprocess.run(
                [sys.executable, "-m", "shared.deadletter", "list", "dashboard"],
                env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert again.stdout.strip() == "no dead letters in dashboard", again.stderr  # replayed: not listed
        [(task, _, _, _, replayed_at)] = _dead(db)
        assert task == "dashboard.on_explanation_created" and replayed_at is not None
