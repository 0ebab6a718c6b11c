"""An `ExplanationCreated` lost on its way to one consumer (kombu's Redis transport loses a message taken by a
worker killed before it was recorded as unacknowledged) is asked for again: the dashboard and the optimizer find
votes whose explanation they never got, ask the router (`ResendExplanations`), and the router publishes the event
again with its original id. Real router, dashboard and optimizer workers on a real Redis."""

from __future__ import annotations

import os
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from celery import Celery

from gateway.redis_server import RedisServer
from shared.bus import declare_topology, make_celery
from shared.contracts import FeedbackRecorded
from shared.settings import ServiceSettings
from tests.support import celery_worker, explanation_created, store_in_router, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dashboard_and_optimizer_get_a_lost_explanation_event_again_and_count_its_vote(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        event = explanation_created()
        eid = event.explanation_id
        store_in_router(tmp_path, event)  # the router has the explanation; its event reached neither replica

        sender = make_celery("missing-events-test", ServiceSettings(redis_url=server.url))
        declare_topology(sender)
        vote = FeedbackRecorded(
            feedback_id=uuid.uuid4(),
            explanation_id=eid,
            session_key="s" * 64,
            rating=1,
            submitted_at=datetime.now(UTC),
            prompt_name="explain_signal",
            prompt_version="v1.0",
            model="offline/template-v1",
            signal="HOLD",
            ticker="IBM",
        )
        for service in ("dashboard", "optimizer"):
            sender.send_task(f"{service}.on_feedback_recorded", kwargs={"payload": vote.to_payload()}, queue=service)

        env = {
            **os.environ,
            "REDIS_URL": server.url,
            "DATA_DIR": str(tmp_path),
            "ADMIN_TOKEN": "a",
            "SESSION_HASH_KEY": "k",
            "MISSING_EVENT_AFTER_S": "0",
            "PYTHONPATH": str(ROOT),
        }

        def one(db: str, sql: str) -> int:
            try:
                with sqlite3.connect(tmp_path / f"{db}.db") as conn:
                    return int(conn.execute(sql).fetchone()[0])
            except sqlite3.Error:
                return -1

        with (
            celery_worker("router", env, tmp_path / "router-worker.log"),
            celery_worker("dashboard", env, tmp_path / "dashboard-worker.log"),
            celery_worker("optimizer", env, tmp_path / "optimizer-worker.log"),
        ):
            wait_for(
                lambda: (
                    one("dashboard", "select count(*) from votes") == 1
                    and one("optimizer", "select count(*) from votes") == 1
                ),
                timeout_s=30,
                what="the vote stored by both replicas, without its explanation",
            )
            assert one("dashboard", "select count(*) from explanations") == 0
            assert one("optimizer", "select count(*) from exposures") == 0

            def asked_and_healed(app: Celery = sender) -> bool:
                for service in ("dashboard", "optimizer"):
                    app.send_task(f"{service}.ask_for_missing_explanations", queue=service)
                return (
                    one("dashboard", "select coalesce(sum(votes), 0) from explanations") == 1
                    and one("optimizer", "select count(*) from exposures") == 1
                )

            wait_for(asked_and_healed, timeout_s=45, interval_s=2.0, what="the event sent again, both replicas whole")
