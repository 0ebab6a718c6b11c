"""Variant generation through the real openai SDK against a local fake OpenAI server (real HTTP)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer
from services.optimizer import handlers, search
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import price_usd
from services.optimizer.main import create_app
from shared.contracts import ExplanationCreated, FeedbackRecorded, utcnow
from shared.prompts import SEED_TEMPLATE
from tests.fakes.openai_server import FakeOpenAIServer

TOKEN = "openai-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
GOOD = "Ticker: {ticker}\nSignal: {signal}\nIndicators:\n{indicators}\n\nIn two bullet points, say why {ticker} is a {signal}."
BROKEN = "Explain why {ticker} is a {signal}."


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def _settings(tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer, **kw: Any) -> OptimizerSettings:
    options: dict[str, Any] = {
        "redis_url": redis_server.url.rsplit("/", 1)[0] + "/8",  # own database: our events reach no other test
        "admin_token": SecretStr(TOKEN),
        "data_dir": tmp_path,
        "openai_api_key": SecretStr("sk-test"),
        "openai_base_url": fake.openai_base_url,
        "generation_min_interval_s": 3600,
        "generation_timeout_s": 5,
    }
    return OptimizerSettings(**options | kw)


@pytest.fixture
def client(tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer) -> Iterator[TestClient]:
    fake.reset()
    with TestClient(create_app(_settings(tmp_path, redis_server, fake))) as c:
        yield c


def test_meta_prompt_variants_pass_guardrails_and_cost_is_recorded(client: TestClient, fake: FakeOpenAIServer) -> None:
    answer = {
        "variants": [
            {"template": GOOD, "rationale": "shorter, bullet points"},
            {"template": BROKEN, "rationale": "drops the indicators"},
            {"template": SEED_TEMPLATE, "rationale": "unchanged"},
        ]
    }
    fake.answer(json.dumps(answer), prompt_tokens=800, completion_tokens=400)
    r = client.post("/api/prompts/explain_signal/variants", json={"count": 3}, headers=ADMIN)
    assert r.status_code == 201, r.text
    result = r.json()
    assert result["source"] == "openai" and result["model"] == "gpt-4o-mini"
    assert [(v["version"], v["template"]) for v in result["accepted"]] == [("v1.1", GOOD)]
    assert result["accepted"][0]["reason"] == "openai: shorter, bullet points"
    assert [r["reason"][:25] for r in result["rejected"]] == ["template drops required p", "repeats v1.0 (champion)"]
    assert result["cost_usd"] == pytest.approx(price_usd("gpt-4o-mini", 800, 400))
    assert result["tokens_in"] == 800 and result["tokens_out"] == 400

    (request,) = fake.requests
    assert request.authorization == "Bearer sk-test" and request.model == "gpt-4o-mini"
    user = request.messages[-1]["content"]
    assert SEED_TEMPLATE in user and "Generate 3 variants" in user and "clearer or more concise" in user

    generations = client.get("/api/prompts/explain_signal").json()["generations"]
    assert generations[0]["source"] == "openai" and generations[0]["cost_usd"] == pytest.approx(result["cost_usd"])


def test_provider_failure_is_a_502_and_does_not_use_up_the_rate_limit(
    client: TestClient, fake: FakeOpenAIServer
) -> None:
    fake.fail_next(2, status=500)  # the SDK retries once
    r = client.post("/api/prompts/explain_signal/variants", headers=ADMIN)
    assert r.status_code == 502 and "OpenAI variant generation failed" in r.json()["error"]["message"]
    fake.answer(json.dumps({"variants": [{"template": GOOD, "rationale": "bullets"}]}))
    r = client.post("/api/prompts/explain_signal/variants", headers=ADMIN)
    assert r.status_code == 201 and len(r.json()["accepted"]) == 1


def test_answer_that_is_not_json_is_a_502(client: TestClient, fake: FakeOpenAIServer) -> None:
    fake.answer("Sure! Here are some ideas: be clearer.")
    r = client.post("/api/prompts/explain_signal/variants", headers=ADMIN)
    assert r.status_code == 502 and "not JSON" in r.json()["error"]["message"]


def test_an_answer_too_slow_or_too_large_is_a_502(
    tmp_path: Path, redis_server: RedisServer, fake: FakeOpenAIServer
) -> None:
    fake.reset()
    fake.answer(json.dumps({"variants": [{"template": GOOD, "rationale": "bullets"}]}))
    # 8 bytes every 0.05 s: each wait is far under the 0.3 s timeout, the whole answer would take seconds
    fake.trickle_next(2, gap_s=0.05)
    with TestClient(create_app(_settings(tmp_path, redis_server, fake, generation_timeout_s=0.3))) as c:
        r = c.post("/api/prompts/explain_signal/variants", headers=ADMIN)
        assert r.status_code == 502 and "still arriving after 0.3 s" in r.json()["error"]["message"]
        fake.reset()  # no more trickling (the SDK may have retried once)
        fake.answer("x" * (1 << 20))
        r = c.post("/api/prompts/explain_signal/variants", headers=ADMIN)
        assert r.status_code == 502 and "larger than" in r.json()["error"]["message"]


def vote(client: TestClient, experiment_id: str, arm_id: str, version: str, i: int, up: bool) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    eid, session = uuid.uuid4(), f"{arm_id}-{i}"
    common: dict[str, Any] = {
        "prompt_name": "explain_signal",
        "prompt_version": version,
        "model": "offline/template-v1",
    }
    common |= {"experiment_id": experiment_id, "arm_id": arm_id, "ticker": "AAPL", "signal": "BUY"}
    handlers.on_explanation_created(
        ExplanationCreated(
            explanation_id=eid, request_key="k", provider="offline", prompt_text="p", text="t", tokens_in=1,
            tokens_out=1, cost_usd=0.0, latency_ms=1.0, created_at=utcnow(), session_key=session, **common,
        ),
        store.uow(),
    )  # fmt: skip
    handlers.on_feedback_recorded(
        FeedbackRecorded(
            feedback_id=uuid.uuid4(), explanation_id=eid, session_key=session, rating=1 if up else -1,
            submitted_at=utcnow(), **common,
        ),
        store.uow(),
    )  # fmt: skip


def test_the_search_history_reaches_the_meta_prompt_and_repeats_are_rejected(
    client: TestClient, fake: FakeOpenAIServer
) -> None:
    fake.answer(json.dumps({"variants": [{"template": GOOD, "rationale": "bullets"}, {"template": BROKEN}]}))
    assert client.post("/api/prompts/explain_signal/variants", json={"count": 2}, headers=ADMIN).status_code == 201
    arms = [
        {"prompt_version": "v1.0", "model": "offline/template-v1", "is_control": True},
        {"prompt_version": "v1.1", "model": "offline/template-v1"},
    ]
    r = client.post(
        "/api/experiments",
        json={"arms": arms, "min_duration_s": 0, "min_feedback_per_arm": 20, "max_feedback_per_arm": 40},
        headers=ADMIN,
    )
    experiment_id = r.json()["experiment_id"]
    for i in range(40):
        vote(client, experiment_id, "control", "v1.0", i, up=i % 2 == 0)
        vote(client, experiment_id, "t1", "v1.1", i, up=i % 4 == 0)
    (decision,) = client.post("/api/experiments/decisions", headers=ADMIN).json()["results"]
    assert decision["action"] == "concluded"

    # the next generation, past the rate limit: the same SDK and fake server, with the search's history
    fake.answer(json.dumps({"variants": [{"template": GOOD, "rationale": "again"}, {"template": BROKEN}]}))
    settings = client.app.state.settings  # type: ignore[attr-defined]
    result = search.generate_variants(
        "explain_signal",
        client.app.state.store.uow,  # type: ignore[attr-defined]
        client.app.state.generator,  # type: ignore[attr-defined]
        settings,
        utcnow() + timedelta(hours=2),
    )
    user = fake.requests[-1].messages[-1]["content"]
    assert "What has been tried on this prompt so far" in user
    assert "v1.0 (current champion; rate 50.0% over 40 votes" not in user  # the control has no lift of its own
    assert "- v1.0 (current champion; not measured yet)" in user
    assert "Versions that lost" in user and "v1.1 (rate 25.0% over 40 votes; lift -50.0% vs v1.0" in user
    assert "In two bullet points, say why {ticker} is a {signal}." in user  # the losing template itself
    assert "Proposals rejected by the guardrails" in user and "drops required placeholders" in user
    assert result["accepted"] == []
    assert [r["reason"][:32] for r in result["rejected"]] == [
        "repeats v1.1 (lost)",
        "repeats a proposal rejected befo",
    ]
    assert result["cost_usd"] > 0 and client.get("/api/prompts/explain_signal").json()["generations"][0]["cost_usd"] > 0
