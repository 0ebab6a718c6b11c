"""Running a fine-tuning job: queued -> exporting -> training -> evaluating -> registered, or failed (with a
reason) or cancelled.

Validation (handlers.job_spec, the data check) happens before any training starts. The job writes a heartbeat
while it runs; the watchdog fails a job whose heartbeat stopped ("worker lost"). The model is registered only at
the very end, in one transaction, after the adapter directory is complete, and only while the job is still
running, so a failed, cancelled or killed job leaves no half-registered model (and its folder is removed).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from services.finetune import domain, handlers
from services.finetune.config import FinetuneSettings
from services.finetune.store import ModelRow, Store
from shared.contracts import ModelWithdrawn, StartFineTune, derived_id, utcnow
from shared.serving import served_name

log = logging.getLogger(__name__)

Relay = Callable[[], Any]

#: One job at a time per worker process: a second one stays queued (the task sends itself again later).
_ONE_JOB = threading.Lock()
BUSY = "waiting"


class JobStopped(Exception):
    """The job left the running states under the runner (cancelled, or failed by the watchdog)."""


class _Heartbeat:
    """Writes the job's heartbeat every `interval_s` from a daemon thread while the job makes progress: when no
    progress was reported for `progress_timeout_s` (a hung step, a stuck evaluation), it stops beating, so the
    watchdog fails the job as it fails one whose worker died."""

    def __init__(self, store: Store, job_id: str, interval_s: float, progress_timeout_s: float = 900.0) -> None:
        self.store, self.job_id, self.interval_s = store, job_id, interval_s
        self.progress_timeout_s = progress_timeout_s
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def touch(self) -> None:
        self.last_progress = time.monotonic()

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if time.monotonic() - self.last_progress > self.progress_timeout_s:
                log.error(
                    "job %s reported no progress for %.0f s: no more heartbeats", self.job_id, self.progress_timeout_s
                )
                return
            try:
                with self.store.uow() as uow:
                    job = uow.repo.job(self.job_id)
                    if job is None or job["state"] not in domain.ACTIVE_STATES:
                        return
                    uow.repo.update_job(self.job_id, heartbeat_at=utcnow())
                    uow.commit()
            except Exception:  # a missed beat is the watchdog's business, not a crash
                log.exception("heartbeat of job %s failed", self.job_id)


class JobRunner:
    """Runs one job to its end. Every state change is a guarded transition: if the job left the running states
    (the watchdog failed it, or it was cancelled), the runner stops instead of overwriting that."""

    def __init__(
        self,
        store: Store,
        settings: FinetuneSettings,
        relay: Relay,
        trainer: Any = None,
        clock: Callable[[], datetime] = utcnow,
        on_registered: Callable[[ModelRow], Any] | None = None,
    ) -> None:
        self.store, self.settings, self.relay = store, settings, relay
        self.trainer = trainer or handlers.load_training()
        self.clock = clock
        self.on_registered = on_registered  # e.g. tell an external server (vLLM) to load the new adapter
        self.rules = handlers.rules_from(settings)
        self._beat: _Heartbeat | None = None  # while a job runs

    # -- entry ------------------------------------------------------------------------------------------
    def start(self, cmd: StartFineTune) -> str:
        """Handle `finetune.start_job`: create the job when it came without one (sent by name from outside),
        claim it, run it. Returns the job's final state."""
        job_id = self.job_id_of(cmd)
        if not _ONE_JOB.acquire(blocking=False):  # another job runs in this process: stay queued
            self._record_queued(job_id, cmd)
            self.relay()
            return BUSY
        try:
            claimed = self._claim(job_id, cmd)
            self.relay()
            if claimed is None:
                return self._state(job_id)
            if isinstance(claimed, str):  # BUSY: another worker runs a job
                return BUSY
            self._started = time.monotonic()
            self._timed_out = False
            try:
                with _Heartbeat(
                    self.store, job_id, self.settings.heartbeat_interval_s, self.settings.progress_timeout_s
                ) as beat:
                    self._beat = beat
                    self._run(job_id, claimed)
            finally:
                self._beat = None
                self.relay()
            return self._state(job_id)
        finally:
            _release_memory()
            _ONE_JOB.release()

    @staticmethod
    def job_id_of(cmd: StartFineTune) -> str:
        return cmd.job_id or f"job-{derived_id('finetune.job', cmd.message_id).hex[:12]}"

    def wait_queued(self, cmd: StartFineTune, why: str) -> str:
        """Leave the job queued (visible, with why) for another worker or a later try; returns BUSY."""
        self._record_queued(self.job_id_of(cmd), cmd, why)
        self.relay()
        return BUSY

    def _record_queued(self, job_id: str, cmd: StartFineTune, why: str = "another job is running") -> None:
        """A job sent by name while the worker is busy: make it visible as queued (validated when it runs)."""
        with self.store.uow() as uow:
            if uow.repo.job(job_id) is None:
                uow.repo.add_job(self._row_as_sent(job_id, cmd, domain.QUEUED, detail=f"waiting: {why}"))
                uow.add_events(handlers.progress_event(job_id, domain.QUEUED, 0.0, f"waiting: {why}"))
            uow.commit()

    def _row_as_sent(self, job_id: str, cmd: StartFineTune, state: str, **fields: Any) -> dict[str, Any]:
        """The row of a job known only by its command (waiting, or rejected by validation): what it asked for,
        the settings' defaults where it asked for nothing; `fields` add to it."""
        min_examples = self.settings.min_examples if cmd.min_examples is None else cmd.min_examples
        return {
            "job_id": job_id,
            "state": state,
            "method": cmd.method,
            "base_model": cmd.base_model or self.settings.base_model or "",
            "recipe": dict(cmd.recipe),
            "min_examples": min_examples,
            **fields,
        }

    def _touch(self) -> None:
        if self._beat is not None:
            self._beat.touch()

    def _cancel_or_timeout(self, job_id: str) -> bool:
        if time.monotonic() - getattr(self, "_started", time.monotonic()) > self.settings.job_time_limit_s:
            self._timed_out = True
            return True
        return self._should_stop(job_id)

    def _claim(self, job_id: str, cmd: StartFineTune) -> handlers.JobSpec | str | None:
        with self.store.uow() as uow:
            job = uow.repo.job(job_id)
            if job is not None and job["state"] == domain.QUEUED and job["detail"].startswith("waiting"):
                uow.repo.delete_job(job_id)  # recorded while waiting, not validated yet: validate it now
                job = None
            if job is None:
                try:
                    spec = handlers.job_spec(cmd, self.settings, self.trainer)
                except handlers.Rejected as exc:
                    failed = self._row_as_sent(job_id, cmd, domain.FAILED, reason=exc.message, finished_at=self.clock())
                    uow.repo.add_job(failed)
                    uow.add_events(handlers.progress_event(job_id, domain.FAILED, 0.0, exc.message))
                    uow.commit()
                    log.warning("job %s rejected: %s", job_id, exc.message)
                    return None
                uow.repo.add_job({"job_id": job_id, "state": domain.QUEUED, **dataclasses.asdict(spec)})
                job = uow.repo.job(job_id)
                assert job is not None
            if job["state"] != domain.QUEUED:  # a redelivery, or cancelled while queued
                uow.commit()
                return None
            others = [
                j
                for j in uow.repo.active_jobs()
                if j["job_id"] != job_id
                and not domain.heartbeat_stale(j["heartbeat_at"], self.clock(), self.settings.heartbeat_timeout_s)
            ]
            if others:  # another worker runs a job: this one waits
                uow.commit()
                return BUSY
            now = self.clock()
            uow.repo.update_job(
                job_id,
                state=domain.EXPORTING,
                started_at=now,
                heartbeat_at=now,
                progress=0.0,
                detail="exporting training data",
            )
            uow.add_events(handlers.progress_event(job_id, domain.EXPORTING, 0.0, "exporting training data"))
            uow.commit()
            return handlers.JobSpec(job["method"], job["base_model"], job["recipe"], job["min_examples"])

    def _state(self, job_id: str) -> str:
        with self.store.uow() as uow:
            job = uow.repo.job(job_id)
        return job["state"] if job else "unknown"

    # -- transitions ------------------------------------------------------------------------------------
    def _advance(self, job_id: str, state: str, progress: float, detail: str, step: object = "", **values: Any) -> None:
        self._touch()
        with self.store.uow() as uow:
            job = uow.repo.job(job_id)
            if job is None or job["state"] not in domain.ACTIVE_STATES:
                raise JobStopped(job["state"] if job else "missing")
            if job["cancel_requested"]:
                raise self.trainer.TrainingCancelled("cancelled")
            uow.repo.update_job(
                job_id, state=state, progress=progress, detail=detail, heartbeat_at=self.clock(), **values
            )
            uow.add_events(handlers.progress_event(job_id, state, progress, detail, step))
            uow.commit()
        self.relay()

    def _finish(self, job_id: str, state: str, reason: str | None, detail: str) -> None:
        with self.store.uow() as uow:
            job = uow.repo.job(job_id)
            if job is None or job["state"] in domain.TERMINAL_STATES:
                return
            uow.repo.update_job(job_id, state=state, reason=reason, detail=detail, finished_at=self.clock())
            uow.add_events(handlers.progress_event(job_id, state, job["progress"], reason or detail))
            uow.commit()

    def _should_stop(self, job_id: str) -> bool:
        with self.store.uow() as uow:
            job = uow.repo.job(job_id)
        return job is None or bool(job["cancel_requested"]) or job["state"] not in domain.ACTIVE_STATES

    # -- the run ----------------------------------------------------------------------------------------
    def _run(self, job_id: str, spec: handlers.JobSpec) -> None:
        model_id = domain.model_id_for(job_id)
        # One folder per job: the training edge writes beside its output (a temporary folder renamed into place),
        # so removing the job folder removes whatever a failed, cancelled or killed run left behind.
        job_dir = self.settings.adapters_dir / model_id
        adapter_dir = job_dir / "adapter"
        try:
            pool = handlers.training_pool(self.store.uow(), self.rules)
            train_id, train = handlers.export_dataset(
                self.store.uow(), spec.method, "train", self.rules, pool=pool, job_id=job_id
            )
            heldout_id, heldout = handlers.export_dataset(
                self.store.uow(), spec.method, "heldout", self.rules, pool=pool, job_id=job_id
            )
            problem = domain.enough_data_problem(spec.method, len(train.rows), len(heldout.rows), spec.min_examples)
            if problem:
                self._finish(job_id, domain.FAILED, problem, "validation failed before training")
                return
            self.trainer.validate_base_model(spec.base_model)
            recipe = domain.Recipe.from_dict(spec.recipe)
            self._advance(
                job_id, domain.TRAINING, 0.05, f"training on {len(train.rows)} rows, validating on {len(heldout.rows)}",
                train_export_id=train_id, heldout_export_id=heldout_id,
            )  # fmt: skip
            _remove(job_dir)  # anything left by an earlier attempt that never registered
            result = self.trainer.train(
                spec.base_model,
                train.rows,
                heldout.rows,
                recipe,
                adapter_dir,
                on_progress=self._on_progress(job_id),
                should_cancel=lambda: self._cancel_or_timeout(job_id),
            )
            self._advance(job_id, domain.EVALUATING, 0.9, "offline evaluation on the held-out split")
            metrics = self._evaluate(spec, pool, result)
            model = self._register(job_id, model_id, spec, result, metrics, train_id, heldout_id)
            if self.on_registered is not None and model["status"] == domain.MODEL_REGISTERED:
                try:
                    self.on_registered(model)
                except Exception:  # the model is registered; serving it elsewhere is best effort
                    log.exception("could not announce model %s to the serving endpoint", model_id)
        except self.trainer.TrainingCancelled:
            _remove(job_dir)
            if self._state(job_id) in domain.ACTIVE_STATES:
                if getattr(self, "_timed_out", False):
                    limit = f"time limit of {self.settings.job_time_limit_s:.0f} s exceeded (FINETUNE_JOB_TIME_LIMIT_S)"
                    self._finish(job_id, domain.FAILED, limit, "failed")
                else:
                    self._finish(job_id, domain.CANCELLED, None, "cancelled")
            log.info("job %s stopped: %s", job_id, self._state(job_id))
        except JobStopped as exc:
            _remove(job_dir)
            log.warning("job %s left the running states under the runner (%s)", job_id, exc)
        except self.trainer.TrainingInputError as exc:
            _remove(job_dir)
            self._finish(job_id, domain.FAILED, str(exc), "validation failed before training")
        except Exception as exc:
            _remove(job_dir)
            log.exception("job %s failed", job_id)
            self._finish(job_id, domain.FAILED, f"{type(exc).__name__}: {exc}", "failed")

    def _on_progress(self, job_id: str) -> Callable[[float, dict], None]:
        last: dict[str, Any] = {"bucket": -1, "eval": None, "t": 0.0}

        def report(fraction: float, info: dict) -> None:
            self._touch()
            step = info.get("step")
            loss, eval_loss = info.get("loss"), info.get("eval_loss")
            detail = f"step {step}" + (f", loss {loss:.4f}" if loss is not None else "")
            detail += f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""
            overall = 0.05 + 0.85 * float(fraction)
            bucket = int(fraction * 20)  # an event every 5%, and at every evaluation
            publish = bucket != last["bucket"] or eval_loss != last["eval"]
            now = time.monotonic()
            if not publish and now - last["t"] < 1.0:
                return
            last.update(bucket=bucket, eval=eval_loss, t=now)
            with self.store.uow() as uow:
                job = uow.repo.job(job_id)
                if job is None or job["state"] != domain.TRAINING:
                    return
                uow.repo.update_job(job_id, progress=overall, detail=detail, heartbeat_at=self.clock())
                if publish:
                    uow.add_events(handlers.progress_event(job_id, domain.TRAINING, overall, detail, step))
                uow.commit()
            if publish:
                self.relay()

        return report

    def _evaluate(self, spec: handlers.JobSpec, pool: list[domain.Example], result: Any) -> dict[str, Any]:
        metrics: dict[str, Any] = {k: v for k, v in result.metrics.items() if not isinstance(v, list | dict)}
        good, bad = domain.evaluation_rows(pool, self.rules)
        if good or bad:
            base = self.trainer.evaluate_likelihood(spec.base_model, None, good, bad)
            tuned = self.trainer.evaluate_likelihood(spec.base_model, result.adapter_path, good, bad)
            for key in ("good_ll", "bad_ll", "margin"):
                metrics[f"offline_base_{key}"] = base.get(key)
                metrics[f"offline_tuned_{key}"] = tuned.get(key)
            metrics["offline_good_rows"] = len(good)
            metrics["offline_bad_rows"] = len(bad)
            if base.get("good_ll") is not None and tuned.get("good_ll") is not None:
                metrics["offline_good_ll_gain"] = tuned["good_ll"] - base["good_ll"]
            if base.get("margin") is not None and tuned.get("margin") is not None:
                metrics["offline_margin_gain"] = tuned["margin"] - base["margin"]
        beats = domain.beats_base(metrics)
        metrics["beats_base"] = beats
        with self.store.uow() as uow:
            mean_tokens = uow.repo.mean_tokens()
        metrics["mean_tokens_per_explanation"] = mean_tokens
        metrics["cost_per_explanation_usd"] = domain.cost_per_explanation(
            self.settings.cost_per_1k_tokens_usd, mean_tokens
        )
        return metrics

    def _register(
        self,
        job_id: str,
        model_id: str,
        spec: handlers.JobSpec,
        result: Any,
        metrics: dict[str, Any],
        train_id: str,
        heldout_id: str,
    ) -> ModelRow:
        """The one transaction that makes a model exist: the job becomes registered, the registry gets the
        model, all or nothing, and only while the job is still running. Its status:
        - withdrawn when its exports hold feedback of a session erased at any time up to now (also while it
          trained): ModelWithdrawn is staged, it is never served;
        - below_base when it did not beat its base on the held-out rows: kept, not announced, not served (an
          operator may release it: handlers.release_model);
        - registered otherwise: ModelRegistered is staged (the router serves it, the optimizer tests it)."""
        adapter = Path(result.adapter_path)
        if not (adapter / "adapter_config.json").is_file():
            raise RuntimeError(f"adapter directory {adapter} is incomplete")
        name = domain.model_name(model_id)
        with self.store.uow() as uow:
            job = uow.repo.job(job_id)
            if job is None or job["state"] != domain.EVALUATING:
                raise JobStopped(job["state"] if job else "missing")
            if job["cancel_requested"]:
                raise self.trainer.TrainingCancelled("cancelled")
            now = self.clock()
            erased = uow.repo.erased_in_exports([train_id, heldout_id])
            withdrawal = None
            reason: str | None = None
            if erased:
                status = domain.MODEL_WITHDRAWN
                reason = f"its training data held {len(erased)} vote(s) of an erased session"
                withdrawal = ModelWithdrawn(
                    message_id=derived_id("model.withdrawn", model_id), model_id=model_id, model=name, reason=reason
                )
            elif metrics.get("beats_base") is True:
                status, reason = domain.MODEL_REGISTERED, None
            else:
                status = domain.MODEL_BELOW_BASE
                reason = "did not beat its base model on the held-out rows (release it with force to test it live)"
            uow.repo.add_model(
                {
                    "model_id": model_id,
                    "name": name,
                    "job_id": job_id,
                    "method": spec.method,
                    "base_model": spec.base_model,
                    "adapter_path": str(adapter),
                    "recipe": result.recipe,
                    "train_export_id": train_id,
                    "heldout_export_id": heldout_id,
                    "metrics": metrics,
                    "status": status,
                    "status_reason": reason,
                    "serving_base_url": self.settings.public_serving_url,
                    "cost_per_1k_tokens_usd": self.settings.cost_per_1k_tokens_usd,
                    "registered_at": now,
                }
            )
            uow.repo.update_job(
                job_id,
                state=domain.REGISTERED,
                progress=1.0,
                detail=f"registered {name} ({status})",
                model_id=model_id,
                metrics=metrics,
                finished_at=now,
            )
            uow.add_events(handlers.progress_event(job_id, domain.REGISTERED, 1.0, f"registered {name} ({status})"))
            model = uow.repo.model(model_id)
            assert model is not None
            if status == domain.MODEL_REGISTERED:
                uow.add_events(handlers.registered_event(model))
            elif withdrawal is not None:
                uow.add_events(withdrawal)
            uow.commit()
        log.info("job %s registered %s (%s)", job_id, name, status)
        assert model is not None
        return model


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _release_memory() -> None:
    """After a job: drop what training left (models, optimizer state) and hand cached GPU memory back."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Watchdog


def watchdog(store: Store, settings: FinetuneSettings, now: datetime | None = None) -> list[str]:
    """Fail every running job whose heartbeat is older than FINETUNE_HEARTBEAT_TIMEOUT_S ("worker lost") and
    remove whatever adapter it may have left. Returns the ids of the jobs it failed."""
    now = now or utcnow()
    failed: list[str] = []
    with store.uow() as uow:
        for job in uow.repo.active_jobs():
            if not domain.heartbeat_stale(job["heartbeat_at"], now, settings.heartbeat_timeout_s):
                continue
            uow.repo.update_job(
                job["job_id"], state=domain.FAILED, reason=domain.WORKER_LOST, detail="no heartbeat", finished_at=now
            )
            uow.add_events(handlers.progress_event(job["job_id"], domain.FAILED, job["progress"], domain.WORKER_LOST))
            failed.append(job["job_id"])
        uow.commit()
    for job_id in failed:
        model_id = domain.model_id_for(job_id)
        with store.uow() as uow:
            registered = uow.repo.model(model_id) is not None
        if not registered:
            _remove(settings.adapters_dir / model_id)
        log.warning("job %s failed: %s", job_id, domain.WORKER_LOST)
    return failed


def _engine_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def load_adapter_on_server(base_url: str, model: ModelRow, timeout_s: float = 30.0, key: str | None = None) -> str:
    """Ask an OpenAI-compatible server with runtime LoRA loading (vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING, or
    the fallback server) to serve a registered adapter under its served name (shared.serving.served_name, the
    name the router asks for). vLLM answers 400 "... has already been loaded." for a name it has: that counts as
    loaded. Returns "loaded" or "already loaded"; raises httpx.HTTPStatusError on any other refusal."""
    import httpx

    name = served_name(model["name"])
    r = httpx.post(
        f"{base_url.rstrip('/')}/load_lora_adapter",
        json={"lora_name": name, "lora_path": model["adapter_path"]},
        headers=_engine_headers(key),
        timeout=timeout_s,
    )
    if r.status_code == 400 and "already been loaded" in r.text:
        return "already loaded"
    r.raise_for_status()
    return "loaded"


def unload_adapter_on_server(base_url: str, name: str, timeout_s: float = 30.0, key: str | None = None) -> bool:
    import httpx

    r = httpx.post(
        f"{base_url.rstrip('/')}/unload_lora_adapter",
        json={"lora_name": name},
        headers=_engine_headers(key),
        timeout=timeout_s,
    )
    if r.status_code == 404:
        return False
    r.raise_for_status()
    return True


def sync_serving(store: Store, settings: FinetuneSettings, timeout_s: float = 10.0) -> dict[str, Any]:
    """Make the external serving engine (FINETUNE_SERVING_BASE_URL) serve exactly the registered adapters: load
    the ones it lacks (after it restarted, it has none) and unload withdrawn ones it still has. Called when the
    service starts and every FINETUNE_SERVING_SYNC_INTERVAL_S. Returns what it did; raises httpx errors when the
    engine cannot be reached (the next round tries again)."""
    import httpx

    base = settings.serving_base_url
    if not base:
        return {"engine": None}
    key = settings.serving_key()
    r = httpx.get(f"{base.rstrip('/')}/models", headers=_engine_headers(key), timeout=timeout_s)
    r.raise_for_status()
    served = {m.get("id") for m in r.json().get("data", [])}
    with store.uow() as uow:
        models = uow.repo.list_models()
    loaded, unloaded, failed = [], [], []
    for m in models:
        name = served_name(m["name"])
        if m["status"] == domain.MODEL_REGISTERED and name not in served:
            try:
                load_adapter_on_server(base, m, timeout_s=max(timeout_s, 30.0), key=key)
                loaded.append(name)
            except httpx.HTTPError as exc:
                failed.append(name)
                log.error("could not load adapter %s into %s: %s", name, base, exc)
        elif (
            m["status"] == domain.MODEL_WITHDRAWN
            and name in served
            and unload_adapter_on_server(base, name, timeout_s=timeout_s, key=key)
        ):
            unloaded.append(name)
    if loaded or unloaded:
        log.info("serving engine %s: loaded %s, unloaded %s", base, loaded, unloaded)
    return {"engine": base, "loaded": loaded, "unloaded": unloaded, "failed": failed}
