"""HTTP entry points of the finetune service. Routes translate a request into a handler call."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from services.finetune import handlers
from services.finetune.config import FinetuneSettings
from services.finetune.store import JobRow, Store, outbox
from shared.bus import CeleryBus
from shared.contracts import StartFineTune
from shared.outbox import relay_when_done
from shared.web import AdminDep, from_state

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/finetune")


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(
        default=None, min_length=1, max_length=1000, description="a local Hugging Face model directory"
    )
    method: Literal["sft", "kto", "dpo"] = "sft"
    recipe: dict[str, Any] = Field(default_factory=dict, description="overrides of the training recipe")
    min_examples: int | None = Field(default=None, ge=0, description="overrides FINETUNE_MIN_EXAMPLES")


StoreDep = Annotated[Store, from_state("store")]
BusDep = Annotated[CeleryBus, from_state("bus")]
SettingsDep = Annotated[FinetuneSettings, from_state("settings")]


@contextmanager
def _as_http() -> Iterator[None]:
    """What the handlers refuse, as the HTTP answer that says why: 404 unknown, else the refusal's status."""
    try:
        yield
    except handlers.NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except handlers.Rejected as exc:
        raise HTTPException(exc.status, exc.message) from exc


def _job_out(job: JobRow) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k != "heartbeat_at"} | {"heartbeat_at": job.get("heartbeat_at")}


@router.get("/datasets/export")
def export_dataset(
    _: AdminDep,
    store: StoreDep,
    settings: SettingsDep,
    fmt: Annotated[Literal["sft", "kto", "dpo"], Query(alias="format")] = "sft",
    split: Literal["train", "heldout"] = "train",
) -> StreamingResponse:
    """Stream one export as JSON lines; its id (recorded with the feedback ids that went into it) is in the
    X-Export-Id header."""
    export_id, export = handlers.export_dataset(store.uow(), fmt, split, handlers.rules_from(settings))

    def lines() -> Iterator[bytes]:
        for row in export.rows:
            yield (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={
            "X-Export-Id": export_id,
            "X-Export-Rows": str(len(export.rows)),
            "Content-Disposition": f'attachment; filename="{fmt}-{split}-{export_id}.jsonl"',
        },
    )


@router.get("/datasets/summary")
def dataset_summary(_: AdminDep, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """How much training data there is, per format and split, and the job threshold."""
    return {**handlers.data_summary(store.uow(), handlers.rules_from(settings)), "min_examples": settings.min_examples}


@router.get("/exports/{export_id}")
def get_export(export_id: str, _: AdminDep, store: StoreDep) -> dict[str, Any]:
    with store.uow() as uow:
        export = uow.repo.export(export_id)
    if export is None:
        raise HTTPException(404, f"export {export_id} not found")
    return dict(export)


@router.get("/erasures")
def list_erasures(_: AdminDep, store: StoreDep) -> dict[str, Any]:
    """Erased sessions and the exports and models that had used their feedback."""
    with store.uow() as uow:
        return {"items": uow.repo.erasures()}


class ReleaseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    force: bool = Field(False, description="must be true: the model did not beat its base on the held-out rows")


class WithdrawIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("withdrawn by an operator", min_length=1, max_length=500)


@router.post("/jobs", status_code=202)
def start_job(body: JobIn, _: AdminDep, store: StoreDep, bus: BusDep, settings: SettingsDep) -> dict[str, Any]:
    """Validate and queue a fine-tuning job; a finetune worker runs it."""
    cmd = StartFineTune(
        base_model=body.base_model, method=body.method, recipe=body.recipe, min_examples=body.min_examples
    )
    return _queue_job(cmd, store, bus, settings)


def _queue_job(cmd: StartFineTune, store: Store, bus: CeleryBus, settings: FinetuneSettings) -> dict[str, Any]:
    with relay_when_done(store.factory, outbox, bus), _as_http():
        job, queued = handlers.create_job(cmd, store, settings)
    try:
        bus.send(queued)
    except Exception as exc:  # the broker is down: say so, and leave no job that will never run
        log.error("could not queue fine-tune job: %s", type(exc).__name__)
        handlers.fail_unqueued(store.uow(), job["job_id"], "the job could not be queued (broker unavailable)")
        raise HTTPException(503, "the job could not be queued right now; please retry") from exc
    return _job_out(job)


@router.get("/jobs")
def list_jobs(store: StoreDep, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    with store.uow() as uow:
        return {"items": [_job_out(j) for j in uow.repo.list_jobs(limit)]}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, store: StoreDep) -> dict[str, Any]:
    with _as_http():
        return _job_out(handlers.get_job(store.uow(), job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202)
def cancel_job(job_id: str, _: AdminDep, store: StoreDep, bus: BusDep) -> dict[str, Any]:
    with relay_when_done(store.factory, outbox, bus), _as_http():
        job = handlers.cancel_job(store.uow(), job_id)
    return _job_out(job)


@router.get("/models")
def list_models(_: AdminDep, store: StoreDep) -> dict[str, Any]:
    """The model registry: base, adapter, recipe, dataset exports, metrics, status."""
    with store.uow() as uow:
        return {"items": uow.repo.list_models()}


@router.post("/models/{model_id}/release")
def release_model(model_id: str, body: ReleaseIn, _: AdminDep, store: StoreDep, bus: BusDep) -> dict[str, Any]:
    """Send a model that did not beat its base into serving and a live experiment anyway (force=true)."""
    with relay_when_done(store.factory, outbox, bus), _as_http():
        model = handlers.release_model(store.uow(), model_id, body.force)
    return dict(model)


@router.post("/models/{model_id}/withdraw")
def withdraw_model(model_id: str, body: WithdrawIn, _: AdminDep, store: StoreDep, bus: BusDep) -> dict[str, Any]:
    """Take a model out of serving and of every experiment for good (ModelWithdrawn)."""
    with relay_when_done(store.factory, outbox, bus), _as_http():
        model = handlers.withdraw_model(store.uow(), model_id, body.reason)
    return dict(model)


@router.post("/models/{model_id}/retrain", status_code=202)
def retrain_model(model_id: str, _: AdminDep, store: StoreDep, bus: BusDep, settings: SettingsDep) -> dict[str, Any]:
    """Train the model again (same base, method, recipe) from today's data: erased sessions are not in it. The
    same as the queue message `finetune.retrain` {"model_id": ...}."""
    with _as_http():
        cmd = handlers.retrain_command(store.uow(), model_id)
    return _queue_job(cmd, store, bus, settings)
