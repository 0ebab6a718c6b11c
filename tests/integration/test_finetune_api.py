"""The finetune API over HTTP, on a real SQLite file and a real Redis: exports, job requests (what is queued,
and what is refused with its reason before anything is queued), cancellation, the registry and the mounted
OpenAI-compatible endpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer
from services.finetune import domain, jobs
from services.finetune.config import FinetuneSettings
from services.finetune.main import create_app
from services.finetune.store import Store, outbox
from shared.serving import served_name, serving_api_key
from tests.unit.test_finetune_handlers import fake_base_model, seed

ADMIN = {"Authorization": "Bearer admin-secret"}
SERVING = {"Authorization": f"Bearer {serving_api_key(None, 'admin-secret')}"}


def _settings(tmp_path: Path, redis_server: RedisServer, **extra: Any) -> FinetuneSettings:
    return FinetuneSettings(
        redis_url=redis_server.url,
        admin_token=SecretStr("admin-secret"),
        session_hash_key=SecretStr("k"),
        data_dir=tmp_path,
        gateway_url="http://gw.test",
        min_examples=20,
        base_model=fake_base_model(tmp_path / "base"),
        **extra,
    )


@pytest.fixture
def env(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[TestClient, redis.Redis, Store]]:
    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    app = create_app(_settings(tmp_path, redis_server))
    with TestClient(app) as client:
        yield client, r, app.state.store
    r.close()


def _queued_tasks(r: redis.Redis, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in r.lrange(queue, 0, -1)]


def test_admin_routes_refuse_requests_without_the_token(env) -> None:
    client, _, _ = env
    for method, path in [
        ("get", "/api/finetune/datasets/export"),
        ("post", "/api/finetune/jobs"),
        ("get", "/api/finetune/models"),
        ("post", "/api/finetune/jobs/x/cancel"),
    ]:
        res = getattr(client, method)(path, headers={"Authorization": "Bearer wrong"})
        assert res.status_code == 401 and "error" in res.json()


def test_export_streams_jsonl_with_an_export_id_that_records_its_feedback(env) -> None:
    client, _, store = env
    seed(store, 30, n_bad=10)
    res = client.get("/api/finetune/datasets/export?format=kto&split=train", headers=ADMIN)
    assert res.status_code == 200 and res.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in res.text.splitlines()]
    assert rows and all(set(r) == {"prompt", "completion", "label"} for r in rows)
    assert {r["label"] for r in rows} == {True, False}
    export = client.get(f"/api/finetune/exports/{res.headers['X-Export-Id']}", headers=ADMIN).json()
    assert export["rows"] == len(rows) == int(res.headers["X-Export-Rows"]) == len(export["feedback_ids"])
    heldout = client.get("/api/finetune/datasets/export?format=kto&split=heldout", headers=ADMIN)
    assert len(rows) + len(heldout.text.splitlines()) == 40
    summary = client.get("/api/finetune/datasets/summary", headers=ADMIN).json()
    assert summary["sft_train"] + summary["sft_heldout"] == 30 and summary["min_examples"] == 20


def test_export_with_an_unknown_format_is_a_clear_422(env) -> None:
    client, _, _ = env
    res = client.get("/api/finetune/datasets/export?format=ppo", headers=ADMIN)
    assert res.status_code == 422 and "format" in res.json()["error"]["message"]
    res = client.get("/api/finetune/datasets/export?split=test", headers=ADMIN)
    assert res.status_code == 422 and "split" in res.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"base_model": "/no/such/model"}, 422, "unknown base model"),
        ({"method": "ppo"}, 422, "method"),
        ({"method": "dpo"}, 409, "no DPO training rows"),
        ({"recipe": {"nope": 1}}, 422, "unknown recipe fields: nope"),
        ({"min_examples": -1}, 422, "min_examples"),
        ({"surprise": True}, 422, "surprise"),
        ({"min_examples": 1000}, 409, "too little data: "),
    ],
)
def test_bad_job_request_is_refused_with_its_reason_and_nothing_is_queued(
    env, body: dict, status: int, message: str
) -> None:
    client, r, store = env
    seed(store, 30)
    res = client.post("/api/finetune/jobs", json=body, headers=ADMIN)
    assert res.status_code == status, res.text
    assert message in res.json()["error"]["message"]
    assert _queued_tasks(r, "finetune") == []
    assert client.get("/api/finetune/jobs").json()["items"] == []


def test_job_request_on_no_data_is_409_empty_export(env) -> None:
    client, r, _ = env
    res = client.post("/api/finetune/jobs", json={"min_examples": 0}, headers=ADMIN)
    assert res.status_code == 409 and "empty export" in res.json()["error"]["message"]


def test_valid_job_is_202_and_queued_as_finetune_start_job(env) -> None:
    client, r, store = env
    seed(store, 30)
    res = client.post("/api/finetune/jobs", json={"method": "sft", "recipe": {"max_steps": 5}}, headers=ADMIN)
    assert res.status_code == 202, res.text
    job = res.json()
    assert job["state"] == "queued" and job["recipe"]["max_steps"] == 5
    [message] = _queued_tasks(r, "finetune")
    assert message["headers"]["task"] == "finetune.start_job"
    assert client.get(f"/api/finetune/jobs/{job['job_id']}").json()["state"] == "queued"
    assert [j["job_id"] for j in client.get("/api/finetune/jobs").json()["items"]] == [job["job_id"]]
    # queued progress goes to the dashboard through the outbox
    assert any(m["headers"]["task"] == "dashboard.on_finetune_progress" for m in _queued_tasks(r, "dashboard"))

    cancelled = client.post(f"/api/finetune/jobs/{job['job_id']}/cancel", headers=ADMIN)
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    again = client.post(f"/api/finetune/jobs/{job['job_id']}/cancel", headers=ADMIN)
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]


def test_unknown_job_is_a_json_404(env) -> None:
    client, _, _ = env
    res = client.get("/api/finetune/jobs/nope")
    assert res.status_code == 404 and res.json()["error"]["message"] == "job nope not found"
    assert client.post("/api/finetune/jobs/nope/cancel", headers=ADMIN).status_code == 404


def _register_fake_model(store: Store, tmp_path: Path) -> str:
    adapter = tmp_path / "adapters" / "ft-test"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    with store.uow() as uow:
        uow.repo.add_model(
            {
                "model_id": "ft-test",
                "name": domain.model_name("ft-test"),
                "job_id": "job-test",
                "method": "sft",
                "base_model": str(tmp_path / "base"),
                "adapter_path": str(adapter),
                "recipe": {},
                "train_export_id": "e1",
                "heldout_export_id": "e2",
                "metrics": {"eval_loss_best": 1.5},
                "status": "registered",
                "serving_base_url": "http://gw.test/api/finetune/v1",
                "cost_per_1k_tokens_usd": 0.0,
                "registered_at": datetime.now(UTC),
            }
        )
        uow.commit()
    return "local/ft-test"


def test_registry_and_mounted_models_list_show_registered_models(env, tmp_path: Path) -> None:
    client, _, store = env
    name = _register_fake_model(store, tmp_path)
    [model] = client.get("/api/finetune/models", headers=ADMIN).json()["items"]
    assert model["name"] == name and model["metrics"] == {"eval_loss_best": 1.5}
    assert client.get("/api/finetune/v1/models").status_code == 401  # the serving key is required
    listed = client.get("/api/finetune/v1/models", headers=SERVING).json()
    assert [m["id"] for m in listed["data"]] == [name]
    assert "adapters" not in json.dumps(listed)  # no paths


def test_the_model_server_refuses_an_anonymous_or_wrongly_keyed_call(env) -> None:
    client, _, _ = env
    body = {"model": "local/nope", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, ADMIN, {"Authorization": "Bearer wrong"}):
        res = client.post("/api/finetune/v1/chat/completions", json=body, headers=headers)
        assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"


def test_mounted_endpoint_answers_unknown_models_and_bad_bodies_in_openai_shape(env) -> None:
    client, _, _ = env
    res = client.post(
        "/api/finetune/v1/chat/completions", json={"model": "local/nope", "messages": []}, headers=SERVING
    )
    assert res.status_code == 404 and res.json()["error"]["code"] == "model_not_found"
    res = client.post(
        "/api/finetune/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json", **SERVING},
    )
    assert res.status_code == 400 and "error" in res.json()
    assert client.get("/api/finetune/v1/nothing", headers=SERVING).status_code == 404


def test_with_an_external_serving_url_the_mount_points_there(tmp_path: Path, redis_server: RedisServer) -> None:
    app = create_app(_settings(tmp_path, redis_server, serving_base_url="http://vllm.test:8001/v1"))
    with TestClient(app) as client:
        res = client.get("/api/finetune/v1/models", headers=SERVING)
        assert res.status_code == 404 and "http://vllm.test:8001/v1" in res.json()["error"]["message"]
        assert client.get("/healthz").json()["serving_base_url"] == "http://vllm.test:8001/v1"


def test_registered_adapter_is_loaded_on_an_external_openai_compatible_server(tmp_path: Path) -> None:
    """With FINETUNE_SERVING_BASE_URL set, a newly registered adapter is loaded there by name over HTTP
    (vLLM's runtime LoRA route; here the project's fallback server, which speaks the same route)."""
    from gateway.redis_server import free_port
    from services.finetune import handlers
    from services.finetune.serving import create_serving_app
    from shared.contracts import StartFineTune
    from shared.outbox import relay
    from tests.fakes.bus import FakeBus
    from tests.support import ServedApp
    from tests.unit.test_finetune_handlers import FakeTrainer

    base = fake_base_model(tmp_path / "base")
    serving = create_serving_app(base, {})
    with ServedApp(serving, free_port(), name="serving app", timeout_s=20) as served:
        url = f"{served.url}/v1"
        settings = FinetuneSettings(
            data_dir=tmp_path, admin_token=SecretStr("t"), min_examples=20, base_model=base, serving_base_url=url
        )
        store = Store(settings.db_url)
        seed(store, 30)
        job, cmd = handlers.create_job(StartFineTune(), store, settings)
        runner = jobs.JobRunner(
            store,
            settings,
            lambda: relay(store.factory, outbox, FakeBus()),
            FakeTrainer(),
            on_registered=lambda model: jobs.load_adapter_on_server(url, model),
        )
        assert runner.start(cmd) == "registered"
        name = served_name(domain.model_name(domain.model_id_for(job["job_id"])))
        assert name in serving.state.adapters
        with store.uow() as uow:
            assert uow.repo.list_models()[0]["serving_base_url"] == url
        store.dispose()


def test_erasures_are_listed_with_the_exports_that_had_used_them(env) -> None:
    from services.finetune import handlers
    from shared.contracts import FeedbackErased
    from tests.unit.test_finetune_handlers import T0, explanation_event, vote_event

    client, _, store = env
    seed(store, 30)
    export_id = client.get("/api/finetune/datasets/export?format=sft", headers=ADMIN).headers["X-Export-Id"]
    ev = explanation_event(0)
    vote = vote_event(ev.explanation_id, "session-0", 1, 5)
    erased = FeedbackErased(
        session_key="session-0", feedback_ids=[vote.feedback_id], explanation_ids=[ev.explanation_id], erased_at=T0
    )
    handlers.on_feedback_erased(erased, store.uow())
    [item] = client.get("/api/finetune/erasures", headers=ADMIN).json()["items"]
    in_train = (
        str(vote.feedback_id) in client.get(f"/api/finetune/exports/{export_id}", headers=ADMIN).json()["feedback_ids"]
    )
    assert item["feedback_ids"] == [str(vote.feedback_id)]
    assert item["export_ids"] == ([export_id] if in_train else [])
    assert client.get("/api/finetune/erasures").status_code == 401
