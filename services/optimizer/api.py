"""HTTP entry points of the optimizer: experiments and the prompt registry. Routes translate a request into a
handler call and the handler's errors into 4xx JSON; events are relayed after the commit."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from services.optimizer import domain, experiments, registry, search, views
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import GenerationFailed, VariantGenerator
from services.optimizer.store import Store, outbox
from shared.bus import CeleryBus
from shared.outbox import relay_after_commit, relay_when_done
from shared.prompts import PROMPT_NAME
from shared.web import AdminDep, from_state

log = logging.getLogger(__name__)
router = APIRouter()


StoreDep = Annotated[Store, from_state("store")]
BusDep = Annotated[CeleryBus, from_state("bus")]
SettingsDep = Annotated[OptimizerSettings, from_state("settings")]
GeneratorDep = Annotated[VariantGenerator, from_state("generator")]

Name = Annotated[str, Field(min_length=1, max_length=100)]


class Strict(BaseModel):
    # allow_inf_nan=False: JSON parsers accept NaN, Infinity and 1e999; none of them is a usable setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ArmBody(Strict):
    prompt_version: str = Field(min_length=1, max_length=50)
    model: str = Field(min_length=1, max_length=200)
    weight: float | None = Field(default=None, description="share of traffic in (0, 1]; all or none")
    is_control: bool = False


class ExperimentBody(Strict):
    prompt_name: Name = PROMPT_NAME
    arms: list[ArmBody] = Field(max_length=10)
    allocation: Literal["fixed", "adaptive"] = "fixed"
    metric: Literal["positive_rate", "avg_stars"] | None = None
    alpha: float | None = Field(default=None, gt=0, le=0.5)
    min_duration_s: float | None = Field(
        default=None, ge=0, le=domain.MAX_DURATION_S, description="seconds before any decision"
    )
    min_feedback_per_arm: int | None = Field(default=None, ge=1, le=domain.MAX_FEEDBACK_PER_ARM)
    max_feedback_per_arm: int | None = Field(default=None, ge=1, le=domain.MAX_FEEDBACK_PER_ARM)
    target_lift: float | None = Field(default=None, gt=0, le=10)
    futility_alpha: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="level of the always-valid interval futility is judged on (per treatment; it never ships, so "
        "a looser level only costs power); default: the service's setting",
    )
    min_lift_to_ship: float = Field(default=0.0, ge=0, le=10)
    max_cost_ratio: float | None = Field(default=1.5, gt=0, description="guardrail vs control; null disables")
    max_latency_ratio: float | None = Field(default=2.0, gt=0, description="guardrail vs control; null disables")
    min_feedback_rate_ratio: float | None = Field(default=0.8, gt=0, le=1, description="null disables")
    feedback_rate_grace_s: float | None = Field(
        default=None,
        ge=0,
        le=domain.MAX_DURATION_S,
        description="the feedback-rate guardrail counts the sessions first served at least this many seconds ago "
        "(their votes have had time to arrive); default: the service's setting",
    )
    note: str = Field(default="", max_length=500)


class PromoteBody(Strict):
    arm_id: str | None = Field(default=None, min_length=1, max_length=64)


class StopBody(Strict):
    reason: str = Field(default="", max_length=500)


class VariantsBody(Strict):
    count: int | None = Field(default=None, ge=1, le=10)


class VersionBody(Strict):
    template: str = Field(min_length=1, max_length=8000)
    reason: str = Field(default="hand-written", max_length=500)
    parent_version: str | None = Field(default=None, min_length=1, max_length=50)


class RollbackBody(Strict):
    version: str | None = Field(default=None, min_length=1, max_length=50)
    model: str | None = Field(default=None, min_length=1, max_length=200)


@contextmanager
def _as_http() -> Iterator[None]:
    """What the handlers refuse (`domain.OptimizerError`), as the HTTP answer that says why: the refusal's
    status, or 429 with when to try again for a rate-limited generation."""
    try:
        yield
    except domain.RateLimited as exc:
        raise HTTPException(
            429,
            {"message": str(exc), "retry_after_s": math.ceil(exc.retry_after_s)},
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
        ) from exc
    except domain.OptimizerError as exc:
        raise HTTPException(exc.status, str(exc)) from exc


# --------------------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------------------


@router.get("/api/experiments")
def list_experiments(
    store: StoreDep,
    status: Annotated[Literal[domain.ALL_STATES] | None, Query()] = None,  # type: ignore[valid-type]
) -> dict[str, Any]:
    return {"experiments": views.list_experiments(store.uow(), status)}


@router.post("/api/experiments", status_code=201)
def create_experiment(
    body: ExperimentBody, _: AdminDep, store: StoreDep, bus: BusDep, settings: SettingsDep
) -> dict[str, Any]:
    """Start an experiment: arms are (prompt version, model) pairs, exactly one is the control."""
    # Every other field of the body is the spec's field of the same name; the options it leaves unset come from
    # the settings.
    options = body.model_dump(include=set(experiments.SETTING_OPTIONS))
    spec = domain.ExperimentSpec(
        arms=tuple(domain.ArmIn(a.prompt_version, a.model, a.weight, a.is_control) for a in body.arms),
        source="manual",
        **body.model_dump(exclude={"arms", *options}),
        **experiments.spec_defaults(settings, **options),
    )
    with relay_when_done(store.factory, outbox, bus), _as_http():
        created = experiments.create_experiment(spec, store.uow())
    return views.experiment_view(created["experiment_id"], store.uow())


@router.post("/api/experiments/decisions")
def run_decisions(_: AdminDep, store: StoreDep, bus: BusDep, settings: SettingsDep) -> dict[str, Any]:
    """Run the decision round now (beat runs it every OPTIMIZER_DECISION_INTERVAL_S)."""
    results = experiments.run_decisions(store.uow, settings)
    relay_after_commit(store.factory, outbox, bus)
    return {"results": results}


@router.get("/api/experiments/{experiment_id}")
def get_experiment(experiment_id: str, store: StoreDep) -> dict[str, Any]:
    with _as_http():
        return views.experiment_view(experiment_id, store.uow())


@router.post("/api/experiments/{experiment_id}/promote")
def promote(
    experiment_id: str, _: AdminDep, store: StoreDep, bus: BusDep, body: PromoteBody | None = None
) -> dict[str, Any]:
    """Promote the winner (or the arm given) to champion and conclude the experiment."""
    with relay_when_done(store.factory, outbox, bus), _as_http():
        result = experiments.promote_experiment(experiment_id, store.uow(), arm_id=body.arm_id if body else None)
    return result


@router.post("/api/experiments/{experiment_id}/stop")
def stop(experiment_id: str, _: AdminDep, store: StoreDep, bus: BusDep, body: StopBody | None = None) -> dict[str, Any]:
    with relay_when_done(store.factory, outbox, bus), _as_http():
        result = experiments.stop_experiment(experiment_id, store.uow(), reason=body.reason if body else "")
    return result


@router.post("/api/experiments/{experiment_id}/rollback")
def rollback_experiment(experiment_id: str, _: AdminDep, store: StoreDep, bus: BusDep) -> dict[str, Any]:
    """Restore the champion this experiment's promotion replaced."""
    with relay_when_done(store.factory, outbox, bus), _as_http():
        result = experiments.rollback_experiment(experiment_id, store.uow())
    return result


# --------------------------------------------------------------------------------------------------------
# Prompt registry
# --------------------------------------------------------------------------------------------------------


@router.get("/api/prompts")
def list_prompts(store: StoreDep) -> dict[str, Any]:
    return {"prompts": views.prompts_view(store.uow())}


@router.get("/api/prompts/{name}")
def get_prompt(name: str, store: StoreDep, settings: SettingsDep, generator: GeneratorDep) -> dict[str, Any]:
    """The prompt's registry entry, and its variant search: rounds, what each tried and learned, exhausted."""
    with _as_http():
        prompt = views.prompts_view(store.uow(), name)[0]
        return prompt | {"search": search.search_view(store.uow(), name, generator, settings)}


@router.post("/api/prompts/{name}/variants", status_code=201)
def generate_variants(
    name: str,
    _: AdminDep,
    store: StoreDep,
    settings: SettingsDep,
    generator: GeneratorDep,
    body: VariantsBody | None = None,
) -> dict[str, Any]:
    """Generate variants of the champion (OpenAI with a key, offline rewrites without) with the prompt's search
    history; 429 when rate limited, 409 when the search is exhausted."""
    try:
        with _as_http():
            return search.generate_variants(name, store.uow, generator, settings, count=body.count if body else None)
    except GenerationFailed as exc:
        raise HTTPException(502, str(exc)) from exc


@router.post("/api/prompts/{name}/versions", status_code=201)
def add_version(name: str, body: VersionBody, _: AdminDep, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Add a hand-written version (validated like a generated variant)."""
    with _as_http():
        return registry.add_version(
            name, body.template, store.uow(), settings, reason=body.reason, parent_version=body.parent_version
        )


@router.post("/api/prompts/{name}/versions/{version}/archive")
def archive_version(name: str, version: str, _: AdminDep, store: StoreDep) -> dict[str, Any]:
    with _as_http():
        return registry.archive_version(name, version, store.uow())


@router.post("/api/prompts/{name}/rollback")
def rollback_prompt(
    name: str, _: AdminDep, store: StoreDep, bus: BusDep, body: RollbackBody | None = None
) -> dict[str, Any]:
    """Restore an earlier champion (the previous one unless a version is given)."""
    with relay_when_done(store.factory, outbox, bus), _as_http():
        result = experiments.rollback_prompt(
            name, store.uow(), version=body.version if body else None, model=body.model if body else None
        )
    return result
