"""The feedback API over HTTP, on a real SQLite file and a real Redis: what it accepts, and what it refuses
without storing or queueing anything."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer, free_port
from services.feedback import handlers
from services.feedback.config import FeedbackSettings
from services.feedback.main import create_app
from shared.contracts import ExplanationCreated
from shared.privacy import session_key
from shared.ratelimit import COUNTER_PREFIX
from tests.support import app_state, explanation_created, found_in_redis, wait_for

ADMIN = "admin-secret"


SERVED = "s1"  # the session the known explanation was served to


def _explanation(session: str | None) -> tuple[uuid.UUID, ExplanationCreated]:
    eid = uuid.uuid4()
    key = None if session is None else session_key(session, b"k")
    return eid, explanation_created(eid, key, ticker="MSFT", signal="SELL")


@pytest.fixture
def make_env(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[..., tuple[TestClient, redis.Redis, uuid.UUID]]]:
    """`make_env(**settings)`: the feedback API on a fresh store and an empty Redis, with one explanation
    served to session SERVED."""
    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    stack = ExitStack()

    def make(**overrides: Any) -> tuple[TestClient, redis.Redis, uuid.UUID]:
        settings = FeedbackSettings(
            redis_url=redis_server.url,
            admin_token=SecretStr(ADMIN),
            session_hash_key=SecretStr("k"),
            data_dir=tmp_path,
            gateway_url=f"http://127.0.0.1:{free_port()}",  # no router there: unknown ids are accepted and left to the worker
            **overrides,
        )
        app = create_app(settings)
        client = stack.enter_context(TestClient(app))
        known, event = _explanation(SERVED)
        handlers.on_explanation_created(event, app.state.store.uow())
        return client, r, known

    with stack:
        yield make
    r.close()


@pytest.fixture
def env(
    make_env: Callable[..., tuple[TestClient, redis.Redis, uuid.UUID]],
) -> tuple[TestClient, redis.Redis, uuid.UUID]:
    return make_env()


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
    # the same problem FastAPI reports for a declared `explanation_id: uuid.UUID` path parameter
    assert [(p["field"], p["type"]) for p in res.json()["error"]["problems"]] == [
        ("path.explanation_id", "uuid_parsing")
    ]
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
        admin_token=SecretStr(ADMIN),
        session_hash_key=SecretStr("k"),
        data_dir=tmp_path,
        gateway_url=f"http://127.0.0.1:{free_port()}",
    )
    app = create_app(settings)
    client = TestClient(app)  # no lifespan: the topology cannot be declared without a broker
    import httpx

    from services.feedback.api import Backlog, KnownIds
    from services.feedback.intake import GroupCommitSender
    from services.feedback.store import Store
    from shared.bus import make_celery
    from shared.ratelimit import AsyncRateLimiter

    app.state.store = Store(settings.db_url)
    app.state.sender = GroupCommitSender(make_celery("feedback", settings))
    app.state.known_ids = KnownIds()
    app.state.http = httpx.AsyncClient()
    app.state.vote_limiter = AsyncRateLimiter(settings.redis_url, "feedback", "votes", {"session": "5/minute"})
    app.state.backlog = Backlog(settings.redis_url, "feedback", "journal:feedback")
    res = client.post(f"/api/feedback/{uuid.uuid4()}", json={"rating": 1, "session_id": "s"})
    assert res.status_code == 503 and "retry" in res.json()["error"]["message"]


def _bus_to_a_dead_broker(client: TestClient, deadline_s: float) -> None:
    """The app's bus publishes to an address where no broker answers, giving up after `deadline_s`."""
    from shared.bus import CeleryBus, make_celery

    state = app_state(client)
    dead = state.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    state.bus = CeleryBus(make_celery("feedback", dead), deadline_s=deadline_s)


def test_erasure_with_the_broker_down_still_answers_200_and_keeps_the_event_for_the_relay(env) -> None:
    from services.feedback.store import outbox
    from shared.outbox import pending

    client, _, _ = env
    app = client.app
    _bus_to_a_dead_broker(client, deadline_s=0)
    res = client.delete("/api/feedback/sessions/s1")
    assert res.status_code == 200 and res.json()["erased"] is True
    events = pending(app.state.store.factory, outbox)
    assert [e["event_type"] for e in events] == ["feedback.erased"]


# -- votes count only from the session the explanation was served to -------------------------------------------


def _refused(client: TestClient, reason: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("http_refused_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_vote_from_a_session_the_explanation_was_not_served_to_is_403_and_not_queued(env) -> None:
    client, r, known = env
    res = client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": "someone-else"})
    assert res.status_code == 403, res.text
    assert "not served to this session" in res.json()["error"]["message"]
    assert _queued(r) == 0
    assert _refused(client, "other_session") == 1
    assert client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": SERVED}).status_code == 202


def test_vote_on_an_explanation_that_carries_no_session_is_403(env) -> None:
    client, r, _ = env
    legacy, event = _explanation(None)
    handlers.on_explanation_created(event, app_state(client).store.uow())
    res = client.post(f"/api/feedback/{legacy}", json={"rating": 1, "session_id": SERVED})
    assert res.status_code == 403 and "cannot be verified" in res.json()["error"]["message"]
    assert _queued(r) == 0


# -- browser doors: JSON only, allowed origins --------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"rating": 1, "session_id": "s1"}', "text/plain"),
        (b"rating=1&session_id=s1", "application/x-www-form-urlencoded"),
        (b'--x\r\nContent-Disposition: form-data; name="rating"\r\n\r\n1\r\n--x--', "multipart/form-data; boundary=x"),
    ],
    ids=["text-plain", "form", "multipart"],
)
def test_a_vote_that_is_not_json_is_415_and_not_queued(env, content: bytes, content_type: str) -> None:
    client, r, known = env
    res = client.post(f"/api/feedback/{known}", content=content, headers={"content-type": content_type})
    assert res.status_code == 415, res.text
    assert "must be JSON" in res.json()["error"]["message"]
    assert _queued(r) == 0


def test_a_vote_from_another_sites_page_is_403_and_the_pages_own_origin_passes(env) -> None:
    client, r, known = env
    body = {"rating": 1, "session_id": SERVED}
    res = client.post(f"/api/feedback/{known}", json=body, headers={"Origin": "https://evil.example"})
    assert res.status_code == 403 and "evil.example" in res.json()["error"]["message"]
    assert _queued(r) == 0
    # The page itself: Origin is what the browser connected to (the Host header).
    assert client.post(f"/api/feedback/{known}", json=body, headers={"Origin": "http://testserver"}).status_code == 202


def test_an_allowed_origin_passes_and_gets_cors_answers(make_env) -> None:
    client, _, known = make_env(allowed_origins="https://app.example, https://other.example")
    body = {"rating": 1, "session_id": SERVED}
    res = client.post(f"/api/feedback/{known}", json=body, headers={"Origin": "https://app.example"})
    assert res.status_code == 202, res.text
    assert res.headers["access-control-allow-origin"] == "https://app.example"
    pre = client.options(
        f"/api/feedback/{known}",
        headers={"Origin": "https://other.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://other.example"
    assert client.post(f"/api/feedback/{known}", json=body, headers={"Origin": "https://x.example"}).status_code == 403


def test_an_erasure_from_another_sites_page_is_403(env) -> None:
    client, _, _ = env
    res = client.delete(f"/api/feedback/sessions/{SERVED}", headers={"Origin": "https://evil.example"})
    assert res.status_code == 403


# -- rate limits and backpressure ---------------------------------------------------------------------------


def test_votes_over_the_session_limit_get_429_with_retry_after(make_env) -> None:
    client, r, known = make_env(votes_per_session="3/minute")
    statuses = [
        client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": SERVED}).status_code for _ in range(3)
    ]
    assert statuses == [202, 202, 202]
    res = client.post(f"/api/feedback/{known}", json={"rating": -1, "session_id": SERVED})
    assert res.status_code == 429, res.text
    assert 1 <= int(res.headers["retry-after"]) <= 60
    assert res.json()["error"]["retry_after_s"] == int(res.headers["retry-after"])
    assert "session" in res.json()["error"]["message"]
    assert _queued(r) == 3


def test_votes_over_the_client_limit_get_429_whatever_the_session(make_env) -> None:
    client, _, known = make_env(votes_per_client="2/minute")
    for _ in range(2):
        client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": SERVED})
    res = client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": "fresh-session"})
    assert res.status_code == 429 and "client" in res.json()["error"]["message"]
    assert int(res.headers["retry-after"]) >= 1


def test_rate_limits_can_be_switched_off(make_env) -> None:
    client, _, known = make_env(votes_per_session="1/minute", rate_limits_enabled=False)
    for _ in range(3):
        assert client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": SERVED}).status_code == 202


def test_a_backlog_above_the_bound_gets_503_with_retry_after(make_env) -> None:
    client, r, known = make_env(max_backlog=5, backlog_retry_after_s=7)
    app_state(client).backlog.refresh_s = 0  # read Redis on every request in this test
    body = {"rating": 1, "session_id": SERVED}
    r.rpush("feedback", *[b"x"] * 5)
    assert client.post(f"/api/feedback/{known}", json=body).status_code == 202  # 5 waiting: at the bound
    res = client.post(f"/api/feedback/{known}", json=body)  # 6 waiting now: above it
    assert res.status_code == 503 and res.headers["retry-after"] == "7"
    assert "backed up" in res.json()["error"]["message"]
    r.delete("feedback")
    r.delete("journal:feedback")
    assert client.post(f"/api/feedback/{known}", json=body).status_code == 202


# -- text that cannot be stored or misleads readers --------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("comment", "nice \u202e txt.exe"), ("comment", "a\u2066b"), ("session_id", "s\u200f1")],
)
def test_bidirectional_controls_in_user_text_are_422(env, field: str, value: str) -> None:
    client, r, known = env
    body = {"rating": 1, "session_id": SERVED, field: value}
    res = client.post(f"/api/feedback/{known}", json=body)
    assert res.status_code == 422 and "bidirectional" in res.json()["error"]["message"]
    assert _queued(r) == 0


def test_a_lone_surrogate_in_a_comment_is_422(env) -> None:
    client, r, known = env
    raw = b'{"rating": 1, "session_id": "s1", "comment": "x\\ud800y"}'
    res = client.post(f"/api/feedback/{known}", content=raw, headers={"content-type": "application/json"})
    assert res.status_code == 422, res.text
    assert _queued(r) == 0


# -- erasure: rate-limited, and an unknown session leaves no permanent row ------------------------------


def _rows(client: TestClient, table: str) -> int:
    from sqlalchemy import text

    with app_state(client).store.engine.connect() as conn:
        return int(conn.execute(text(f"select count(*) from {table}")).scalar_one())


def test_erasing_an_unknown_session_writes_no_permanent_row_but_tells_the_other_services(env) -> None:
    client, r, _ = env
    before = {t: _rows(client, t) for t in ("audit", "erasures", "outbox")}
    res = client.delete("/api/feedback/sessions/never-seen")
    assert res.status_code == 200 and res.json() == {"erased": True, "votes_erased": 0}
    assert {t: _rows(client, t) for t in ("audit", "erasures", "outbox")} == before
    assert _rows(client, "erasure_tombstones") == 1  # purged after FEEDBACK_ERASURE_TOMBSTONE_S
    tasks = [json.loads(m)["headers"]["task"] for q in ("optimizer", "dashboard") for m in r.lrange(q, 0, -1)]
    assert tasks == ["optimizer.on_feedback_erased", "dashboard.on_feedback_erased"]


def test_expired_tombstones_are_purged_by_the_next_erasure(make_env) -> None:

    from sqlalchemy import select

    from services.feedback.store import erasure_tombstones

    client, _, _ = make_env(erasure_tombstone_s=0.01)
    client.delete("/api/feedback/sessions/ghost-1")
    with app_state(client).store.engine.connect() as conn:
        expires = conn.execute(select(erasure_tombstones.c.expires_at)).scalar_one()
    expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    wait_for(lambda: datetime.now(UTC) > expires, timeout_s=5, interval_s=0.01, what="the tombstone to expire")
    client.delete("/api/feedback/sessions/ghost-2")
    assert _rows(client, "erasure_tombstones") == 1


def test_a_vote_cast_before_an_unknown_sessions_erasure_is_still_dropped(env) -> None:
    client, _, _ = env
    store = app_state(client).store
    late, event = _explanation("late-session")
    vote = handlers.new_vote(late, session_key("late-session", b"k"), 1, None, None)
    client.delete("/api/feedback/sessions/late-session")  # nothing of it here yet: a tombstone
    handlers.on_explanation_created(event, store.uow())
    assert handlers.record_feedback(vote, store.uow()) == "erased"


def test_erasures_over_the_session_limit_get_429(make_env) -> None:
    client, _, _ = make_env(erasures_per_session="2/hour")
    assert [client.delete("/api/feedback/sessions/x").status_code for _ in range(2)] == [200, 200]
    res = client.delete("/api/feedback/sessions/x")
    assert res.status_code == 429 and int(res.headers["retry-after"]) > 60


def test_erasing_an_unknown_session_with_the_broker_down_is_503_not_a_silent_success(env) -> None:
    client, _, _ = env
    _bus_to_a_dead_broker(client, deadline_s=0.5)
    res = client.delete("/api/feedback/sessions/never-seen")
    assert res.status_code == 503 and "retry" in res.json()["error"]["message"]


# -- erasure reaches the intake journal; rotation of the session-hash secret -------------------------------


def _journalled_sessions(r: redis.Redis) -> list[str]:
    from services.feedback.intake import task_payload

    return sorted(
        task_payload(v.partition(b"|")[2])["session_key"] for v in cast("list[bytes]", r.hvals("journal:feedback"))
    )


def test_erasure_removes_the_sessions_votes_from_the_intake_journal_and_the_queue(env) -> None:
    client, r, known = env
    other, event = _explanation("s2")
    handlers.on_explanation_created(event, app_state(client).store.uow())
    assert (
        client.post(f"/api/feedback/{known}", json={"rating": 1, "comment": "mine", "session_id": SERVED}).status_code
        == 202
    )
    assert client.post(f"/api/feedback/{other}", json={"rating": -1, "session_id": "s2"}).status_code == 202
    mine, theirs = session_key(SERVED, b"k"), session_key("s2", b"k")
    assert _journalled_sessions(r) == sorted([mine, theirs]) and _queued(r) == 2
    url = app_state(client).settings.redis_url
    assert {h.split(" ")[0] for h in found_in_redis(url, [mine])} >= {"journal:feedback", "feedback"}

    assert client.delete(f"/api/feedback/sessions/{SERVED}").status_code == 200

    assert _journalled_sessions(r) == [theirs]
    # left: the erasure itself on its way to the other services (no workers here), and the rate-limit counters
    # (they expire with their window)
    left = {h.split(" ")[0] for h in found_in_redis(url, [mine, "mine"]) if not h.startswith(COUNTER_PREFIX)}
    assert left == {"router", "optimizer", "finetune", "dashboard"}
    queued = [m for m in r.lrange("feedback", 0, -1)]
    assert len(queued) == 1 and mine.encode() not in b"".join(queued) and b"mine" not in b"".join(queued)
    # the session can no longer vote on what it was served before the erasure
    assert client.post(f"/api/feedback/{known}", json={"rating": 1, "session_id": SERVED}).status_code == 403


def test_after_rotation_votes_under_the_old_key_are_found_replaced_and_erased(make_env, tmp_path: Path) -> None:
    from tests.support import found_in_sqlite

    old_key, new_key = session_key(SERVED, b"k"), session_key(SERVED, b"k2")
    client, r, known = make_env(session_hash_keys="v2:k2")  # SESSION_HASH_KEY "k" stays as the oldest version
    store = app_state(client).store
    first = handlers.new_vote(known, old_key, 1, 5, "before the rotation")  # stored under the old key
    assert handlers.record_feedback(first, store.uow()) == "stored"

    # the same session votes again after the rotation: recognised under its old key, so it replaces the vote
    res = client.post(f"/api/feedback/{known}", json={"rating": -1, "session_id": SERVED})
    assert res.status_code == 202 and res.json()["feedback_id"] == str(first.feedback_id)
    assert _journalled_sessions(r) == [old_key]
    # a new explanation is served under the new key, and its vote is bound to that
    fresh, event = _explanation(None)
    handlers.on_explanation_created(event.model_copy(update={"session_key": new_key}), store.uow())
    assert client.post(f"/api/feedback/{fresh}", json={"rating": 1, "session_id": SERVED}).status_code == 202
    assert _journalled_sessions(r) == sorted([old_key, new_key])

    res = client.delete(f"/api/feedback/sessions/{SERVED}")

    assert res.status_code == 200 and res.json()["votes_erased"] == 1
    assert _journalled_sessions(r) == []
    # the erasure's events were published right after the commit, and their rows emptied then
    assert found_in_sqlite([tmp_path / "feedback.db"], [old_key, new_key, "before the rotation"]) == []
