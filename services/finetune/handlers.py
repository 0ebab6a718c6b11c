"""Finetune use cases. Each takes a message and its dependencies; event handlers are idempotent on the
message id, and every event is staged in the outbox with a deterministic id (published after the commit).

Job requests are validated here, before anything is queued; the run itself is in jobs.py.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from services.finetune import domain, pii
from services.finetune.config import FinetuneSettings
from services.finetune.store import EXPLANATION_FIELDS, JobRow, ModelRow, SqlUnitOfWork, Store
from shared import votes
from shared.contracts import (
    ExplanationCreated,
    FeedbackErased,
    FeedbackRecorded,
    FineTuneProgress,
    ModelRegistered,
    ModelWithdrawn,
    StartFineTune,
    derived_id,
    utcnow,
)
from shared.db import first_of_each, handle_many_once, handle_once

log = logging.getLogger(__name__)


class Rejected(ValueError):
    """A request that cannot become a job: `status` is the HTTP status that says why (422 bad input, 409 not
    possible with the data as it is)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class NotFound(LookupError):
    pass


class Trainer(Protocol):
    """The training edge (services.finetune.training), as the job runner uses it."""

    def validate_base_model(self, path: str) -> None: ...
    def train(
        self,
        base_model_path: str,
        train_rows: list,
        eval_rows: list,
        recipe: Any,
        output_dir: Path,
        *,
        on_progress: Any = None,
        should_cancel: Any = None,
    ) -> Any: ...  # noqa: E501
    def evaluate_likelihood(
        self, base_model_path: str, adapter_path: str | None, good_rows: list, bad_rows: list
    ) -> dict[str, Any]: ...  # noqa: E501


def load_training() -> Any:
    from services.finetune import training  # light: torch is imported inside its functions only

    return training


def rules_from(settings: FinetuneSettings) -> domain.ExportRules:
    return domain.ExportRules(
        sft_min_stars=settings.sft_min_stars,
        sft_accept_thumbs_up=settings.sft_accept_thumbs_up,
        heldout_percent=settings.heldout_percent,
        exclude_model_prefixes=tuple(settings.exclude_model_prefixes),
        exclude_fallback=settings.exclude_fallback,
    )


# ---------------------------------------------------------------------------------------------------------
# Training data, fed by events


def on_explanation_created(event: ExplanationCreated, uow: SqlUnitOfWork) -> bool:
    """Keep the explanation as training material. One served to a session erased after it was created (its
    event was still on its way) is kept without its prompt and text."""

    def apply(uow: SqlUnitOfWork) -> bool:
        erased_at = uow.repo.erased_at(event.session_key) if event.session_key else None
        return uow.repo.add_explanation(_material(event, erased_at))

    return handle_once(uow, event.message_id, apply, duplicate=False)


def on_explanation_created_batch(events: list[ExplanationCreated], uow: SqlUnitOfWork) -> list[bool]:
    """`on_explanation_created` for a batch, set-based (the same outcomes and rows as one by one): one query each
    for the handled ids, the explanations kept and the erased sessions, one insert of many rows. An explanation
    twice in the batch (under two message ids) is kept once, as its first message has it."""

    def apply(uow: SqlUnitOfWork, fresh: list[ExplanationCreated]) -> list[bool]:
        known = uow.repo.explanations_known(str(e.explanation_id) for e in fresh)
        erased = uow.repo.erased_at_many(e.session_key for e in fresh if e.session_key)
        outcomes, new = first_of_each(fresh, lambda e: str(e.explanation_id), known)
        uow.repo.add_explanations([_material(e, erased.get(e.session_key) if e.session_key else None) for e in new])
        return outcomes

    return handle_many_once(uow, events, apply, duplicate=False)


def _material(event: ExplanationCreated, erased_at: datetime | None) -> dict[str, Any]:
    """The explanation's row: without its prompt and text if its session was erased after it was served."""
    erased = votes.erased_before(erased_at, event.created_at)
    return event.row(*EXPLANATION_FIELDS) | {
        "prompt_text": "" if erased else event.prompt_text,
        "text": "" if erased else event.text,
    }


def on_feedback_recorded(event: FeedbackRecorded, uow: SqlUnitOfWork) -> str:
    """Keep one vote per feedback id (the newest wins). Returns stored, replaced, stale, erased or duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        # Stricter than `shared.votes.erased_before`, on purpose: a session that asked to be forgotten gives no
        # training data again, not even votes cast after its erasure. What is trained on outlives the request
        # (a model keeps what it learnt until it is withdrawn), so this store never takes that session back.
        if repo.is_erased(event.session_key):
            return "erased"
        return votes.keep_newest(repo, votes.vote_row(event, "session_key"))

    return handle_once(uow, event.message_id, apply)


def on_feedback_recorded_batch(events: list[FeedbackRecorded], uow: SqlUnitOfWork) -> list[str]:
    """`on_feedback_recorded` for a batch, set-based (the same outcomes and stored votes as one by one): one
    query each for the handled ids, the erased sessions and the stored votes, one write of many rows each."""

    def apply(uow: SqlUnitOfWork, fresh: list[FeedbackRecorded]) -> list[str]:
        erased = uow.repo.erased_among(e.session_key for e in fresh)  # the same stricter rule as one by one
        newest = votes.NewestInBatch(uow.repo.votes_submitted_at(str(e.feedback_id) for e in fresh))
        outcomes = [
            "erased" if e.session_key in erased else newest.keep(votes.vote_row(e, "session_key")) for e in fresh
        ]
        uow.repo.write_votes(newest)
        return outcomes

    return handle_many_once(uow, events, apply)


def on_feedback_erased(event: FeedbackErased, uow: SqlUnitOfWork) -> dict[str, Any] | None:
    """Forget the session's votes and remember its key (and feedback ids), so nothing of it is exported again,
    and withdraw every model whose training or held-out data held its feedback (ModelWithdrawn, in the same
    transaction). A job still training on it is withdrawn when it registers (jobs.JobRunner._register).
    Returns the trace (which exports and models had used its feedback, which were withdrawn)."""

    def apply(uow: SqlUnitOfWork) -> dict[str, Any] | None:
        record = uow.repo.erase(
            event.session_key,
            [str(f) for f in event.feedback_ids],
            event.erased_at,
            [str(e) for e in event.explanation_ids],
        )
        withdrawn = [
            model_id
            for model_id in record["model_ids"]
            if withdraw_in(uow, model_id, "its training data held a session that was erased")
        ]
        if record["model_ids"]:
            log.warning(
                "an erased session's feedback was used by %d model(s); withdrawn now: %d",
                len(record["model_ids"]),
                len(withdrawn),
                extra={"model_ids": record["model_ids"], "export_ids": record["export_ids"]},
            )
        return {**record, "withdrawn": withdrawn}

    return handle_once(uow, event.message_id, apply, duplicate=None)


# ---------------------------------------------------------------------------------------------------------
# The registry: withdraw, force a below-base model live, retrain


def withdraw_in(uow: SqlUnitOfWork, model_id: str, reason: str) -> bool:
    """Inside an open unit of work: mark the model withdrawn and stage ModelWithdrawn. False when it is unknown
    or already withdrawn."""
    model = uow.repo.model(model_id)
    if model is None or model["status"] == domain.MODEL_WITHDRAWN:
        return False
    uow.repo.update_model(model_id, status=domain.MODEL_WITHDRAWN, status_reason=reason)
    uow.add_events(
        ModelWithdrawn(
            message_id=derived_id("model.withdrawn", model_id),
            model_id=model_id,
            model=model["name"],
            reason=reason,
        )
    )
    return True


def withdraw_model(uow: SqlUnitOfWork, model_id: str, reason: str) -> ModelRow:
    with uow:
        if uow.repo.model(model_id) is None:
            raise NotFound(f"model {model_id} not found")
        if not withdraw_in(uow, model_id, reason):
            raise Rejected(409, f"model {model_id} is already withdrawn")
        uow.commit()
        model = uow.repo.model(model_id)
    assert model is not None
    return model


def registered_event(model: ModelRow) -> ModelRegistered:
    return ModelRegistered(
        message_id=derived_id("model.registered", model["model_id"]),
        model_id=model["model_id"],
        model=model["name"],
        base_model=model["base_model"],
        serving_base_url=model["serving_base_url"],
        metrics=domain.float_metrics(model["metrics"]),
        cost_per_1k_tokens_usd=model["cost_per_1k_tokens_usd"],
    )


def release_model(uow: SqlUnitOfWork, model_id: str, force: bool) -> ModelRow:
    """An operator sends a model that did not beat its base into live testing anyway (force must be true).
    A withdrawn model can never be released."""
    with uow:
        model = uow.repo.model(model_id)
        if model is None:
            raise NotFound(f"model {model_id} not found")
        if model["status"] == domain.MODEL_WITHDRAWN:
            raise Rejected(409, f"model {model_id} is withdrawn ({model['status_reason']}); retrain it instead")
        if model["status"] == domain.MODEL_REGISTERED:
            raise Rejected(409, f"model {model_id} is already registered and live")
        if not force:
            raise Rejected(
                422, f"model {model_id} did not beat its base on the held-out rows; send force=true to test it anyway"
            )
        uow.repo.update_model(model_id, status=domain.MODEL_REGISTERED, status_reason="released by an operator")
        model = uow.repo.model(model_id)
        assert model is not None
        uow.add_events(registered_event(model))
        uow.commit()
    return model


def retrain_command(uow: SqlUnitOfWork, model_id: str) -> StartFineTune:
    """The job that trains the model again, same base, method and recipe, from the data as it is today (erased
    sessions are not in it)."""
    with uow:
        model = uow.repo.model(model_id)
    if model is None:
        raise NotFound(f"model {model_id} not found")
    with uow:
        job = uow.repo.job(model["job_id"])
    return StartFineTune(
        method=model["method"],
        base_model=model["base_model"],
        recipe={k: v for k, v in model["recipe"].items() if k != "method"},
        min_examples=job["min_examples"] if job else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Exports


def training_pool(uow: SqlUnitOfWork, rules: domain.ExportRules | None = None) -> list[domain.Example]:
    """Every usable example, deduplicated and scrubbed, from one consistent read."""
    with uow:
        return domain.examples(uow.repo.training_explanations(), uow.repo.erased_keys(), pii.scrub, rules)


def export_dataset(
    uow: SqlUnitOfWork,
    fmt: str,
    split: str,
    rules: domain.ExportRules,
    *,
    pool: list[domain.Example] | None = None,
    job_id: str | None = None,
) -> tuple[str, domain.Export]:
    """Build one export and record it (export id + the feedback ids that went into it)."""
    if pool is None:
        pool = training_pool(uow, rules)
    export = domain.build_export(pool, fmt, split, rules)
    export_id = str(derived_id("finetune.export", job_id, fmt, split) if job_id else uuid.uuid4())
    with uow:
        uow.repo.record_export(export_id, export, job_id)
        uow.commit()
    return export_id, export


def data_summary(uow: SqlUnitOfWork, rules: domain.ExportRules) -> dict[str, Any]:
    pool = training_pool(uow, rules)
    with uow:
        counts = uow.repo.counts()
    out: dict[str, Any] = {**counts, "examples": len(pool)}
    for fmt in domain.FORMATS:
        for split in domain.SPLITS:
            out[f"{fmt}_{split}"] = len(domain.build_export(pool, fmt, split, rules).rows)
    return out


# ---------------------------------------------------------------------------------------------------------
# Jobs: validation and creation


@dataclasses.dataclass(frozen=True)
class JobSpec:
    method: str
    base_model: str
    recipe: dict[str, Any]
    min_examples: int


def build_recipe(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The full recipe for `method` with the overrides applied (`domain.Recipe`); Rejected(422) names what is
    wrong."""
    fields = {f.name: f for f in dataclasses.fields(domain.Recipe)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise Rejected(422, f"unknown recipe fields: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    defaults = domain.Recipe().to_dict()
    values = {**overrides, "method": method}
    for name, value in values.items():
        default = defaults[name]
        ok = (
            isinstance(value, bool)
            if isinstance(default, bool)
            else (isinstance(value, int) and not isinstance(value, bool))
            if isinstance(default, int)
            else (isinstance(value, int | float) and not isinstance(value, bool))
            if isinstance(default, float)
            else isinstance(value, str)
            if isinstance(default, str)
            else isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        )
        if not ok:
            raise Rejected(422, f"recipe.{name} must be of the same type as its default {default!r}, got {value!r}")
    recipe = domain.Recipe.from_dict({**defaults, **values})
    if problems := recipe.problems():
        raise Rejected(422, "bad recipe: " + "; ".join(problems))
    return recipe.to_dict()


def job_spec(cmd: StartFineTune, settings: FinetuneSettings, trainer: Any = None) -> JobSpec:
    """Check what can be checked without the data: method, base model path, recipe."""
    training = trainer or load_training()
    base = cmd.base_model or settings.base_model
    if not base:
        raise Rejected(
            422, "no base model: pass base_model (a local Hugging Face model directory) or set FINETUNE_BASE_MODEL"
        )
    try:
        training.validate_base_model(base)
    except training.TrainingInputError as exc:
        raise Rejected(422, f"unknown base model: {exc}") from exc
    min_examples = settings.min_examples if cmd.min_examples is None else cmd.min_examples
    if min_examples < 0:
        raise Rejected(422, "min_examples must be >= 0")
    return JobSpec(cmd.method, base, build_recipe(cmd.method, dict(cmd.recipe)), min_examples)


def check_data(uow: SqlUnitOfWork, spec: JobSpec, rules: domain.ExportRules) -> None:
    """Rejected(409) when the data as it is now cannot feed this job (too little, empty export)."""
    pool = training_pool(uow, rules)
    train = domain.build_export(pool, spec.method, "train", rules)
    heldout = domain.build_export(pool, spec.method, "heldout", rules)
    problem = domain.enough_data_problem(spec.method, len(train.rows), len(heldout.rows), spec.min_examples)
    if problem:
        raise Rejected(409, problem)


def create_job(cmd: StartFineTune, store: Store, settings: FinetuneSettings) -> tuple[JobRow, StartFineTune]:
    """Validate a job request (before anything is queued) and record the job as queued. Returns the job and
    the command to send to the worker (with the job id filled in)."""
    spec = job_spec(cmd, settings)
    check_data(store.uow(), spec, rules_from(settings))
    job_id = cmd.job_id or f"job-{uuid.uuid4().hex[:12]}"
    with store.uow() as uow:
        if uow.repo.job(job_id) is not None:
            raise Rejected(409, f"job {job_id} already exists")
        busy = [j for j in uow.repo.active_jobs() if j["job_id"] != job_id]
        if busy:
            raise Rejected(
                409, f"job {busy[0]['job_id']} is {busy[0]['state']}: one job at a time; send this one when it ends"
            )
        uow.repo.add_job(
            {
                "job_id": job_id,
                "state": domain.QUEUED,
                "method": spec.method,
                "base_model": spec.base_model,
                "recipe": spec.recipe,
                "min_examples": spec.min_examples,
            }
        )
        uow.add_events(progress_event(job_id, domain.QUEUED, 0.0, "queued"))
        uow.commit()
        job = uow.repo.job(job_id)
    assert job is not None
    return job, cmd.model_copy(update={"job_id": job_id, "base_model": spec.base_model, "recipe": spec.recipe})


def get_job(uow: SqlUnitOfWork, job_id: str) -> JobRow:
    with uow:
        job = uow.repo.job(job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def cancel_job(uow: SqlUnitOfWork, job_id: str) -> JobRow:
    """A queued job is cancelled at once; a running one is flagged and stops at its next step."""
    with uow:
        job = uow.repo.job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job["state"] in domain.TERMINAL_STATES:
            raise Rejected(409, f"job {job_id} is already {job['state']}")
        if job["state"] == domain.QUEUED:
            uow.repo.update_job(
                job_id,
                state=domain.CANCELLED,
                cancel_requested=True,
                finished_at=utcnow(),
                detail="cancelled before it started",
            )
            uow.add_events(progress_event(job_id, domain.CANCELLED, job["progress"], "cancelled before it started"))
        else:
            uow.repo.update_job(job_id, cancel_requested=True, detail="cancellation requested")
        uow.commit()
        job = uow.repo.job(job_id)
    assert job is not None
    return job


def progress_event(job_id: str, state: str, progress: float, detail: str, step: object = "") -> FineTuneProgress:
    return FineTuneProgress(
        message_id=derived_id("finetune.progress", job_id, state, step),
        job_id=job_id,
        state=state,
        progress=round(progress, 4),
        detail=detail,
    )


def registered_adapters(uow: SqlUnitOfWork) -> list[ModelRow]:
    with uow:
        return [m for m in uow.repo.list_models() if m["status"] == domain.MODEL_REGISTERED]


def fail_unqueued(uow: SqlUnitOfWork, job_id: str, reason: str) -> None:
    with uow:
        uow.repo.update_job(job_id, state=domain.FAILED, reason=reason, finished_at=utcnow())
        uow.commit()


def reject_payload(store: Store, payload: Any, reason: str) -> str | None:
    """A start_job payload that is not a valid StartFineTune: when it names a job id that is not taken yet,
    record that job as failed with the reason (so whoever sent it can read why); returns that id."""
    job_id = payload.get("job_id") if isinstance(payload, dict) else None
    if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
        log.error("%s", reason)
        return None
    with store.uow() as uow:
        if uow.repo.job(job_id) is not None:
            return None
        method = payload.get("method")
        uow.repo.add_job(
            {
                "job_id": job_id,
                "state": domain.FAILED,
                "method": method if method in domain.FORMATS else str(method)[:8],
                "base_model": str(payload.get("base_model") or ""),
                "recipe": payload.get("recipe") if isinstance(payload.get("recipe"), dict) else {},
                "min_examples": 0,
                "reason": reason,
                "finished_at": utcnow(),
            }
        )
        uow.add_events(progress_event(job_id, domain.FAILED, 0.0, reason))
        uow.commit()
    return job_id
