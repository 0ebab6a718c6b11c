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

from gateway.routes import service_for
from services.router import handlers
from services.router.config import RouterSettings
from services.router.main import create_app
from services.router.store import outbox
from shared.bus import CeleryBus, make_celery
from shared.contracts import derived_id
from shared.outbox import pending, relay
from shared.privacy import session_key
from shared.redis_server import RedisServer, free_port
from tests.fakes.openai_server import FakeOpenAIServer

ADMIN = {"Authorization": "Bearer test-admin-token"}
BODY = {
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
    for queue in ("feedback", "optimizer", "finetune", "dashboard"):
        events = [p for p in queued_payloads(redis_server, queue) if p["task"] == f"{queue}.on_explanation_created"]
        assert [e["explanation_id"] for e in events] == [created["explanation_id"]], queue
    event = queued_payloads(redis_server, "feedback")[0]
    assert event["prompt_text"].startswith("You are a financial analyst")
    assert event["text"] == created["text"] and event["fallback_used"] is False
    # The served session travels only as its keyed hash (the unit of analysis and the only session whose vote
    # counts), never as the raw id.
    assert event["session_key"] != BODY["session_id"] and len(event["session_key"]) == 64
    assert BODY["session_id"] not in json.dumps(event)


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
    row = handlers.get_explanation(client.app.state.store.uow(), uuid.UUID(created["explanation_id"]))
    assert row is not None
    assert row["session_key"] == session_key(BODY["session_id"], b"test-session-key")
    assert BODY["session_id"] not in json.dumps(row, default=str)


def test_published_event_leaves_nothing_pending_in_the_outbox(client: TestClient) -> None:
    client.post("/api/explanations", json=BODY)
    assert pending(client.app.state.store.factory, outbox) == []


def test_broker_outage_still_serves_and_the_relay_publishes_later(
    client: TestClient, redis_server: RedisServer
) -> None:
    working_bus = client.app.state.bus
    dead = RouterSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=Path("."))
    client.app.state.bus = CeleryBus(make_celery("router", dead))
    try:
        r = client.post("/api/explanations", json=BODY)
    finally:
        client.app.state.bus = working_bus
    assert r.status_code == 201
    store = client.app.state.store
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
