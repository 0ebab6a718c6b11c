"""The public write routes' doors, over HTTP against the whole system as `make run` starts it: only the served
session's vote counts, bodies must be JSON, browsers of other sites are turned away, floods get 429 with
Retry-After, and a spent provider budget gets 503 without a provider call."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from gateway.run import Stack
from tests.fakes.openai_server import FakeOpenAIServer
from tests.support import wait_for

pytestmark = pytest.mark.slow

EXPLAIN = {"ticker": "AMD", "signal": "HOLD", "context": {"rsi": 51}}


def _explain(client: httpx.Client, session: str) -> dict:
    res = client.post("/api/explanations", json={**EXPLAIN, "session_id": session})
    assert res.status_code == 201, res.text
    return res.json()


def _stored_votes(stack: Stack, explanation_id: str) -> list[tuple]:
    with sqlite3.connect(stack.data_dir / "feedback.db") as conn:
        return conn.execute(
            "select session_key, rating from feedback where explanation_id = ?", (explanation_id,)
        ).fetchall()


def test_a_vote_from_another_session_gets_403_and_only_the_served_sessions_vote_is_stored(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        exp = _explain(client, "doors-served")
        url = f"/api/feedback/{exp['explanation_id']}"
        # Until the feedback service has the explanation's event, a vote is quarantined (202) and checked on
        # release; once it has it, another session's vote is refused at the door.
        refused = wait_for(
            lambda: (
                (r := client.post(url, json={"rating": 1, "session_id": "doors-intruder"})).status_code == 403 and r
            ),
            what="403 for a vote from a session the explanation was not served to",
        )
        assert "not served to this session" in refused.json()["error"]["message"]
        assert client.post(url, json={"rating": -1, "session_id": "doors-served"}).status_code == 202
        (vote,) = wait_for(lambda: _stored_votes(stack, exp["explanation_id"]), what="the served session's vote")
        assert vote[1] == -1
        metrics = client.get("/services/feedback/metrics").text
        assert 'http_refused_total{door="votes",reason="other_session",service="feedback"}' in metrics


def test_a_text_plain_vote_gets_415_and_nothing_is_stored(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        exp = _explain(client, "doors-plain")
        res = client.post(
            f"/api/feedback/{exp['explanation_id']}",
            content=b'{"rating": 1, "session_id": "doors-plain"}',
            headers={"content-type": "text/plain"},
        )
        assert res.status_code == 415 and "must be JSON" in res.json()["error"]["message"]
        form = client.post("/api/explanations", data={"ticker": "AMD", "signal": "BUY", "session_id": "f"})
        assert form.status_code == 415
    assert _stored_votes(stack, exp["explanation_id"]) == []


def test_a_vote_from_another_sites_page_gets_403_and_the_pages_own_origin_passes(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        exp = _explain(client, "doors-origin")
        url = f"/api/feedback/{exp['explanation_id']}"
        body = {"rating": 1, "session_id": "doors-origin"}
        evil = client.post(url, json=body, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and "not allowed" in evil.json()["error"]["message"]
        assert client.post(url, json=body, headers={"Origin": stack.url}).status_code == 202


def test_a_flood_of_votes_from_one_session_gets_429_with_retry_after(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        exp = _explain(client, "doors-flood")
        url = f"/api/feedback/{exp['explanation_id']}"
        statuses = []
        for i in range(130):  # the default is 120 votes per session per minute
            res = client.post(url, json={"rating": 1 if i % 2 else -1, "session_id": "doors-flood"})
            statuses.append(res.status_code)
            if res.status_code == 429:
                break
        assert statuses[-1] == 429, statuses
        assert set(statuses[:-1]) == {202}
        assert 1 <= int(res.headers["retry-after"]) <= 60
        assert res.json()["error"]["retry_after_s"] == int(res.headers["retry-after"])


def test_a_flood_of_erasures_for_one_session_gets_429(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        statuses = [client.delete("/api/feedback/sessions/doors-erase-flood").status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]  # the default is 10 erasures per session per hour


def test_a_spent_daily_budget_gets_503_without_a_provider_call(tmp_path: Path) -> None:
    from tests.conftest import start_stack

    with FakeOpenAIServer() as fake:
        fake.answer("RSI is neutral.", prompt_tokens=1000, completion_tokens=500)  # $0.00045 at gpt-4o-mini prices
        stack = start_stack(
            tmp_path / "system",
            OPENAI_API_KEY="sk-test",
            OPENAI_BASE_URL=fake.openai_base_url,
            ROUTER_DAILY_BUDGET_USD="0.0004",
            OPTIMIZER_AUTO_EXPERIMENT="false",
        )
        try:
            with httpx.Client(base_url=stack.url, timeout=30) as client:
                first = _explain(client, "budget-1")
                assert first["model"] == "openai/gpt-4o-mini" and first["cost_usd"] > 0.0004
                calls = len(fake.requests)
                res = client.post("/api/explanations", json={**EXPLAIN, "session_id": "budget-2"})
                assert res.status_code == 503, res.text
                assert "daily provider budget" in res.json()["error"]["message"]
                assert int(res.headers["retry-after"]) >= 1
                assert len(fake.requests) == calls
        finally:
            stack.stop()
