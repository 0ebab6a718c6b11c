"""The bus writes task messages that a real Celery worker consumes: events through the pipelined publish,
commands through the group-commit sender."""

from __future__ import annotations

import asyncio
import os
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
from tests.support import celery_worker, explanation_created, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _event(session_key: str | None = None) -> ExplanationCreated:
    return explanation_created(session_key=session_key, ticker="AMD")


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
        assert r.llen("feedback") == 21  # 11 explanation events and 10 votes

        env = {
            **os.environ,
            "REDIS_URL": server.url,
            "DATA_DIR": str(tmp_path),
            "ADMIN_TOKEN": "a",
            "SESSION_HASH_KEY": "k",
            "PYTHONPATH": str(ROOT),
        }
        with celery_worker("feedback", env, tmp_path / "worker.log"):

            def stored() -> int:
                db = tmp_path / "feedback.db"
                if not db.exists():
                    return 0
                with sqlite3.connect(db) as conn:
                    try:
                        return int(conn.execute("select count(*) from feedback").fetchone()[0])
                    except sqlite3.OperationalError:
                        return 0

            wait_for(lambda: stored() == 10, timeout_s=30, what="ten votes stored by the worker")
            assert r.llen("feedback") == 0
        r.close()
