"""The explanation API over HTTP (one service app, real SQLite, real Redis): the public contract, strict
input checks, provider failures as 502/503, the event on the queue, the admin state and the metrics."""

from __future__ import annotations

import base64
import json
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from gateway.redis_server import RedisServer, free_port
from gateway.routes import service_for
from services.router import handlers
from services.router.config import RouterSettings
from services.router.main import create_app
from services.router.store import outbox
from shared.bus import CeleryBus, make_celery
from shared.contracts import derived_id
from shared.outbox import pending, relay
from shared.privacy import session_key
from tests.fakes.openai_server import FakeOpenAIServer
from tests.support import app_state, wait_for

ADMIN = {"Authorization": "Bearer test-admin-token"}
BODY: dict[str, Any] = {
    "ticker": "AAPL",
    "signal": "BUY",
    "context": {"rsi": 28.5, "macd": "bullish_crossover", "volume": "high"},
    "session_id": "anon-123",
}


def broker_url(redis_server: RedisServer) -> str:
    return redis_server.url.rsplit("/", 1)[0] + "/9"  # a database of its own: other tests' queues stay apart


def settings(tmp_path: Path, redis_server: RedisServer, **kw: Any) -> RouterSettings:
    options: dict[str, Any] = {
        "data_dir": tmp_path,
        "redis_url": broker_url(redis_server),
        "admin_token": "test-admin-token",
        "session_hash_key": "test-session-key",
        "openai_api_key": None,
        "groq_api_key": None,
        "retry_backoff_s": 0.0,
        **kw,
    }
    return RouterSettings(**options)


@pytest.fixture
def client(tmp_path: Path, redis_server: RedisServer) -> Iterator[TestClient]:
    redis.Redis.from_url(broker_url(redis_server)).flushdb()
    with TestClient(create_app(settings(tmp_path, redis_server))) as c:
        yield c


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def queued_payloads(redis_server: RedisServer, queue: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(broker_url(redis_server))
    out = []
    for raw in r.lrange(queue, 0, -1):
        message = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], **kwargs["payload"]})
    return out


def test_explanation_is_created_with_the_public_contract(client: TestClient) -> None:
    r = client.post("/api/explanations", json=BODY)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) >= {"explanation_id", "text", "prompt_version", "model", "experiment_id", "latency_ms", "cost_usd"}
    uuid.UUID(body["explanation_id"])
    assert body["model"] == "offline/template-v1" and body["prompt_version"] == "v1.0"
    assert body["experiment_id"] is None and body["cost_usd"] == 0.0 and body["latency_ms"] >= 0
    assert "AAPL" in body["text"]
    assert not any("session" in key for key in body)  # the session never comes back, hashed or not
    assert BODY["session_id"] not in json.dumps(body)


def test_created_explanation_can_be_read_back(client: TestClient) -> None:
    created = client.post("/api/explanations", json=BODY).json()
    r = client.get(f"/api/explanations/{created['explanation_id']}")
    assert r.status_code == 200
    assert {k: r.json()[k] for k in created} == created


def test_the_api_process_checkpoints_its_store_off_the_request_path(client: TestClient) -> None:
    """`shared.web.start_service`: the WAL is copied back by a thread of its own, not in a request's commit."""
    checkpoints = app_state(client).store.checkpoints
    assert checkpoints is not None and checkpoints._thread.is_alive()
    assert client.post("/api/explanations", json=BODY).status_code == 201
    runs = checkpoints.runs
    wait_for(lambda: checkpoints.runs > runs, timeout_s=10)
    scraped = client.get("/metrics").text
    assert 'sqlite_wal_checkpoints_total{outcome="failed",service="router"} 0.0' in scraped
    done = [line for line in scraped.splitlines() if line.startswith('sqlite_wal_checkpoints_total{outcome="done"')]
    assert done and float(done[0].rsplit(" ", 1)[1]) >= 1


def test_unknown_explanation_is_404_json(client: TestClient) -> None:
    r = client.get(f"/api/explanations/{uuid.uuid4()}")
    assert r.status_code == 404
    assert "never issued" in r.json()["error"]["message"]


def test_malformed_explanation_id_is_422_json(client: TestClient) -> None:
    r = client.get("/api/explanations/not-a-uuid")
    assert r.status_code == 422
    assert r.json()["error"]["problems"][0]["field"] == "path.explanation_id"


def test_lowercase_ticker_is_normalised(client: TestClient) -> None:
    r = client.post("/api/explanations", json={**BODY, "ticker": "brk.b"})
    assert r.status_code == 201 and r.json()["ticker"] == "BRK.B"


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"ticker": "AA PL"}, "ticker", "ticker must be 1-12"),
        ({"ticker": "A" * 13}, "ticker", "at most 12"),
        ({"ticker": 123}, "ticker", "valid string"),
        ({"signal": "buy"}, "signal", "'BUY', 'SELL' or 'HOLD'"),
        ({"context": {"a": {"b": 1}}}, "context", "number, string or boolean"),
        ({"context": {f"k{i}": i for i in range(51)}}, "context", "at most 50"),
        ({"context": ["rsi"]}, "context", "valid dictionary"),
        ({"session_id": ""}, "session_id", "at least 1"),
        ({"session_id": "s" * 201}, "session_id", "at most 200"),
        ({"unexpected": 1}, "unexpected", "Extra inputs"),
    ],
)
def test_bad_input_is_422_naming_the_field(client: TestClient, change: dict, field: str, words: str) -> None:
    r = client.post("/api/explanations", json={**BODY, **change})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["problems"][0]["field"] == field
    assert words in error["message"]


def test_integer_indicator_too_big_for_a_float_is_422_not_500(client: TestClient) -> None:
    raw = b'{"ticker":"AAPL","signal":"BUY","session_id":"s","context":{"volume":' + b"9" * 400 + b"}}"
    r = client.post("/api/explanations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "fits in 64 bits" in r.json()["error"]["message"]


def test_missing_fields_and_broken_json_are_422(client: TestClient) -> None:
    assert client.post("/api/explanations", json={"ticker": "AAPL"}).status_code == 422
    r = client.post("/api/explanations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"]


def test_explanation_created_is_published_after_the_commit(client: TestClient, redis_server: RedisServer) -> None:
    created = client.post("/api/explanations", json=BODY).json()
    for queue in ("feedback", "optimizer", "finetune", "dashboard"):  # published by the relay thread, after the 201

        def events(queue: str = queue) -> list[Any]:
            tasks = queued_payloads(redis_server, queue)
            return [p["explanation_id"] for p in tasks if p["task"] == f"{queue}.on_explanation_created"]

        assert wait_for(lambda: events(), what=f"the event on {queue}") == [created["explanation_id"]], queue
    event = queued_payloads(redis_server, "feedback")[0]
    assert event["prompt_text"].startswith("You are a financial analyst")
    assert event["text"] == created["text"] and event["fallback_used"] is False
    # The served session travels as its keyed hash (the feedback service checks votes against it), never raw.
    assert len(event["session_key"]) == 64 and BODY["session_id"] not in json.dumps(event)


def test_routing_state_is_admin_only(client: TestClient) -> None:
    assert client.get("/api/router/state").status_code == 401
    assert client.get("/api/router/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
    state = client.get("/api/router/state", headers=ADMIN).json()
    assert state["champion"]["prompt_version"] == "v1.0" and state["champion"]["model"] == "offline/template-v1"
    assert state["experiment"] is None and state["default_model"] == "offline/template-v1"


def test_metrics_count_explanations_by_model_and_prompt_version(client: TestClient) -> None:
    client.post("/api/explanations", json=BODY)
    text = client.get("/metrics").text
    assert 'router_explanations_total{model="offline/template-v1",prompt_version="v1.0",signal="BUY"} 1.0' in text
    assert "router_explanation_latency_seconds_bucket" in text


def test_hosted_model_cost_comes_from_usage_and_the_price_table(
    tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer
) -> None:
    fake.reset()
    fake.answer("RSI is low.", prompt_tokens=1000, completion_tokens=500)
    s = settings(
        tmp_path,
        redis_server,
        openai_api_key="sk-test",
        openai_base_url=fake.openai_base_url,
        prices={"openai/gpt-4o-mini": {"input": 0.15, "output": 0.60}},
    )
    with TestClient(create_app(s)) as c:
        body = c.post("/api/explanations", json=BODY).json()
    assert body["model"] == "openai/gpt-4o-mini" and body["text"] == "RSI is low."
    assert (body["tokens_in"], body["tokens_out"]) == (1000, 500)
    assert math.isclose(body["cost_usd"], 1000 * 0.15 / 1e6 + 500 * 0.60 / 1e6)


def test_failing_provider_falls_back_to_offline_and_is_counted(
    tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer
) -> None:
    fake.reset()
    fake.fail_next(10, status=500)
    s = settings(tmp_path, redis_server, openai_api_key="sk-test", openai_base_url=fake.openai_base_url)
    with TestClient(create_app(s)) as c:
        body = c.post("/api/explanations", json=BODY).json()
        metrics = c.get("/metrics").text
    assert body["model"] == "offline/template-v1" and body["fallback_used"] is True
    assert 'router_fallbacks_total{answered="offline/template-v1",requested="openai/gpt-4o-mini"} 1.0' in metrics
    assert 'router_provider_errors_total{kind="http_500",model="openai/gpt-4o-mini"} 3.0' in metrics


def test_all_providers_failing_is_502_json(tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer) -> None:
    fake.reset()
    fake.fail_next(10, status=503)
    s = settings(
        tmp_path,
        redis_server,
        openai_api_key="sk-test",
        openai_base_url=fake.openai_base_url,
        offline_fallback=False,
        provider_retries=1,
    )
    with TestClient(create_app(s)) as c:
        r = c.post("/api/explanations", json=BODY)
    assert r.status_code == 502
    assert r.json()["error"]["message"].startswith("all providers failed: openai/gpt-4o-mini: http_503")


def test_no_configured_provider_is_503_json(tmp_path: Path, redis_server: RedisServer) -> None:
    s = settings(tmp_path, redis_server, default_model="openai/gpt-4o-mini", offline_fallback=False)
    with TestClient(create_app(s)) as c:
        r = c.post("/api/explanations", json=BODY)
    assert r.status_code == 503
    assert "no provider is configured" in r.json()["error"]["message"]


def test_session_is_stored_only_as_its_keyed_hash(client: TestClient) -> None:
    created = client.post("/api/explanations", json=BODY).json()
    row = handlers.get_explanation(app_state(client).store.uow(), uuid.UUID(created["explanation_id"]))
    assert row is not None
    assert row["session_key"] == session_key(BODY["session_id"], b"test-session-key")
    assert BODY["session_id"] not in json.dumps(row, default=str)


def test_published_event_leaves_nothing_pending_in_the_outbox(client: TestClient) -> None:
    client.post("/api/explanations", json=BODY)
    wait_for(lambda: pending(app_state(client).store.factory, outbox) == [], what="the relay thread to publish")


def test_broker_outage_still_serves_and_the_relay_publishes_later(
    client: TestClient, redis_server: RedisServer
) -> None:
    working_bus = app_state(client).bus
    dead = RouterSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=Path("."))
    app_state(client).bus = CeleryBus(make_celery("router", dead))
    try:
        r = client.post("/api/explanations", json=BODY)
    finally:
        app_state(client).bus = working_bus
    assert r.status_code == 201
    store = app_state(client).store
    assert [row["event_id"] for row in pending(store.factory, outbox)] == [
        str(derived_id("explanation.created", r.json()["explanation_id"]))
    ]
    assert relay(store.factory, outbox, working_bus) == 1
    events = [p for p in queued_payloads(redis_server, "feedback") if p["task"] == "feedback.on_explanation_created"]
    assert [e["explanation_id"] for e in events] == [r.json()["explanation_id"]]


def test_gateway_sends_router_paths_to_the_router() -> None:
    assert service_for("/api/explanations") == "router"
    assert service_for(f"/api/explanations/{uuid.uuid4()}") == "router"
    assert service_for("/api/router/state") == "router"


# -- doors: JSON only, rate limits, the daily budget, text that cannot be stored ---------------------------


def test_an_explanation_request_that_is_not_json_is_415(client: TestClient) -> None:
    r = client.post("/api/explanations", content=json.dumps(BODY), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "must be JSON" in r.json()["error"]["message"]
    assert client.get("/api/router/state", headers=ADMIN).status_code == 200  # GETs are not affected


def test_explanations_over_the_session_limit_get_429_with_retry_after(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis.Redis.from_url(broker_url(redis_server)).flushdb()
    with TestClient(create_app(settings(tmp_path, redis_server, explanations_per_session="2/minute"))) as c:
        assert [c.post("/api/explanations", json=BODY).status_code for _ in range(2)] == [201, 201]
        r = c.post("/api/explanations", json=BODY)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert c.post("/api/explanations", json={**BODY, "session_id": "another"}).status_code == 201
        assert (
            'http_refused_total{door="explanations",reason="rate_limit_session",service="router"} 1.0'
            in c.get("/metrics").text
        )


def test_each_scope_refuses_at_its_own_limit_and_every_scope_is_counted_in_one_round_trip(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis.Redis.from_url(broker_url(redis_server)).flushdb()
    limits = {"explanations_per_client": "3/minute", "explanations_per_session": "2/minute"}
    with TestClient(create_app(settings(tmp_path, redis_server, **limits))) as c:
        answers = [c.post("/api/explanations", json={**BODY, "session_id": s}) for s in ("a", "a", "a", "b")]
        assert [r.status_code for r in answers] == [201, 201, 429, 429]
        assert "from this session: at most 2 per minute" in answers[2].json()["error"]["message"]
        assert "from this client: at most 3 per minute" in answers[3].json()["error"]["message"]
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in answers[2:])
        metrics = c.get("/metrics").text
        assert 'http_refused_total{door="explanations",reason="rate_limit_session",service="router"} 1.0' in metrics
        assert 'http_refused_total{door="explanations",reason="rate_limit_client",service="router"} 1.0' in metrics
    # the request of session "b" refused at the client limit still counted for its session: one left of two
    with TestClient(create_app(settings(tmp_path, redis_server, explanations_per_session="2/minute"))) as c:
        assert [c.post("/api/explanations", json={**BODY, "session_id": "b"}).status_code for _ in range(2)] == [
            201,
            429,
        ]


def test_a_spent_daily_budget_is_503_and_the_provider_is_not_called(
    tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer
) -> None:
    redis.Redis.from_url(broker_url(redis_server)).flushdb()
    fake.reset()
    fake.answer("RSI is low.", prompt_tokens=1000, completion_tokens=500)  # $0.00045 at gpt-4o-mini prices
    s = settings(
        tmp_path, redis_server, openai_api_key="sk-test", openai_base_url=fake.openai_base_url, daily_budget_usd=0.0004
    )
    with TestClient(create_app(s)) as c:
        first = c.post("/api/explanations", json=BODY)
        assert first.status_code == 201 and first.json()["cost_usd"] > 0.0004
        calls = len(fake.requests)
        r = c.post("/api/explanations", json={**BODY, "session_id": "another"})
        assert r.status_code == 503, r.text
        assert "daily provider budget of $0.00 is spent" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert len(fake.requests) == calls  # not called
        assert "router_budget_refusals_total 1.0" in c.get("/metrics").text


def test_a_spent_budget_does_not_stop_a_free_model(tmp_path: Path, redis_server: RedisServer) -> None:
    redis.Redis.from_url(broker_url(redis_server)).flushdb()
    r = redis.Redis.from_url(broker_url(redis_server))
    from datetime import UTC, datetime

    from services.router.domain import budget_day

    r.set(f"router:spend:{budget_day(datetime.now(UTC))}", 100.0)  # far over any budget
    with TestClient(create_app(settings(tmp_path, redis_server, daily_budget_usd=1.0))) as c:
        out = c.post("/api/explanations", json=BODY)
    assert out.status_code == 201 and out.json()["model"] == "offline/template-v1"


@pytest.mark.parametrize(
    "change",
    [
        {"context": {"note": "up\u202eexe.txt"}},
        {"context": {"n\u2067ote": 1}},
        {"context": {"note": "x\ud800y"}},
        {"ticker": "AA\u202ePL"},
        {"session_id": "s\ud800"},
    ],
    ids=["bidi-value", "bidi-key", "surrogate-value", "bidi-ticker", "surrogate-session"],
)
def test_lone_surrogates_and_bidi_controls_are_422_before_any_provider_call(
    tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer, change: dict[str, Any]
) -> None:
    fake.reset()
    s = settings(tmp_path, redis_server, openai_api_key="sk-test", openai_base_url=fake.openai_base_url)
    with TestClient(create_app(s)) as c:
        # json.dumps escapes a lone surrogate as \ud800, exactly as a client would send it
        r = c.post(
            "/api/explanations", content=json.dumps({**BODY, **change}), headers={"content-type": "application/json"}
        )
    assert r.status_code == 422, r.text
    assert any(w in r.json()["error"]["message"] for w in ("surrogate", "bidirectional", "ticker", "unicode"))
    assert fake.requests == []
