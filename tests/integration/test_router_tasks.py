"""The router's Celery tasks in a real worker on a real Redis: events published on the bus change what the
API serves; a redelivered event is applied once."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer, free_port
from services.router import handlers
from services.router.config import RouterSettings
from services.router.main import create_app
from services.router.store import Store
from shared.bus import CeleryBus, declare_topology, make_celery
from shared.contracts import (
    AllocationChanged,
    ArmSpec,
    ChampionChanged,
    ExperimentConcluded,
    ExperimentStarted,
    ModelRegistered,
    PromptTemplate,
)
from tests.support import app_state, celery_worker, wait_for

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = "offline/template-v1"
V2 = PromptTemplate(name="explain_signal", version="v2.0", template="Be brief. {ticker} {signal}\n{indicators}")
V3 = PromptTemplate(
    name="explain_signal", version="v3.0", template="Use bullet points. {ticker} {signal}\n{indicators}"
)
BODY = {"ticker": "MSFT", "signal": "SELL", "context": {"rsi": 75}, "session_id": "anon-1"}

pytestmark = pytest.mark.slow  # starts a Celery worker (several seconds on a busy machine)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> dict[str, str]:
    url = redis_server.url.rsplit("/", 1)[0] + "/10"
    redis.Redis.from_url(url).flushdb()
    return {
        "REDIS_URL": url,
        "DATA_DIR": str(tmp_path_factory.mktemp("router-worker")),
        "ADMIN_TOKEN": "test-admin-token",
        "SESSION_HASH_KEY": "test-session-key",
        "OPENAI_API_KEY": "",
        "GROQ_API_KEY": "",
    }


@pytest.fixture(scope="module")
def settings(env: dict[str, str]) -> RouterSettings:
    return RouterSettings(
        redis_url=env["REDIS_URL"],
        data_dir=Path(env["DATA_DIR"]),
        admin_token=SecretStr(env["ADMIN_TOKEN"]),
        session_hash_key=SecretStr(env["SESSION_HASH_KEY"]),
        openai_api_key=None,
        groq_api_key=None,
    )


@pytest.fixture(scope="module")
def worker(env: dict[str, str], settings: RouterSettings) -> Iterator[subprocess.Popen]:
    declare_topology(make_celery("router-test", settings))
    with celery_worker(
        "router", {**os.environ, **env, "PYTHONPATH": str(ROOT)}, Path(env["DATA_DIR"]) / "worker.log", loglevel="INFO"
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def bus(settings: RouterSettings) -> CeleryBus:
    return CeleryBus(make_celery("router-test", settings))


def state(settings: RouterSettings) -> dict[str, Any]:
    store = Store(settings.db_url)
    try:
        return handlers.routing_state(store.uow())
    finally:
        store.dispose()


def test_events_on_the_bus_change_what_the_api_serves(
    worker: subprocess.Popen, bus: CeleryBus, settings: RouterSettings
) -> None:
    champion = ChampionChanged(prompt=V2, model=OFFLINE, previous_version="v1.0", reason="promoted")
    bus.publish(champion)
    bus.publish(champion)  # a redelivery: applied once
    wait_for(
        lambda: (state(settings)["champion"] or {}).get("prompt_version") == "v2.0",
        timeout_s=60,
        what="the worker to apply ChampionChanged",
    )
    with TestClient(create_app(settings)) as c:
        served = c.post("/api/explanations", json=BODY).json()
    assert served["prompt_version"] == "v2.0" and served["experiment_id"] is None

    bus.publish(
        ExperimentStarted(
            experiment_id="exp-42",
            prompt_name="explain_signal",
            arms=[
                ArmSpec(arm_id="control", prompt=V2, model=OFFLINE, weight=0.5, is_control=True),
                ArmSpec(arm_id="bullets", prompt=V3, model=OFFLINE, weight=0.5),
            ],
        )
    )
    bus.publish(AllocationChanged(experiment_id="exp-42", weights={"control": 0.0, "bullets": 1.0}))
    bus.publish(ModelRegistered(model_id="ft-1", model="local/ft-1", base_model="tiny", serving_base_url="http://x"))
    wait_for(lambda: state(settings)["models"], timeout_s=30, what="all four events to be applied")
    current = state(settings)
    assert [a["share"] for a in current["experiment"]["arms"]] == [0.0, 1.0]
    with TestClient(create_app(settings)) as c:
        served = c.post("/api/explanations", json=BODY).json()
        assert (served["experiment_id"], served["arm_id"], served["prompt_version"]) == ("exp-42", "bullets", "v3.0")
        assert served["text"].startswith("- ")

        bus.publish(ExperimentConcluded(experiment_id="exp-42", decision="promote", winner_arm_id="bullets"))
        wait_for(lambda: state(settings)["experiment"] is None, timeout_s=30, what="ExperimentConcluded")
        assert c.post("/api/explanations", json=BODY).json()["experiment_id"] is None
    assert worker.poll() is None


def test_relay_outbox_task_publishes_what_a_broker_outage_left_behind(
    worker: subprocess.Popen, settings: RouterSettings, env: dict[str, str]
) -> None:
    dead = RouterSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=Path(env["DATA_DIR"]))
    with TestClient(create_app(settings)) as c:
        working_bus = app_state(c).bus
        app_state(c).bus = CeleryBus(make_celery("router", dead))
        try:
            created = c.post("/api/explanations", json=BODY).json()
        finally:
            app_state(c).bus = working_bus
    r = redis.Redis.from_url(env["REDIS_URL"])
    r.delete("dashboard")
    make_celery("router-test", settings).send_task("router.relay_outbox", queue="router")

    def published() -> bool:
        return any(_decoded(raw, created) for raw in r.lrange("dashboard", 0, -1))

    wait_for(published, timeout_s=30, what="router.relay_outbox to publish the stranded event")


def _decoded(raw: bytes | str, created: dict[str, Any]) -> bool:
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return body[1]["payload"]["explanation_id"] == created["explanation_id"]
