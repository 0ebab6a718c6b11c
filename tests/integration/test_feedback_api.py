"""The feedback API over HTTP, on a real SQLite file and a real Redis: what it accepts, and what it refuses
without storing or queueing anything."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from services.feedback import handlers
from services.feedback.config import FeedbackSettings
from services.feedback.main import create_app
from shared.contracts import ExplanationCreated
from shared.redis_server import RedisServer, free_port

ADMIN = "admin-secret"


@pytest.fixture
def env(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[TestClient, redis.Redis, uuid.UUID]]:
    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    settings = FeedbackSettings(
        redis_url=redis_server.url,
        admin_token=ADMIN,
        session_hash_key="k",
        data_dir=tmp_path,
        gateway_url=f"http://127.0.0.1:{free_port()}",  # no router there: unknown ids are accepted and left to the worker
    )
    app = create_app(settings)
    with TestClient(app) as client:
        known = uuid.uuid4()
        handlers.on_explanation_created(
            ExplanationCreated(
                explanation_id=known,
                request_key="rk",
                ticker="MSFT",
                signal="SELL",
                prompt_name="explain_signal",
                prompt_version="v1.0",
                model="offline/template-v1",
                provider="offline",
                prompt_text="p",
                text="t",
                tokens_in=1,
                tokens_out=1,
                cost_usd=0.0,
                latency_ms=1.0,
                created_at=datetime.now(UTC),
            ),
            app.state.store.uow(),
        )
        yield client, r, known
    r.close()


def _queued(r: redis.Redis) -> int:
    return int(r.llen("feedback"))


def test_valid_vote_is_accepted_only_once_it_is_on_the_queue(env) -> None:
    client, r, known = env
    res = client.post(f"/api/feedback/{known}", json={"rating": 1, "stars": 4, "comment": "useful", "session_id": "s1"})
    assert res.status_code == 202, res.text
    body = res.json()
    assert body["received"] is True and uuid.UUID(body["feedback_id"])
    assert _queued(r) == 1
    raw = r.lindex("feedback", 0)
    assert b"s1" not in raw  # the raw session id never travels


def test_same_session_gets_the_same_feedback_id(env) -> None:
    client, _, known = env
    a = client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": "s1"}).json()
    b = client.post(f"/api/feedback/{known}", json={"rating": -1, "session_id": "s1"}).json()
    assert a["feedback_id"] == b["feedback_id"]


BAD_BODIES = [
    ("rating outside 1/-1", {"rating": 2, "session_id": "s"}, 422, "rating"),
    ("rating zero", {"rating": 0, "session_id": "s"}, 422, "rating"),
    ("rating as string", {"rating": "1", "session_id": "s"}, 422, "rating"),
    ("rating as boolean true", {"rating": True, "session_id": "s"}, 422, "rating"),
    ("rating as float", {"rating": -1.0, "session_id": "s"}, 422, "rating"),
    ("missing rating", {"session_id": "s"}, 422, "rating"),
    ("missing session", {"rating": 1}, 422, "session_id"),
    ("empty session", {"rating": 1, "session_id": ""}, 422, "session_id"),
    ("session as number", {"rating": 1, "session_id": 5}, 422, "session_id"),
    ("stars above 5", {"rating": 1, "stars": 6, "session_id": "s"}, 422, "stars"),
    ("stars below 1", {"rating": 1, "stars": 0, "session_id": "s"}, 422, "stars"),
    ("stars as float", {"rating": 1, "stars": 4.5, "session_id": "s"}, 422, "stars"),
    ("comment too long", {"rating": 1, "comment": "x" * 2001, "session_id": "s"}, 422, "comment"),
    ("unknown field", {"rating": 1, "session_id": "s", "user_id": "u"}, 422, "user_id"),
    ("body is a list", [1, 2], 422, "body"),
]


@pytest.mark.parametrize(("case", "body", "status", "mentions"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_a_clear_4xx_and_nothing_is_queued(env, case, body, status, mentions) -> None:
    client, r, known = env
    res = client.post(f"/api/feedback/{known}", json=body)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["status"] == status and mentions in error["message"]
    assert _queued(r) == 0


def test_a_one_megabyte_comment_is_refused_before_it_is_read(env) -> None:
    client, r, known = env
    res = client.post(f"/api/feedback/{known}", json={"rating": 1, "comment": "x" * 1_000_000, "session_id": "s"})
    assert res.status_code == 413 and "larger than" in res.json()["error"]["message"]
    assert _queued(r) == 0


def test_non_json_body_is_refused(env) -> None:
    client, r, known = env
    res = client.post(f"/api/feedback/{known}", content=b"rating=1", headers={"content-type": "application/json"})
    assert res.status_code == 422 and "not valid JSON" in res.json()["error"]["message"]
    assert _queued(r) == 0


def test_malformed_explanation_id_is_refused(env) -> None:
    client, r, _ = env
    res = client.post("/api/feedback/not-a-uuid", json={"rating": 1, "session_id": "s"})
    assert res.status_code == 422 and "explanation_id" in res.json()["error"]["message"]
    assert _queued(r) == 0


def test_admin_routes_refuse_missing_and_wrong_tokens(env) -> None:
    client, _, _ = env
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
        res = client.get("/api/feedback/audit", headers=headers)
        assert res.status_code == 401 and "items" not in res.json()
    ok = client.get("/api/feedback/audit", headers={"Authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200
    assert ok.json()["items"][0]["action"] == "read"  # the admin read itself is audited


def test_erasing_a_session_is_audited(env) -> None:
    client, _, _ = env
    res = client.delete("/api/feedback/sessions/s1")
    assert res.status_code == 200 and res.json()["erased"] is True
    log = client.get("/api/feedback/audit", headers={"Authorization": f"Bearer {ADMIN}"}).json()["items"]
    assert "erase_session" in [e["action"] for e in log]


def test_broker_down_means_503_not_a_silent_accept(tmp_path: Path) -> None:
    settings = FeedbackSettings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        admin_token=ADMIN,
        session_hash_key="k",
        data_dir=tmp_path,
        gateway_url=f"http://127.0.0.1:{free_port()}",
    )
    app = create_app(settings)
    client = TestClient(app)  # no lifespan: the topology cannot be declared without a broker
    import httpx

    from services.feedback.api import KnownIds
    from services.feedback.store import Store
    from shared.bus import GroupCommitSender, make_celery

    app.state.store = Store(settings.db_url)
    app.state.sender = GroupCommitSender(make_celery("feedback", settings))
    app.state.known_ids = KnownIds()
    app.state.http = httpx.AsyncClient()
    res = client.post(f"/api/feedback/{uuid.uuid4()}", json={"rating": 1, "session_id": "s"})
    assert res.status_code == 503 and "retry" in res.json()["error"]["message"]


def test_erasure_with_the_broker_down_still_answers_200_and_keeps_the_event_for_the_relay(env) -> None:
    from services.feedback.store import outbox
    from shared.bus import CeleryBus, make_celery
    from shared.outbox import pending

    client, _, _ = env
    app = client.app
    dead = app.state.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    app.state.bus = CeleryBus(make_celery("feedback", dead), deadline_s=0)
    res = client.delete("/api/feedback/sessions/s1")
    assert res.status_code == 200 and res.json()["erased"] is True
    events = pending(app.state.store.factory, outbox)
    assert [e["event_type"] for e in events] == ["feedback.erased"]
