"""The finetune service for real: a real Celery worker on a real Redis, the tiny model the project builds
itself, LoRA training on the CPU with one thread.

- training data arrives as events sent by task name;
- a job sent as a Celery task BY NAME from a process with no project code runs to `registered`, publishes
  FineTuneProgress and ModelRegistered, and the model is served by the mounted OpenAI-compatible endpoint;
- the CLI starts a KTO job through the queue and follows it to the end;
- a job whose worker is SIGKILLed mid-training ends `failed` ("worker lost", via the watchdog), registers
  nothing, leaves no adapter and is not delivered again.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer, free_port
from gateway.run import worker_command
from services.finetune import domain, handlers, jobs
from services.finetune.config import FinetuneSettings
from services.finetune.main import create_app
from services.finetune.store import Store
from shared.contracts import FeedbackErased
from tests.support import wait_for
from tests.unit.test_finetune_handlers import T0, explanation_event, vote_event

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "ft-admin"
FAST_RECIPE = {"max_steps": 6, "eval_every_steps": 3, "per_device_batch_size": 4, "learning_rate": 5e-3}


class Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        cmd = worker_command("finetune", loglevel="INFO")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Built once: a random tiny Llama with its own tokenizer and chat template (offline, seconds)."""
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    subprocess.run([sys.executable, "-m", "services.finetune.cli", "build-tiny-model", str(out)], cwd=ROOT, check=True)
    return str(out)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("finetune-data")
    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_server.url,
        "DATA_DIR": str(data_dir),
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "SESSION_HASH_KEY": "k",
        "GATEWAY_URL": f"http://127.0.0.1:{port}",
        "BROKER_VISIBILITY_TIMEOUT": "4",
        "FINETUNE_MIN_EXAMPLES": "20",
        "FINETUNE_HEARTBEAT_INTERVAL_S": "0.5",
        "FINETUNE_HEARTBEAT_TIMEOUT_S": "3",
        "FINETUNE_COST_PER_1K_TOKENS_USD": "0.2",
        "FINETUNE_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    settings = FinetuneSettings(
        redis_url=redis_server.url,
        data_dir=data_dir,
        admin_token=SecretStr(ADMIN_TOKEN),
        session_hash_key=SecretStr("k"),
        gateway_url=env["GATEWAY_URL"],
        min_examples=20,
        heartbeat_timeout_s=3,
    )
    store = Store(settings.db_url)
    worker = Worker(env, data_dir / "worker.log").start()
    client = Celery("test-client", broker=redis_server.url)

    # The finetune API on a real port (the CLI follows jobs over HTTP).
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, what="finetune API up")

    # Training data arrives as events, by task name, as the bus delivers them.
    for i in range(50):
        good = i < 40
        ev = explanation_event(i, good=good)
        vote = vote_event(ev.explanation_id, f"session-{i}", 1 if good else -1, 5 if good else 1)
        client.send_task("finetune.on_explanation_created", kwargs={"payload": ev.to_payload()}, queue="finetune")
        client.send_task("finetune.on_feedback_recorded", kwargs={"payload": vote.to_payload()}, queue="finetune")
    erased = FeedbackErased(
        session_key="session-0", feedback_ids=[vote_event(explanation_event(0).explanation_id, "session-0", 1, 5).feedback_id],
        explanation_ids=[explanation_event(0).explanation_id], erased_at=T0,
    )  # fmt: skip
    client.send_task("finetune.on_feedback_erased", kwargs={"payload": erased.to_payload()}, queue="finetune")

    def counts() -> dict[str, int] | None:
        with store.uow() as uow:
            c = uow.repo.counts()
        return c if c["explanations"] == 50 and c["votes"] == 49 and c["erased_sessions"] == 1 else None

    wait_for(counts, 60, 0.2, what="the worker to store the events")
    yield {
        "settings": settings, "store": store, "worker": worker, "redis": r, "client": client,
        "env": env, "data_dir": data_dir, "gateway": env["GATEWAY_URL"],
    }  # fmt: skip
    server.should_exit = True
    thread.join(timeout=10)
    worker.stop()
    client.close()
    store.dispose()
    r.close()


def _job(system: dict[str, Any], job_id: str) -> dict[str, Any] | None:
    with system["store"].uow() as uow:
        return uow.repo.job(job_id)


def _wait_state(system: dict[str, Any], job_id: str, states: tuple[str, ...], timeout_s: float = 120) -> dict:
    def check() -> dict | None:
        job = _job(system, job_id)
        return job if job and job["state"] in states else None

    try:
        return wait_for(check, timeout_s, 0.2, what=f"job {job_id} to reach {states}")
    except AssertionError:
        print(system["worker"].log.read_text()[-5000:])
        raise


def _queued_payloads(r: redis.Redis, queue: str, task: str) -> list[dict]:
    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):  # kombu pushes on the left: oldest last
        message = json.loads(raw)
        if message["headers"]["task"] == task:
            _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
            out.append(kwargs["payload"])
    return out


def test_events_by_name_fill_the_training_data_and_erasure_removes_that_session(system: dict[str, Any]) -> None:
    with system["store"].uow() as uow:
        counts = uow.repo.counts()
        assert uow.repo.erased_keys() == frozenset()  # no vote of an erased session is stored
    assert counts == {"explanations": 50, "votes": 49, "erased_sessions": 1}
    summary = handlers.data_summary(system["store"].uow(), handlers.rules_from(system["settings"]))
    assert summary["sft_train"] + summary["sft_heldout"] == 39
    assert summary["sft_train"] >= 20 and summary["sft_heldout"] >= 1


def test_job_sent_by_name_from_outside_the_project_is_trained_registered_and_served(
    system: dict[str, Any], tiny_model: str
) -> None:
    payload = {"job_id": "job-by-name", "base_model": tiny_model, "method": "sft", "recipe": FAST_RECIPE}
    code = (
        "import json, sys, celery\n"
        "app = celery.Celery(broker=sys.argv[1])\n"
        "app.send_task('finetune.start_job', kwargs={'payload': json.loads(sys.argv[2])}, queue='finetune')\n"
        "assert not any(m.split('.')[0] in ('services', 'shared', 'gateway') for m in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", code, system["settings"].redis_url, json.dumps(payload)],
        cwd="/", env=env, check=True, timeout=60,
    )  # fmt: skip
    job = _wait_state(system, "job-by-name", ("registered", "failed", "cancelled"))
    assert job["state"] == "registered", job["reason"]
    model_id = domain.model_id_for("job-by-name")
    assert job["model_id"] == model_id and job["train_export_id"] and job["heldout_export_id"]

    with system["store"].uow() as uow:
        [model] = [m for m in uow.repo.list_models() if m["model_id"] == model_id]
        train_export = uow.repo.export(model["train_export_id"])
    adapter = Path(model["adapter_path"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert model["base_model"] == tiny_model and model["recipe"]["max_steps"] == 6
    m = model["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"] and m["steps"] == 6
    assert "offline_base_margin" in m and "offline_tuned_margin" in m and m["offline_good_ll_gain"] > 0
    assert m["cost_per_explanation_usd"] == pytest.approx(0.2 * 60 / 1000)
    erased_feedback = str(vote_event(explanation_event(0).explanation_id, "session-0", 1, 5).feedback_id)
    assert erased_feedback not in train_export["feedback_ids"]

    # ModelRegistered and FineTuneProgress went to their subscribers' queues.
    def published() -> list[dict]:  # relayed from the outbox right after the commit
        found = _queued_payloads(system["redis"], "optimizer", "optimizer.on_model_registered")
        return [p for p in found if p["model_id"] == model_id]

    [registered] = wait_for(published, 10, what="ModelRegistered on the optimizer's queue")
    assert registered["model"] == f"local/{model_id}" and registered["base_model"] == tiny_model
    assert registered["serving_base_url"] == system["gateway"] + "/api/finetune/v1"
    assert registered["cost_per_1k_tokens_usd"] == 0.2 and registered["metrics"]["eval_loss_best"] > 0
    assert _queued_payloads(system["redis"], "router", "router.on_model_registered")
    states = [
        p["state"]
        for p in _queued_payloads(system["redis"], "dashboard", "dashboard.on_finetune_progress")
        if p["job_id"] == "job-by-name"
    ]
    assert states[0] == "exporting" and states[-1] == "registered" and "training" in states and "evaluating" in states

    # The mounted endpoint serves the registered adapter by its name (loaded on this first request).
    key = {"Authorization": f"Bearer {system['settings'].serving_key()}"}
    with TestClient(create_app(system["settings"])) as api:
        names = [d["id"] for d in api.get("/api/finetune/v1/models", headers=key).json()["data"]]
        assert f"local/{model_id}" in names
        res = api.post(
            "/api/finetune/v1/chat/completions",
            json={"model": f"local/{model_id}", "messages": [{"role": "user", "content": "Explain BUY for AAPL."}],
                  "max_tokens": 8, "temperature": 0},
            headers=key,
        )  # fmt: skip
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["model"] == f"local/{model_id}" and 0 < body["usage"]["completion_tokens"] <= 8
        assert isinstance(body["choices"][0]["message"]["content"], str)


def test_cli_starts_a_kto_job_through_the_queue_and_follows_it_to_registered(
    system: dict[str, Any], tiny_model: str
) -> None:
    cmd = [sys.executable, "-m", "services.finetune.cli", "start", "--base", tiny_model, "--method", "kto"]
    cmd += ["--recipe", json.dumps(FAST_RECIPE), "--job-id", "job-cli", "--follow", "--wait", "150"]
    done = subprocess.run(cmd, cwd=ROOT, env=system["env"], capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "job-cli" in done.stderr  # the progress bar
    final = json.loads(done.stdout.split("\n", 1)[1])
    assert final["state"] == "registered" and final["method"] == "kto"
    status = subprocess.run(
        [sys.executable, "-m", "services.finetune.cli", "status", "job-cli"], cwd=ROOT, env=system["env"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0 and json.loads(status.stdout)["model_id"] == domain.model_id_for("job-cli")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"job_id": "job-no-base", "base_model": "/no/such/model"}, "unknown base model: base model path"),
        ({"job_id": "job-too-few", "min_examples": 1000}, "too little data: "),
        ({"job_id": "job-bad-method", "method": "ppo"}, "invalid finetune.start_job payload"),
    ],
)
def test_bad_job_sent_by_name_fails_at_once_with_its_reason(
    system: dict[str, Any], tiny_model: str, payload: dict, reason: str
) -> None:
    system["client"].send_task(
        "finetune.start_job", kwargs={"payload": {"base_model": tiny_model, **payload}}, queue="finetune"
    )
    job = _wait_state(system, payload["job_id"], ("failed", "registered"), timeout_s=60)
    assert job["state"] == "failed" and reason in job["reason"]
    assert job["train_export_id"] is None  # no training started
    with system["store"].uow() as uow:
        assert uow.repo.model(domain.model_id_for(payload["job_id"])) is None


def test_killed_worker_mid_training_ends_failed_registers_nothing_and_is_not_redelivered(
    system: dict[str, Any], tiny_model: str
) -> None:
    long_recipe = {**FAST_RECIPE, "max_steps": 20000, "eval_every_steps": 5000}
    job_id = "job-killed"
    sent = system["client"].send_task(
        "finetune.start_job",
        kwargs={"payload": {"job_id": job_id, "base_model": tiny_model, "recipe": long_recipe}},
        queue="finetune",
    )

    def training_started() -> dict | None:
        job = _job(system, job_id)
        return job if job and job["state"] == "training" and job["progress"] > 0.05 else None

    wait_for(training_started, 120, 0.2, what="training to make progress")
    system["worker"].kill()
    killed_at = time.monotonic()

    # The watchdog (beat sends finetune.watchdog every few seconds; here its handler is called directly).
    assert jobs.watchdog(system["store"], system["settings"]) == []  # the heartbeat is still fresh
    # once the heartbeat is older than the watchdog's limit, the job is failed (polled: no fixed sleep)
    failed = wait_for(
        lambda: jobs.watchdog(system["store"], system["settings"]), 60, 0.2, what="the watchdog to see the lost worker"
    )
    assert failed == [job_id]
    job = _job(system, job_id)
    assert job is not None and job["state"] == "failed" and job["reason"] == "worker lost"
    model_id = domain.model_id_for(job_id)
    with system["store"].uow() as uow:
        assert uow.repo.model(model_id) is None
    assert not (system["settings"].adapters_dir / model_id).exists()

    # A restarted worker does not run the job again (start_job is acked before it runs).
    log_before = system["worker"].log.stat().st_size
    system["worker"].start()
    probe = explanation_event(999)
    system["client"].send_task(
        "finetune.on_explanation_created", kwargs={"payload": probe.to_payload()}, queue="finetune"
    )

    def probe_stored() -> bool:
        with system["store"].uow() as uow:
            return uow.repo.counts()["explanations"] == 51

    wait_for(probe_stored, 60, 0.2, what="the restarted worker to consume")
    # Absence needs time to pass: a start_job message left unacknowledged would come back once the broker's
    # visibility timeout (4 s) has passed since the kill, so the check waits that long (nothing to poll for).
    time.sleep(max(0.0, 6 - (time.monotonic() - killed_at)))
    with open(system["worker"].log, "rb") as log:
        log.seek(log_before)
        after_restart = log.read().decode(errors="replace")
    # the log holds the restarted worker at INFO (a task it received would be named; batched event tasks are
    # logged by their batch, so the worker's ready line is the witness), and no start_job came back
    assert "ready." in after_restart, after_restart[-2000:]
    # the killed job's message did not come back (other jobs of this module may still be waiting their turn:
    # a job queued behind a running one re-sends itself, so only this message's id is looked for)
    assert f"Task finetune.start_job[{sent.id}]" not in after_restart
    job = _job(system, job_id)
    assert job is not None and job["state"] == "failed"
