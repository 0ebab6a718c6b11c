"""The optimizer's HTTP API through a real HTTP client: contract shapes, admin protection, bad input -> 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import render_with_traits
from services.optimizer.main import create_app
from shared.prompts import SEED_TEMPLATE

TOKEN = "api-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "offline/template-v1"
BULLETS = SEED_TEMPLATE.replace(
    "Explain in 3-4 sentences why the indicators support a {signal} signal for {ticker}. "
    "Mention the most important indicator first.",
    "Give three bullet points, strongest indicator first, on why {ticker} is a {signal} right now.",
)


@pytest.fixture
def client(tmp_path: Path, redis_server: RedisServer) -> Iterator[TestClient]:
    settings = OptimizerSettings(
        redis_url=redis_server.url.rsplit("/", 1)[0] + "/8",  # own database: our events reach no other test
        admin_token=SecretStr(TOKEN),
        data_dir=tmp_path,
        generation_min_interval_s=3600,
        openai_api_key=None,
        groq_api_key=None,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def add_bullets(client: TestClient) -> str:
    r = client.post(
        "/api/prompts/explain_signal/versions", json={"template": BULLETS, "reason": "bullets"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    return r.json()["version"]


def body(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "prompt_name": "explain_signal",
        "arms": [
            {"prompt_version": "v1.0", "model": MODEL, "weight": 0.5, "is_control": True},
            {"prompt_version": "v1.1", "model": MODEL, "weight": 0.5},
        ],
        "min_duration_s": 60,
        "min_feedback_per_arm": 50,
    }
    return base | kw


def error_of(r: Any) -> str:
    return r.json()["error"]["message"]


def test_registry_starts_with_the_seed_champion(client: TestClient) -> None:
    r = client.get("/api/prompts")
    assert r.status_code == 200
    (prompt,) = r.json()["prompts"]
    assert prompt["name"] == "explain_signal"
    assert prompt["champion"]["version"] == "v1.0" and prompt["champion"]["model"] == MODEL
    assert prompt["versions"][0]["template"] == SEED_TEMPLATE


def test_experiment_is_created_and_analysed(client: TestClient) -> None:
    add_bullets(client)
    r = client.post("/api/experiments", json=body(), headers=ADMIN)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "running" and [a["arm_id"] for a in created["arms"]] == ["control", "t1"]
    r = client.get(f"/api/experiments/{created['experiment_id']}")
    assert r.status_code == 200
    view = r.json()
    assert view["config"]["min_duration_s"] == 60 and view["config"]["min_feedback_per_arm"] == 50
    assert view["config"]["futility_alpha"] == 0.2  # the service's default
    arm = view["analysis"]["arms"][1]
    for key in ("n", "positives", "rate", "rate_ci", "lift", "p_value_sequential", "prob_beat_control"):
        assert key in arm
    assert view["analysis"]["srm"] == {"p_value": None, "flagged": False, "unit": "sessions", "p_value_fixed": None}
    assert view["decision"]["status"] == "collecting" and "minimum duration" in view["decision"]["reason"]
    listed = client.get("/api/experiments").json()["experiments"]
    assert [e["experiment_id"] for e in listed] == [created["experiment_id"]]


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"arms": [{"prompt_version": "v1.0", "model": MODEL, "weight": 0.7, "is_control": True},
                   {"prompt_version": "v1.1", "model": MODEL, "weight": 0.7}]}, 422, "weights must sum to 1"),
        ({"arms": [{"prompt_version": "v1.0", "model": MODEL, "weight": 1.0, "is_control": True}]}, 422, "at least two arms"),
        ({"arms": [{"prompt_version": "v1.0", "model": MODEL, "is_control": True},
                   {"prompt_version": "v3.7", "model": MODEL}]}, 422, "unknown prompt version v3.7"),
        ({"arms": [{"prompt_version": "v1.0", "model": MODEL, "is_control": True},
                   {"prompt_version": "v1.1", "model": MODEL, "is_control": True}]}, 422, "exactly one arm must be the control"),
        ({"arms": [{"prompt_version": "v1.0", "model": MODEL, "is_control": True},
                   {"prompt_version": "v1.0", "model": MODEL}]}, 422, "duplicate arm"),
        ({"arms": [{"prompt_version": "v1.0", "model": MODEL, "is_control": True},
                   {"prompt_version": "v1.1", "model": "gpt-9"}]}, 422, "'<provider>/<name>'"),
        ({"min_duration_s": -5}, 422, "min_duration_s"),
        ({"min_feedback_per_arm": 0}, 422, "min_feedback_per_arm"),
        ({"allocation": "random"}, 422, "allocation"),
        ({"metric": "clicks"}, 422, "metric"),
        ({"alpha": 2}, 422, "alpha"),
        ({"futility_alpha": 1}, 422, "futility_alpha"),
        ({"futility_alpha": 0}, 422, "futility_alpha"),
        ({"surprise": 1}, 422, "surprise"),
        ({"prompt_name": "nope"}, 404, "unknown prompt"),
    ],
)  # fmt: skip
def test_bad_experiment_bodies_get_a_clear_4xx(client: TestClient, change: dict, status: int, message: str) -> None:
    add_bullets(client)
    r = client.post("/api/experiments", json=body(**change), headers=ADMIN)
    assert r.status_code == status, r.text
    assert message in error_of(r)


@pytest.mark.parametrize(
    ("fragment", "field"),
    [
        (b'"min_feedback_per_arm": 100000000000000000000000000000', "min_feedback_per_arm"),
        (b'"max_feedback_per_arm": 100000000000000000000000000000', "max_feedback_per_arm"),
        (b'"min_duration_s": 1e300', "min_duration_s"),
        (b'"min_duration_s": 1e999', "min_duration_s"),
        (b'"max_cost_ratio": Infinity', "max_cost_ratio"),
        (b'"max_latency_ratio": NaN', "max_latency_ratio"),
        (b'"alpha": NaN', "alpha"),
        (b'"futility_alpha": NaN', "futility_alpha"),
    ],
)
def test_huge_or_non_finite_experiment_numbers_are_422_and_start_nothing(
    client: TestClient, fragment: bytes, field: str
) -> None:
    add_bullets(client)
    raw = json.dumps(body()).encode()[:-1] + b", " + fragment + b"}"
    r = client.post("/api/experiments", content=raw, headers=ADMIN | {"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in error_of(r)
    assert client.get("/api/experiments").json()["experiments"] == []


def test_an_experiment_keeps_the_futility_level_it_was_created_with(client: TestClient) -> None:
    add_bullets(client)
    r = client.post("/api/experiments", json=body(futility_alpha=0.05), headers=ADMIN)
    assert r.status_code == 201, r.text
    view = client.get(f"/api/experiments/{r.json()['experiment_id']}").json()
    assert view["config"]["futility_alpha"] == 0.05


def test_malformed_json_is_a_422_not_a_500(client: TestClient) -> None:
    r = client.post("/api/experiments", content=b"{not json", headers=ADMIN | {"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in error_of(r)


def test_second_running_experiment_for_a_prompt_is_a_conflict(client: TestClient) -> None:
    add_bullets(client)
    assert client.post("/api/experiments", json=body(), headers=ADMIN).status_code == 201
    r = client.post("/api/experiments", json=body(), headers=ADMIN)
    assert r.status_code == 409 and "already running" in error_of(r)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/api/experiments"),
        ("post", "/api/experiments/exp-x/promote"),
        ("post", "/api/experiments/exp-x/stop"),
        ("post", "/api/experiments/exp-x/rollback"),
        ("post", "/api/experiments/decisions"),
        ("post", "/api/prompts/explain_signal/variants"),
        ("post", "/api/prompts/explain_signal/versions"),
        ("post", "/api/prompts/explain_signal/rollback"),
    ],
)
def test_admin_routes_refuse_without_the_token(client: TestClient, method: str, path: str) -> None:
    assert getattr(client, method)(path, json={}).status_code == 401
    assert getattr(client, method)(path, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_unknown_experiment_is_404(client: TestClient) -> None:
    assert client.get("/api/experiments/exp-missing").status_code == 404
    assert client.post("/api/experiments/exp-missing/stop", headers=ADMIN).status_code == 404


def test_promote_without_winner_is_409_and_with_an_arm_promotes(client: TestClient) -> None:
    v = add_bullets(client)
    exp = client.post("/api/experiments", json=body(), headers=ADMIN).json()["experiment_id"]
    r = client.post(f"/api/experiments/{exp}/promote", headers=ADMIN)
    assert r.status_code == 409 and "no winner" in error_of(r)
    r = client.post(f"/api/experiments/{exp}/promote", json={"arm_id": "t9"}, headers=ADMIN)
    assert r.status_code == 422 and "no arm" in error_of(r)
    r = client.post(f"/api/experiments/{exp}/promote", json={"arm_id": "t1"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["champion"]["version"] == v
    assert client.get("/api/prompts/explain_signal").json()["champion"]["version"] == v
    r = client.post(f"/api/experiments/{exp}/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["champion"]["version"] == "v1.0"
    assert client.post(f"/api/experiments/{exp}/rollback", headers=ADMIN).status_code == 409
    assert client.post(f"/api/experiments/{exp}/stop", headers=ADMIN).status_code == 409


def test_stop_then_listing_by_status(client: TestClient) -> None:
    add_bullets(client)
    exp = client.post("/api/experiments", json=body(), headers=ADMIN).json()["experiment_id"]
    r = client.post(f"/api/experiments/{exp}/stop", json={"reason": "wrong config"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "stopped"
    assert client.get("/api/experiments", params={"status": "running"}).json()["experiments"] == []
    assert len(client.get("/api/experiments", params={"status": "stopped"}).json()["experiments"]) == 1
    assert client.get("/api/experiments", params={"status": "bogus"}).status_code == 422


def test_variants_are_generated_then_rate_limited_with_retry_after(client: TestClient) -> None:
    r = client.post("/api/prompts/explain_signal/variants", json={"count": 2}, headers=ADMIN)
    assert r.status_code == 201, r.text
    result = r.json()
    assert result["source"] == "offline" and [v["version"] for v in result["accepted"]] == ["v1.1", "v1.2"]
    assert all(v["parent_version"] == "v1.0" and v["status"] == "candidate" for v in result["accepted"])
    r = client.post("/api/prompts/explain_signal/variants", headers=ADMIN)
    assert r.status_code == 429
    assert 3500 < int(r.headers["Retry-After"]) <= 3600
    assert "allowed in" in error_of(r)
    assert client.post("/api/prompts/nope/variants", headers=ADMIN).status_code == 404
    assert client.post("/api/prompts/explain_signal/variants", json={"count": 0}, headers=ADMIN).status_code == 422


def test_prompt_shows_its_search_rounds_and_a_spent_search_is_a_409(client: TestClient) -> None:
    search = client.get("/api/prompts/explain_signal").json()["search"]
    assert search["exhausted"] is False and search["remaining"] == 15 and search["rounds"] == []
    r = client.post("/api/prompts/explain_signal/variants", json={"count": 3}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["note"].startswith("15 combinations left")
    arms = [{"prompt_version": "v1.0", "model": MODEL, "is_control": True}] + [
        {"prompt_version": v, "model": MODEL} for v in ("v1.1", "v1.2", "v1.3")
    ]
    assert client.post("/api/experiments", json=body(arms=arms), headers=ADMIN).status_code == 201
    search = client.get("/api/prompts/explain_signal").json()["search"]
    (round_,) = search["rounds"]
    assert round_["control"]["version"] == "v1.0" and round_["status"] == "running"
    assert [t["version"] for t in round_["tried"]] == ["v1.1", "v1.2", "v1.3"]
    assert round_["tried"][0]["why"] == "offline: add bullet points (not tried yet)"
    assert round_["learned"].startswith("collecting") and search["remaining"] == 12

    traits = ("bullets", "risk", "concise", "plain")
    for mask in range(8, 16):  # every combination with plain language, added by hand
        chosen = {t for i, t in enumerate(traits) if mask >> i & 1}
        template = render_with_traits(SEED_TEMPLATE, chosen)
        r = client.post("/api/prompts/explain_signal/versions", json={"template": template}, headers=ADMIN)
        assert r.status_code == 201, r.text
    for chosen in ({"bullets", "risk"}, {"bullets", "concise"}, {"risk", "concise"}, {"bullets", "risk", "concise"}):
        template = render_with_traits(SEED_TEMPLATE, chosen)
        assert (
            client.post("/api/prompts/explain_signal/versions", json={"template": template}, headers=ADMIN).status_code
            == 201
        )
    search = client.get("/api/prompts/explain_signal").json()["search"]
    assert (
        search["exhausted"] is True and search["remaining"] == 0 and "every combination" in search["exhausted_reason"]
    )
    r = client.post("/api/prompts/explain_signal/variants", headers=ADMIN)
    assert r.status_code == 409 and "exhausted" in error_of(r)


@pytest.mark.parametrize(
    ("template", "status", "message"),
    [
        ("Explain {ticker} {signal}.", 422, "drops required placeholders: indicators"),
        ("{ticker} {signal} {indicators} {secret}", 422, "unknown placeholders: secret"),
        ("{ticker {signal} {indicators}", 422, "not a valid format string"),
        ("Explain {ticker:d} as {signal}: {indicators}", 422, "without conversion or format: {ticker:d}"),
        ("Explain {ticker!x} as {signal}: {indicators}", 422, "without conversion or format: {ticker!x}"),
        ("Explain {ticker:>999999999} as {signal}: {indicators}", 422, "without conversion or format"),
        (SEED_TEMPLATE, 409, "near-duplicate"),
        ("{ticker}{signal}{indicators}", 422, "under the minimum"),
    ],
)
def test_bad_hand_written_versions_are_refused(client: TestClient, template: str, status: int, message: str) -> None:
    r = client.post("/api/prompts/explain_signal/versions", json={"template": template}, headers=ADMIN)
    assert r.status_code == status, r.text
    assert message in error_of(r)


def test_archiving_the_champion_is_refused(client: TestClient) -> None:
    v = add_bullets(client)
    r = client.post("/api/prompts/explain_signal/versions/v1.0/archive", headers=ADMIN)
    assert r.status_code == 409
    r = client.post(f"/api/prompts/explain_signal/versions/{v}/archive", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "archived"


def test_prompt_rollback_with_no_history_is_409(client: TestClient) -> None:
    r = client.post("/api/prompts/explain_signal/rollback", headers=ADMIN)
    assert r.status_code == 409 and "no earlier champion" in error_of(r)


def test_decisions_can_be_run_on_demand(client: TestClient) -> None:
    add_bullets(client)
    exp = client.post("/api/experiments", json=body(), headers=ADMIN).json()["experiment_id"]
    r = client.post("/api/experiments/decisions", headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["results"][0]["experiment_id"] == exp and r.json()["results"][0]["decision"] == "collecting"
