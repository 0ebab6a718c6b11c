"""The whole system over HTTP, as `make run` starts it: a real redis-server, the gateway, one Celery worker
per service, beat, and one SQLite file per service."""

from __future__ import annotations

import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import httpx
import pytest

from gateway.run import Stack
from tests.support import wait_for

pytestmark = pytest.mark.slow

EXPLAIN = {
    "ticker": "AAPL",
    "signal": "BUY",
    "context": {"rsi": 28.5, "macd": "bullish crossover", "volume_ratio": 1.8},
}


def _explain(client: httpx.Client, session: str, **over: object) -> dict:
    res = client.post("/api/explanations", json={**EXPLAIN, "session_id": session, **over})
    assert res.status_code == 201, res.text
    return res.json()


def _stats(client: httpx.Client, headers: dict[str, str]) -> dict:
    res = client.get("/api/admin/llm-learning", headers=headers)
    assert res.status_code == 200, res.text
    return res.json()


def test_explanation_then_feedback_moves_the_stats(stack: Stack, admin_headers: dict[str, str]) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        before = _stats(client, admin_headers)["totals"]
        up = _explain(client, "loop-s1")
        assert set(up) >= {
            "explanation_id",
            "text",
            "prompt_version",
            "model",
            "experiment_id",
            "latency_ms",
            "cost_usd",
        }
        assert "offline" in up["model"] and up["text"]
        down = _explain(client, "loop-s2", ticker="TSLA", signal="SELL")
        fetched = client.get(f"/api/explanations/{up['explanation_id']}")
        assert fetched.status_code == 200 and fetched.json()["text"] == up["text"]

        def votes_accepted() -> bool:
            # The feedback service learns of new explanations from the event; until then it asks the router.
            r1 = client.post(
                f"/api/feedback/{up['explanation_id']}", json={"rating": 1, "stars": 5, "session_id": "loop-s1"}
            )
            r2 = client.post(
                f"/api/feedback/{down['explanation_id']}", json={"rating": -1, "stars": 2, "session_id": "loop-s2"}
            )
            assert r1.status_code == 202 and r2.status_code == 202, (r1.text, r2.text)
            return True

        votes_accepted()
        totals = wait_for(
            lambda: (t := _stats(client, admin_headers)["totals"])["votes"] >= before["votes"] + 2 and t,
            timeout_s=30,
            what="two votes in the stats",
        )
        assert totals["explanations"] >= before["explanations"] + 2
        assert totals["positives"] == before["positives"] + 1
        per_version = _stats(client, admin_headers)["per_prompt_version"]
        assert any(row["prompt_version"] == up["prompt_version"] and row["votes"] >= 2 for row in per_version)


def test_second_vote_replaces_the_first_in_the_stats(stack: Stack, admin_headers: dict[str, str]) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        exp = _explain(client, "replace-s1", ticker="NVDA")
        base = _stats(client, admin_headers)["totals"]
        client.post(f"/api/feedback/{exp['explanation_id']}", json={"rating": -1, "session_id": "replace-s1"})
        wait_for(lambda: _stats(client, admin_headers)["totals"]["votes"] == base["votes"] + 1, what="first vote")
        client.post(f"/api/feedback/{exp['explanation_id']}", json={"rating": 1, "session_id": "replace-s1"})
        wait_for(
            lambda: _stats(client, admin_headers)["totals"]["positives"] == base["positives"] + 1,
            what="the replacing thumbs-up",
        )
        assert _stats(client, admin_headers)["totals"]["votes"] == base["votes"] + 1


def test_feedback_on_an_id_never_issued_is_refused(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        res = client.post(f"/api/feedback/{uuid.uuid4()}", json={"rating": 1, "session_id": "s"})
        assert res.status_code == 404 and "never issued" in res.json()["error"]["message"]


BAD_EXPLANATIONS = [
    {"signal": "BUY", "context": {}, "session_id": "s"},
    {"ticker": "AAPL", "signal": "MAYBE", "context": {}, "session_id": "s"},
    {"ticker": "AAPL", "signal": "BUY", "context": "rsi=30", "session_id": "s"},
    {"ticker": "AAPL", "signal": "BUY", "context": {}},
    {"ticker": 42, "signal": "BUY", "context": {}, "session_id": "s"},
]


@pytest.mark.parametrize("body", BAD_EXPLANATIONS)
def test_bad_explanation_requests_get_a_clear_4xx(stack: Stack, body: dict) -> None:
    res = httpx.post(f"{stack.url}/api/explanations", json=body, timeout=10)
    assert 400 <= res.status_code < 500, res.text
    assert res.json()["error"]["message"]


def test_malformed_and_unknown_paths_and_tokens_get_json_errors(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        assert client.get("/api/explanations/not-a-uuid").status_code == 422
        assert client.get(f"/api/explanations/{uuid.uuid4()}").status_code == 404
        assert (
            client.post(
                "/api/explanations", content=b"{not json", headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
        for headers in ({}, {"Authorization": "Bearer nope"}):
            res = client.get("/api/admin/llm-learning", headers=headers)
            assert res.status_code == 401 and "totals" not in res.text


def test_every_service_answers_health_and_metrics(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        health = client.get("/healthz").json()
        assert health["status"] == "ok"
        assert set(health["services"]) == {"router", "feedback", "optimizer", "finetune", "dashboard"}
        for name in health["services"]:
            metrics = client.get(f"/services/{name}/metrics")
            assert metrics.status_code == 200 and "http_requests_total" in metrics.text


def test_each_service_keeps_its_data_in_its_own_store(stack: Stack) -> None:
    files = sorted(p.name for p in stack.data_dir.glob("*.db"))
    assert files == ["dashboard.db", "feedback.db", "finetune.db", "optimizer.db", "router.db"]
    with sqlite3.connect(stack.data_dir / "feedback.db") as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    assert "feedback" in tables and "prompts" not in tables and "experiments" not in tables


def test_killed_feedback_worker_loses_no_acknowledged_vote(tmp_path, admin_headers: dict[str, str]) -> None:
    """SIGKILL the worker while votes are queued and while it is storing them; every vote that got a 202
    is stored exactly once after restarts."""
    from tests.conftest import start_stack

    # Small batches (TASK_BATCH_SIZE): the worker stores votes in many transactions, so the kills below land
    # between batches and inside them (tests/integration/test_batches.py kills one inside its transaction).
    stack = start_stack(tmp_path / "system", TASK_BATCH_SIZE="10")
    try:
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            n = 300

            def explain(i: int) -> str:  # one explanation per session: only that session's vote counts
                with httpx.Client(base_url=stack.url, timeout=10) as c:
                    return _explain(c, f"durable-{i}")["explanation_id"]

            with ThreadPoolExecutor(8) as pool:
                served = list(pool.map(explain, range(n)))
            wait_for(
                lambda: (
                    sqlite3.connect(stack.data_dir / "feedback.db")
                    .execute("select count(*) from explanations")
                    .fetchone()[0]
                    == n
                ),
                what="the feedback service to learn of the explanations",
            )
            stack.kill("worker-feedback")  # votes pile up on the queue with no worker

            def vote(i: int) -> int:
                with httpx.Client(base_url=stack.url, timeout=10) as c:
                    r = c.post(
                        f"/api/feedback/{served[i]}", json={"rating": 1 if i % 4 else -1, "session_id": f"durable-{i}"}
                    )
                    return r.status_code

            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(vote, range(n)))
            assert statuses.count(202) == n

            def stored() -> int:
                with sqlite3.connect(stack.data_dir / "feedback.db") as conn:
                    return int(conn.execute("select count(*) from feedback").fetchone()[0])

            # Kill the worker again and again while it stores: each kill lands on a message it has taken. (If one
            # lands between kombu's BRPOP and its unacked bookkeeping, only the intake journal brings it back.)
            for kill in range(4):
                stack.start_process("worker-feedback")
                floor = stored()

                def progressed(f: int = floor) -> bool:
                    return stored() > f + 15

                wait_for(
                    progressed,
                    timeout_s=30,
                    interval_s=0.01,
                    what=f"progress before kill {kill + 1}",
                )
                stack.kill("worker-feedback")
            assert stored() < n
            stack.start_process("worker-feedback")
            wait_for(lambda: stored() >= n, timeout_s=90, interval_s=0.2, what=f"all {n} acknowledged votes stored")
            assert stored() == n, f"{stored()} of {n} acknowledged votes stored after the restarts"
            with sqlite3.connect(stack.data_dir / "feedback.db") as conn:
                sessions = conn.execute("select count(distinct session_key) from feedback").fetchone()[0]
            assert sessions == n
            totals = wait_for(
                lambda: (t := _stats(client, admin_headers)["totals"])["votes"] == n and t, timeout_s=60, what="stats"
            )
            assert totals["positives"] == n - len(range(0, n, 4))
            import redis

            journal = redis.Redis.from_url(stack.env["REDIS_URL"])
            wait_for(lambda: journal.hlen("journal:feedback") == 0, timeout_s=30, what="the intake journal to empty")
            journal.close()
    finally:
        stack.stop()


def test_with_redis_url_set_the_system_uses_that_redis(tmp_path, redis_server, admin_headers: dict[str, str]) -> None:
    import redis

    from tests.conftest import start_stack

    client_redis = redis.Redis.from_url(redis_server.url)
    client_redis.flushdb()
    stack = start_stack(tmp_path / "system", REDIS_URL=redis_server.url)
    try:
        assert stack.redis is None  # no private redis-server was started
        assert not (stack.data_dir / "redis").exists()
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            exp = _explain(client, "external-redis")
            assert (
                client.post(
                    f"/api/feedback/{exp['explanation_id']}", json={"rating": 1, "session_id": "external-redis"}
                ).status_code
                == 202
            )
            wait_for(
                lambda: _stats(client, admin_headers)["totals"]["votes"] == 1,
                what="the vote through the external Redis",
            )
        assert any(k.startswith(b"_kombu.binding.") for k in cast("list[bytes]", client_redis.keys("_kombu.binding.*")))
    finally:
        stack.stop()
        client_redis.close()
