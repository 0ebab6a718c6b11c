"""The optimizer's Celery tasks in a real worker process on a real Redis: the feed, the decision round sent
the way beat sends it, and the events it publishes after the commit."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.redis_server import RedisServer
from services.optimizer import domain, experiments, registry, views
from services.optimizer.config import OptimizerSettings
from services.optimizer.store import Store
from shared.bus import make_celery
from shared.contracts import ExplanationCreated, FeedbackRecorded, ModelRegistered, utcnow
from shared.prompts import PROMPT_NAME, SEED_TEMPLATE
from shared.settings import ServiceSettings
from tests.support import celery_worker, wait_for

ROOT = Path(__file__).resolve().parents[2]
MODEL = "offline/template-v1"
pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path, redis_server: RedisServer) -> dict[str, str]:
    url = redis_server.url.rsplit("/", 1)[0] + "/9"  # own database: nothing else consumes these queues
    redis.Redis.from_url(url).flushdb()
    return {
        **os.environ,
        "REDIS_URL": url,
        "DATA_DIR": str(tmp_path),
        "ADMIN_TOKEN": "t",
        "SESSION_HASH_KEY": "k",
        "OPTIMIZER_MIN_DURATION_S": "0",
        "OPTIMIZER_MIN_FEEDBACK_PER_ARM": "20",
        "OPENAI_API_KEY": "",
        "GROQ_API_KEY": "",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen]:
    with celery_worker("optimizer", env, tmp_path / "worker.log") as proc:
        yield proc


def send(env: dict[str, str], task: str, payload: dict[str, Any] | None) -> None:
    app = make_celery("optimizer-test", ServiceSettings(redis_url=env["REDIS_URL"]))
    kwargs = {"payload": payload} if payload is not None else {}
    app.send_task(task, kwargs=kwargs, queue="optimizer")


def queued_tasks(env: dict[str, str], queue: str) -> list[str]:
    r = redis.Redis.from_url(env["REDIS_URL"])
    return [json.loads(raw)["headers"]["task"] for raw in r.lrange(queue, 0, -1)]


def traffic(experiment_id: str, arm_id: str, version: str, rating: int) -> tuple[dict, dict]:
    eid = uuid.uuid4()
    common: dict[str, Any] = {
        "prompt_name": PROMPT_NAME,
        "prompt_version": version,
        "model": MODEL,
        "experiment_id": experiment_id,
    }
    created = ExplanationCreated(
        explanation_id=eid, request_key="k", ticker="MSFT", signal="SELL", provider="offline", prompt_text="p",
        text="t", tokens_in=5, tokens_out=9, cost_usd=0.0, latency_ms=3.0, created_at=utcnow(), arm_id=arm_id,
        **common,
    )  # fmt: skip
    vote = FeedbackRecorded(
        feedback_id=uuid.uuid4(), explanation_id=eid, session_key="s", rating=rating, submitted_at=utcnow(),  # type: ignore[arg-type]
        signal="SELL", ticker="MSFT", arm_id=arm_id, **common,
    )  # fmt: skip
    return created.to_payload(), vote.to_payload()


def test_worker_counts_traffic_and_beat_decision_promotes_and_tells_the_router(
    env: dict[str, str], worker: subprocess.Popen, tmp_path: Path
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'optimizer.db'}")
    registry.ensure_seeded(store.uow(), MODEL)
    # the test sends every vote right after its explanation: no vote is on its way when the decision runs
    settings_for_test = OptimizerSettings(min_duration_s=0, min_feedback_per_arm=20, feedback_rate_grace_s=0)
    template = SEED_TEMPLATE + "\n\nAnswer as bullet points, one line per indicator, the strongest first."
    version = registry.add_version(PROMPT_NAME, template, store.uow(), settings_for_test)["version"]
    spec = domain.ExperimentSpec(
        prompt_name=PROMPT_NAME,
        arms=(domain.ArmIn("v1.0", MODEL, 0.5, True), domain.ArmIn(version, MODEL, 0.5)),
        **experiments.spec_defaults(settings_for_test),
    )
    exp = experiments.create_experiment(spec, store.uow())["experiment_id"]

    votes = []
    for i in range(60):  # control 50% up, treatment 95% up
        for arm_id, v, rating in (("control", "v1.0", 1 if i % 2 else -1), ("t1", version, 1 if i % 20 else -1)):
            created, vote = traffic(exp, arm_id, v, rating)
            send(env, "optimizer.on_explanation_created", created)
            send(env, "optimizer.on_feedback_recorded", vote)
            votes.append(vote)
    send(env, "optimizer.on_feedback_recorded", votes[0])  # a redelivery counts once

    def counted() -> bool:
        arms = views.experiment_view(exp, store.uow())["analysis"]["arms"]
        return [a["n"] for a in arms] == [60, 60] and [a["exposures"] for a in arms] == [60, 60]

    wait_for(counted, timeout_s=60, what="the worker to count 120 exposures and votes")
    send(env, "optimizer.run_decisions", None)  # as beat sends it: no payload
    wait_for(
        lambda: views.prompts_view(store.uow(), PROMPT_NAME)[0]["champion"]["version"] == version,
        timeout_s=30,
        what="the winner to become champion",
    )
    router_tasks = wait_for(
        lambda: (t := queued_tasks(env, "router")) and "router.on_champion_changed" in t and t, timeout_s=15
    )
    assert "router.on_experiment_concluded" in router_tasks
    assert views.experiment_view(exp, store.uow())["decision"]["status"] == "ship"

    send(
        env,
        "optimizer.on_model_registered",
        ModelRegistered(model_id="m1", model="local/ft-m1", base_model="b").to_payload(),
    )
    started = wait_for(
        lambda: [e for e in views.list_experiments(store.uow(), "running") if e["source"] == "finetune"],
        timeout_s=30,
        what="the fine-tuned model's experiment",
    )
    assert [a["model"] for a in started[0]["arms"]] == [MODEL, "local/ft-m1"]
    assert started[0]["arms"][0]["prompt_version"] == version
    store.dispose()
