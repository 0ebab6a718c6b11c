"""Optimizer use cases. Each takes a message or a command and its dependencies, commits one unit of work, and
stages the events it caused (published from the outbox after the commit). Handlers of incoming events are
idempotent on the message id; events they stage have ids derived from what caused them, so a retry
republishes the same ids.

Registry: `ensure_seeded`, `add_version`, `archive_version`, `rollback_prompt`.
Experiments: `create_experiment`, `run_decisions` (beat), `decide_experiment`, `promote_experiment`,
`stop_experiment`, `rollback_experiment`, `on_model_registered`.
Feed: `on_explanation_created`, `on_feedback_recorded`, `on_feedback_erased`.
Variants: `generate_variants`, `auto_cycle` (beat: generate and start the next experiment).
Read models: `experiment_view`, `list_experiments`, `prompts_view`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from services.optimizer import domain, stats
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import GenerationFailed, VariantGenerator
from services.optimizer.store import SqlUnitOfWork
from shared.contracts import (
    AllocationChanged,
    ArmSpec,
    ChampionChanged,
    ExperimentConcluded,
    ExperimentStarted,
    ExplanationCreated,
    FeedbackErased,
    FeedbackRecorded,
    ModelRegistered,
    PromptTemplate,
    derived_id,
    utcnow,
)
from shared.prompts import PROMPT_NAME, SEED_PROMPT, TemplateError, check_template

log = logging.getLogger(__name__)

UowFactory = Callable[[], SqlUnitOfWork]


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _seed_of(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------


def _champion_event(uow: SqlUnitOfWork, champion_id: int) -> ChampionChanged:
    row = uow.repo.champion_by_id(champion_id)
    assert row is not None
    version = uow.repo.version(row["name"], row["version"])
    assert version is not None
    return ChampionChanged(
        message_id=derived_id("optimizer.champion_changed", row["name"], champion_id),
        prompt=PromptTemplate(name=row["name"], version=row["version"], template=version["template"]),
        model=row["model"],
        previous_version=row["previous_version"],
        reason=row["reason"],
    )


def ensure_seeded(uow: SqlUnitOfWork, model: str) -> bool:
    """Put the seed prompt v1.0 in the registry as champion with the default model, once. True if it did."""
    with uow:
        if uow.repo.prompt_names():
            return False
        uow.repo.add_version(
            {
                "name": SEED_PROMPT.name,
                "version": SEED_PROMPT.version,
                "template": SEED_PROMPT.template,
                "parent_version": None,
                "reason": "seed prompt",
                "source": "seed",
                "status": domain.VERSION_ACTIVE,
            }
        )
        cid = uow.repo.add_champion(
            {"name": SEED_PROMPT.name, "version": SEED_PROMPT.version, "model": model, "kind": "seed"}
            | {"reason": f"seed champion with the default model {model}"}
        )
        uow.add_events(_champion_event(uow, cid))
        uow.commit()
    log.info("seeded prompt %s %s with model %s", SEED_PROMPT.name, SEED_PROMPT.version, model)
    return True


def _require_prompt(uow: SqlUnitOfWork, name: str) -> dict[str, Any]:
    champion = uow.repo.champion(name)
    if champion is None:
        raise domain.NotFound(f"unknown prompt {name!r}")
    return champion


def add_version(
    name: str,
    template: str,
    uow: SqlUnitOfWork,
    settings: OptimizerSettings,
    *,
    reason: str = "hand-written",
    parent_version: str | None = None,
) -> dict[str, Any]:
    """Add a hand-written version (a candidate), validated like a generated variant."""
    try:
        check_template(template)
    except TemplateError as exc:
        raise domain.InvalidRequest(str(exc)) from exc
    with uow:
        champion = _require_prompt(uow, name)
        versions = uow.repo.versions(name)
        parent = parent_version or champion["version"]
        if parent not in {v["version"] for v in versions}:
            raise domain.InvalidRequest(f"unknown parent version {parent} of prompt {name!r}")
        problem = domain.variant_problem(
            template,
            [v["template"] for v in versions],
            min_chars=settings.min_variant_chars,
            max_chars=settings.max_variant_chars,
            duplicate_ratio=settings.near_duplicate_ratio,
        )
        if problem is not None:
            raise (domain.Conflict if "duplicate" in problem else domain.InvalidRequest)(problem)
        version = domain.next_version([v["version"] for v in versions], parent)
        uow.repo.add_version(
            {
                "name": name,
                "version": version,
                "template": template,
                "parent_version": parent,
                "reason": reason,
                "source": "manual",
                "status": domain.VERSION_CANDIDATE,
            }
        )
        row = uow.repo.version(name, version)
        uow.commit()
    assert row is not None
    return _version_view(row)


def archive_version(name: str, version: str, uow: SqlUnitOfWork) -> dict[str, Any]:
    with uow:
        champion = _require_prompt(uow, name)
        row = uow.repo.version(name, version)
        if row is None:
            raise domain.NotFound(f"unknown version {version} of prompt {name!r}")
        if version == champion["version"]:
            raise domain.Conflict(f"{version} is the champion; promote or roll back to another version first")
        if version in uow.repo.versions_in_active_experiments(name):
            raise domain.Conflict(f"{version} is in a running experiment; stop it first")
        uow.repo.set_version_status(name, version, domain.VERSION_ARCHIVED)
        uow.commit()
    return {"name": name, "version": version, "status": domain.VERSION_ARCHIVED}


def _set_champion(
    uow: SqlUnitOfWork,
    name: str,
    version: str,
    model: str,
    *,
    kind: str,
    reason: str,
    experiment_id: str | None = None,
) -> int:
    previous = uow.repo.champion(name)
    cid = uow.repo.add_champion(
        {
            "name": name,
            "version": version,
            "model": model,
            "kind": kind,
            "reason": reason,
            "experiment_id": experiment_id,
            "previous_version": previous["version"] if previous else None,
            "previous_model": previous["model"] if previous else None,
        }
    )
    uow.repo.set_version_status(name, version, domain.VERSION_ACTIVE)
    if previous and previous["version"] != version:
        uow.repo.set_version_status(name, previous["version"], domain.VERSION_ARCHIVED)
    uow.add_events(_champion_event(uow, cid))
    return cid


def _stop_active_for(uow: SqlUnitOfWork, name: str, reason: str, now: datetime) -> str | None:
    active = uow.repo.active_experiment(name)
    if active is None:
        return None
    _end(uow, active, domain.STOPPED, "stopped", None, reason, now, archive_treatments=False)
    return str(active["experiment_id"])


def rollback_prompt(
    name: str, uow: SqlUnitOfWork, now: datetime | None = None, *, version: str | None = None, model: str | None = None
) -> dict[str, Any]:
    """Make an earlier champion the champion again (the previous one by default). A running experiment of
    the prompt is stopped: its control is no longer the champion."""
    now = now or utcnow()
    with uow:
        current = _require_prompt(uow, name)
        history = uow.repo.champion_history(name)
        earlier = [h for h in history if (h["version"], h["model"]) != (current["version"], current["model"])]
        if not earlier:
            raise domain.Conflict(f"prompt {name!r} has no earlier champion to roll back to")
        # Both filters apply when given: a model asked for is never silently replaced by another one.
        matches = [
            h
            for h in earlier
            if (version is None or h["version"] == version) and (model is None or h["model"] == model)
        ]
        if not matches:
            wanted = " with ".join(
                part for part in (version, f"model {model}" if model is not None else None) if part is not None
            )
            raise domain.Conflict(f"{wanted} was never an earlier champion of prompt {name!r}")
        target = matches[-1]
        reason = f"rollback: restored {target['version']} ({target['model']}) in place of {current['version']}"
        stopped = _stop_active_for(uow, name, "stopped by a rollback of the champion", now)
        cid = _set_champion(uow, name, target["version"], target["model"], kind="rollback", reason=reason)
        uow.commit()
    return {"champion_id": cid, "version": target["version"], "model": target["model"], "reason": reason} | (
        {"stopped_experiment": stopped} if stopped else {}
    )


# --------------------------------------------------------------------------------------------------------
# Feed from the router and the feedback service
# --------------------------------------------------------------------------------------------------------


def on_explanation_created(event: ExplanationCreated, uow: SqlUnitOfWork) -> bool:
    """Count an exposure (with its cost and latency) for the arm that served it."""
    with uow:
        if uow.repo.seen(event.message_id):
            return False
        uow.repo.mark_seen(event.message_id)
        added = uow.repo.add_exposure(
            {
                "explanation_id": str(event.explanation_id),
                "experiment_id": event.experiment_id,
                "arm_id": event.arm_id,
                "prompt_name": event.prompt_name,
                "prompt_version": event.prompt_version,
                "model": event.model,
                "cost_usd": event.cost_usd,
                "latency_ms": event.latency_ms,
                "fallback_used": event.fallback_used,
                "created_at": event.created_at,
            }
        )
        uow.commit()
    return added


def on_feedback_recorded(event: FeedbackRecorded, uow: SqlUnitOfWork) -> str:
    """Count a vote for its arm; a replacing vote (same feedback_id) overwrites the earlier one, so it counts
    once. Returns stored, replaced, stale, erased or duplicate."""
    with uow:
        repo = uow.repo
        if repo.seen(event.message_id):
            return "duplicate"
        repo.mark_seen(event.message_id)
        erased_at = repo.vote_erased_at(event.feedback_id)
        if erased_at is not None and _aware(event.submitted_at) <= _aware(erased_at):
            uow.commit()  # the session asked to be forgotten after this vote: it stays forgotten
            return "erased"
        existing = repo.vote_submitted_at(event.feedback_id)
        if existing is not None and _aware(event.submitted_at) < _aware(existing):
            uow.commit()
            return "stale"
        repo.upsert_vote(
            {
                "feedback_id": str(event.feedback_id),
                "explanation_id": str(event.explanation_id),
                "experiment_id": event.experiment_id,
                "arm_id": event.arm_id,
                "rating": event.rating,
                "stars": event.stars,
                "submitted_at": event.submitted_at,
            },
            exists=existing is not None,
        )
        uow.commit()
    return "replaced" if existing is not None else "stored"


def on_feedback_erased(event: FeedbackErased, uow: SqlUnitOfWork) -> int:
    """Forget the erased votes (GDPR); returns how many were counted here."""
    with uow:
        if uow.repo.seen(event.message_id):
            return 0
        uow.repo.mark_seen(event.message_id)
        ids = [str(f) for f in event.feedback_ids]
        uow.repo.remember_erased(ids, event.erased_at)
        removed = uow.repo.delete_votes(ids)
        uow.commit()
    return removed


# --------------------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------------------


def spec_defaults(settings: OptimizerSettings, **overrides: Any) -> dict[str, Any]:
    """Experiment options from the service's settings, with per-experiment overrides."""
    base: dict[str, Any] = {
        "metric": settings.metric,
        "alpha": settings.alpha,
        "min_duration_s": settings.min_duration_s,
        "min_feedback_per_arm": settings.min_feedback_per_arm,
        "max_feedback_per_arm": settings.max_feedback_per_arm,
        "target_lift": settings.target_lift,
    }
    return base | {k: v for k, v in overrides.items() if v is not None}


def create_experiment(
    spec: domain.ExperimentSpec, uow: SqlUnitOfWork, now: datetime | None = None, *, queue_if_busy: bool = False
) -> dict[str, Any]:
    """Validate and start an experiment (or queue it behind the running one when `queue_if_busy`)."""
    now = now or utcnow()
    with uow:
        repo = uow.repo
        _require_prompt(uow, spec.prompt_name)
        versions = {v["version"]: v["status"] for v in repo.versions(spec.prompt_name)}
        planned = domain.plan_arms(spec, versions)
        active = repo.active_experiment(spec.prompt_name)
        if active is not None and not queue_if_busy:
            raise domain.Conflict(
                f"experiment {active['experiment_id']} is already running for prompt {spec.prompt_name!r}; "
                "stop it first (at most one runs per prompt)"
            )
        experiment_id = domain.new_experiment_id()
        weights = {a.arm_id: a.weight for a in planned}
        repo.add_experiment(
            {
                "experiment_id": experiment_id,
                "prompt_name": spec.prompt_name,
                "status": domain.QUEUED,
                "allocation": spec.allocation,
                "metric": spec.metric,
                "alpha": spec.alpha,
                "min_duration_s": spec.min_duration_s,
                "min_feedback_per_arm": spec.min_feedback_per_arm,
                "max_feedback_per_arm": spec.max_feedback_per_arm,
                "target_lift": spec.target_lift,
                "min_lift_to_ship": spec.min_lift_to_ship,
                "max_cost_ratio": spec.max_cost_ratio,
                "max_latency_ratio": spec.max_latency_ratio,
                "min_feedback_rate_ratio": spec.min_feedback_rate_ratio,
                "source": spec.source,
                "note": spec.note,
                "created_at": now,
                "weights": weights,
                "allocation_history": [],
                "reweighted_at_feedback": 0,
                "reason": "",
            },
            [
                {
                    "arm_id": a.arm_id,
                    "prompt_version": a.prompt_version,
                    "model": a.model,
                    "initial_weight": a.weight,
                    "is_control": a.is_control,
                }
                for a in planned
            ],
        )
        if active is None:
            _start(uow, experiment_id, now)
        uow.commit()
        row = repo.experiment(experiment_id)
    assert row is not None
    log.info("experiment %s %s for %s", experiment_id, row["status"], spec.prompt_name)
    return {"experiment_id": experiment_id, "status": row["status"]}


def _start(uow: SqlUnitOfWork, experiment_id: str, now: datetime) -> None:
    repo = uow.repo
    exp = repo.experiment(experiment_id)
    assert exp is not None
    arms = repo.arms(experiment_id)
    specs = []
    for a in arms:
        version = repo.version(exp["prompt_name"], a["prompt_version"])
        assert version is not None
        if version["status"] != domain.VERSION_ACTIVE:
            repo.set_version_status(exp["prompt_name"], a["prompt_version"], domain.VERSION_ACTIVE)
        specs.append(
            ArmSpec(
                arm_id=a["arm_id"],
                prompt=PromptTemplate(
                    name=exp["prompt_name"], version=a["prompt_version"], template=version["template"]
                ),
                model=a["model"],
                weight=float(exp["weights"][a["arm_id"]]),
                is_control=bool(a["is_control"]),
            )
        )
    repo.update_experiment(
        experiment_id,
        status=domain.RUNNING,
        started_at=now,
        allocation_history=[[0, dict(exp["weights"])]],
    )
    uow.add_events(
        ExperimentStarted(
            message_id=derived_id("optimizer.experiment_started", experiment_id),
            experiment_id=experiment_id,
            prompt_name=exp["prompt_name"],
            arms=specs,
            allocation=exp["allocation"],
        )
    )


def _require_experiment(uow: SqlUnitOfWork, experiment_id: str) -> dict[str, Any]:
    exp = uow.repo.experiment(experiment_id)
    if exp is None:
        raise domain.NotFound(f"unknown experiment {experiment_id}")
    return exp


def _evaluate(
    uow: SqlUnitOfWork, exp: dict[str, Any], arms: list[dict[str, Any]], now: datetime
) -> tuple[list[stats.ArmData], stats.Analysis, stats.Decision]:
    data = uow.repo.arm_data(exp["experiment_id"], [a["arm_id"] for a in arms])
    history = domain.AllocationHistory([(int(s), dict(w)) for s, w in exp["allocation_history"] or []])
    total_exposures = sum(d.exposures for d in data)
    weights = history.average(total_exposures) or dict(exp["weights"])
    started = exp["started_at"]
    end = exp["ended_at"] or now
    elapsed_s = max(0.0, (_aware(end) - _aware(started)).total_seconds()) if started else 0.0
    total_feedback = sum(d.n for d in data)
    per_day = total_feedback / (elapsed_s / 86400) if elapsed_s > 0 and total_feedback else None
    control = next((a["arm_id"] for a in arms if a["is_control"]), arms[0]["arm_id"] if arms else "control")
    config = domain.decision_config(exp)
    analysis = stats.analyze(
        data,
        control,
        weights,
        metric=config.metric,
        alpha=config.alpha,
        target_lift=config.target_lift,
        feedback_per_day=per_day,
        srm_threshold=config.srm_threshold,
        seed=_seed_of(exp["experiment_id"]),
    )
    return data, analysis, stats.decide(analysis, config, elapsed_s=elapsed_s)


def _end(
    uow: SqlUnitOfWork,
    exp: dict[str, Any],
    status: str,
    decision: str,
    winner_arm_id: str | None,
    reason: str,
    now: datetime,
    *,
    archive_treatments: bool = True,
) -> None:
    """End an experiment: record the decision, archive the treatments that did not win, tell the router."""
    repo = uow.repo
    name = exp["prompt_name"]
    was_live = exp["status"] in domain.ACTIVE_STATES
    champion = repo.champion(name)
    keep = {champion["version"]} if champion else set()
    # Treatments that lost are archived; those of an experiment stopped or paused without a verdict go back
    # to being candidates.
    untested_status = domain.VERSION_ARCHIVED if archive_treatments else domain.VERSION_CANDIDATE
    for a in repo.arms(exp["experiment_id"]):
        if a["prompt_version"] not in keep:
            repo.set_version_status(name, a["prompt_version"], untested_status)
    repo.update_experiment(
        exp["experiment_id"],
        status=status,
        ended_at=now,
        decision=decision,
        winner_arm_id=winner_arm_id,
        reason=reason,
    )
    if was_live:
        uow.add_events(
            ExperimentConcluded(
                message_id=derived_id("optimizer.experiment_concluded", exp["experiment_id"]),
                experiment_id=exp["experiment_id"],
                decision=decision,
                winner_arm_id=winner_arm_id,
                reason=reason,
            )
        )


def _promote(uow: SqlUnitOfWork, exp: dict[str, Any], arm_id: str, reason: str, now: datetime) -> int | None:
    """Make the arm champion, archive the losers, conclude. Returns the champion row id (None when the arm
    already is the champion)."""
    repo = uow.repo
    arm = next((a for a in repo.arms(exp["experiment_id"]) if a["arm_id"] == arm_id), None)
    if arm is None:
        raise domain.InvalidRequest(f"experiment {exp['experiment_id']} has no arm {arm_id!r}")
    name = exp["prompt_name"]
    current = repo.champion(name)
    cid = None
    if current is None or (current["version"], current["model"]) != (arm["prompt_version"], arm["model"]):
        cid = _set_champion(
            uow,
            name,
            arm["prompt_version"],
            arm["model"],
            kind="promotion",
            reason=f"won experiment {exp['experiment_id']} ({arm_id}): {reason}",
            experiment_id=exp["experiment_id"],
        )
        repo.update_experiment(exp["experiment_id"], promoted_champion_id=cid)
    _end(uow, exp, domain.CONCLUDED, stats.DECISION_SHIP, arm_id, reason, now)
    return cid


def decide_experiment(
    experiment_id: str, uow: SqlUnitOfWork, settings: OptimizerSettings, now: datetime | None = None
) -> dict[str, Any]:
    """Look at one running experiment: analyze, decide, act (promote, conclude, pause or reweight)."""
    now = now or utcnow()
    with uow:
        repo = uow.repo
        exp = _require_experiment(uow, experiment_id)
        if exp["status"] not in domain.ACTIVE_STATES:
            return {"experiment_id": experiment_id, "status": exp["status"], "action": "none"}
        arms = repo.arms(experiment_id)
        data, analysis, decision = _evaluate(uow, exp, arms, now)
        repo.update_experiment(
            experiment_id, last_status=decision.status, last_reason=decision.reason, last_decided_at=now
        )
        action = "none"
        if exp["status"] == domain.RUNNING:
            if decision.status == stats.DECISION_SHIP and decision.arm_id is not None:
                if settings.promotion_mode == "auto":
                    _promote(uow, exp, decision.arm_id, decision.reason, now)
                    action = "promoted"
                else:
                    repo.update_experiment(
                        experiment_id,
                        status=domain.AWAITING_APPROVAL,
                        winner_arm_id=decision.arm_id,
                        reason=decision.reason,
                    )
                    action = "awaiting_approval"
            elif decision.status in (stats.DECISION_KEEP_CONTROL, stats.DECISION_INCONCLUSIVE):
                _end(uow, exp, domain.CONCLUDED, decision.status, None, decision.reason, now)
                action = "concluded"
            elif decision.status == stats.DECISION_UNHEALTHY:
                _end(uow, exp, domain.PAUSED, decision.status, None, decision.reason, now, archive_treatments=False)
                action = "paused"
            elif exp["allocation"] == "adaptive" and _reweight(uow, exp, arms, data, settings):
                action = "reweighted"
        uow.commit()
    if action != "none":
        log.info("experiment %s: %s (%s)", experiment_id, action, decision.reason)
    return {"experiment_id": experiment_id, "decision": decision.status, "reason": decision.reason, "action": action}


def _reweight(
    uow: SqlUnitOfWork,
    exp: dict[str, Any],
    arms: list[dict[str, Any]],
    data: list[stats.ArmData],
    settings: OptimizerSettings,
) -> bool:
    """Top-two Thompson weights in batches: only after `adaptive_batch` new feedback events and once every
    arm has `adaptive_min_feedback_per_arm`; publishes AllocationChanged when the weights move."""
    total_feedback = sum(d.n for d in data)
    if total_feedback - int(exp["reweighted_at_feedback"] or 0) < settings.adaptive_batch:
        return False
    control = next((a["arm_id"] for a in arms if a["is_control"]), None)
    history = list(exp["allocation_history"] or [])
    new = stats.thompson_weights(
        data,
        floor=settings.adaptive_floor,
        min_feedback_per_arm=settings.adaptive_min_feedback_per_arm,
        current=exp["weights"],
        seed=_seed_of(f"{exp['experiment_id']}:{len(history)}"),
        metric=exp["metric"],
        control_id=control,
        # square-root rule: the control keeps just enough traffic for the many-to-one comparison
        control_share=stats.many_to_one_control_share(len(data) - 1) if control else None,
    )
    changed = domain.weights_changed(exp["weights"], new)
    values: dict[str, Any] = {"reweighted_at_feedback": total_feedback}
    if changed:
        history.append([sum(d.exposures for d in data), new])
        values |= {"weights": new, "allocation_history": history}
        uow.add_events(
            AllocationChanged(
                message_id=derived_id("optimizer.allocation_changed", exp["experiment_id"], len(history)),
                experiment_id=exp["experiment_id"],
                weights=new,
            )
        )
    uow.repo.update_experiment(exp["experiment_id"], **values)
    return changed


def start_queued(uow: SqlUnitOfWork, now: datetime | None = None) -> list[str]:
    """Start the oldest queued experiment of every prompt that has none running. A queued fine-tune
    experiment is re-based on the champion of the moment (its control, and its treatment's prompt)."""
    now = now or utcnow()
    started = []
    with uow:
        repo = uow.repo
        queued = sorted(repo.experiments(status=domain.QUEUED), key=lambda e: _aware(e["created_at"]))
        for exp in queued:
            name = exp["prompt_name"]
            if repo.active_experiment(name) is not None:
                continue
            champion = repo.champion(name)
            if exp["source"] == "finetune" and champion is not None:
                repo.rebase_arms(exp["experiment_id"], champion["version"], champion["model"])
            _start(uow, exp["experiment_id"], now)
            started.append(exp["experiment_id"])
        uow.commit()
    return started


def run_decisions(uow_factory: UowFactory, settings: OptimizerSettings, now: datetime | None = None) -> list[dict]:
    """The beat's decision round: every running experiment is looked at; queued ones start when free."""
    now = now or utcnow()
    with uow_factory() as uow:
        running = [e["experiment_id"] for e in uow.repo.experiments(status=domain.RUNNING)]
    results = []
    for experiment_id in running:
        try:
            results.append(decide_experiment(experiment_id, uow_factory(), settings, now))
        except Exception:  # one broken experiment must not block the others
            log.exception("decision on %s failed", experiment_id)
    for experiment_id in start_queued(uow_factory(), now):
        results.append({"experiment_id": experiment_id, "action": "started"})
    return results


def promote_experiment(
    experiment_id: str,
    uow: SqlUnitOfWork,
    now: datetime | None = None,
    *,
    arm_id: str | None = None,
) -> dict[str, Any]:
    """An operator's promotion: the arm given, else the winner awaiting approval, else the arm the rule
    would ship now. 409 when there is nothing to promote."""
    now = now or utcnow()
    with uow:
        exp = _require_experiment(uow, experiment_id)
        if exp["status"] not in domain.ACTIVE_STATES:
            raise domain.Conflict(f"experiment {experiment_id} is {exp['status']}; only a running one can promote")
        arms = uow.repo.arms(experiment_id)
        if arm_id is not None and arm_id not in {a["arm_id"] for a in arms}:
            raise domain.InvalidRequest(
                f"experiment {experiment_id} has no arm {arm_id!r} (arms: {', '.join(a['arm_id'] for a in arms)})"
            )
        if arm_id is not None:
            reason = f"promoted by an operator ({arm_id})"
        elif exp["status"] == domain.AWAITING_APPROVAL and exp["winner_arm_id"]:
            arm_id, reason = exp["winner_arm_id"], f"approved by an operator: {exp['reason']}"
        else:
            _, _, decision = _evaluate(uow, exp, arms, now)
            if decision.status != stats.DECISION_SHIP or decision.arm_id is None:
                raise domain.Conflict(
                    f"no winner to promote yet ({decision.status}: {decision.reason}); "
                    "pass arm_id to promote an arm anyway"
                )
            arm_id, reason = decision.arm_id, decision.reason
        cid = _promote(uow, exp, arm_id, reason, now)
        champion = uow.repo.champion(exp["prompt_name"])
        uow.commit()
    assert champion is not None
    return {
        "experiment_id": experiment_id,
        "promoted_arm_id": arm_id,
        "champion": {"version": champion["version"], "model": champion["model"]},
        "changed": cid is not None,
        "reason": reason,
    }


def stop_experiment(
    experiment_id: str, uow: SqlUnitOfWork, now: datetime | None = None, *, reason: str = ""
) -> dict[str, Any]:
    now = now or utcnow()
    with uow:
        exp = _require_experiment(uow, experiment_id)
        if exp["status"] in (domain.CONCLUDED, domain.STOPPED):
            raise domain.Conflict(f"experiment {experiment_id} has already ended ({exp['status']})")
        why = reason or "stopped by an operator"
        _end(uow, exp, domain.STOPPED, "stopped", None, why, now, archive_treatments=False)
        uow.commit()
    return {"experiment_id": experiment_id, "status": domain.STOPPED, "reason": why}


def rollback_experiment(experiment_id: str, uow: SqlUnitOfWork, now: datetime | None = None) -> dict[str, Any]:
    """Undo the promotion an experiment made: the champion it replaced is restored."""
    now = now or utcnow()
    with uow:
        repo = uow.repo
        exp = _require_experiment(uow, experiment_id)
        if not exp["promoted_champion_id"]:
            raise domain.Conflict(f"experiment {experiment_id} promoted nothing; there is nothing to roll back")
        if exp["rolled_back"]:
            raise domain.Conflict(f"experiment {experiment_id} has already been rolled back")
        promoted = repo.champion_by_id(int(exp["promoted_champion_id"]))
        assert promoted is not None
        if not promoted["previous_version"]:
            raise domain.Conflict("there is no earlier champion to restore")
        name = exp["prompt_name"]
        current = repo.champion(name)
        assert current is not None
        reason = (
            f"rollback of experiment {experiment_id}: restored {promoted['previous_version']} "
            f"({promoted['previous_model']}) in place of {current['version']}"
        )
        stopped = _stop_active_for(uow, name, "stopped by a rollback of the champion", now)
        cid = _set_champion(
            uow, name, promoted["previous_version"], promoted["previous_model"], kind="rollback", reason=reason
        )
        repo.update_experiment(experiment_id, rolled_back=True)
        uow.commit()
    return {
        "experiment_id": experiment_id,
        "champion_id": cid,
        "champion": {"version": promoted["previous_version"], "model": promoted["previous_model"]},
        "reason": reason,
    } | ({"stopped_experiment": stopped} if stopped else {})


def on_model_registered(
    event: ModelRegistered, uow_factory: UowFactory, settings: OptimizerSettings, now: datetime | None = None
) -> str:
    """A fine-tuned model was registered: test it (champion prompt) against the champion, shipping only
    with a relative lift of at least `finetune_min_lift` (the plan: 10%+). Queued if an experiment runs."""
    now = now or utcnow()
    with uow_factory() as uow:
        if uow.repo.seen(event.message_id):
            return "duplicate"
        champion = uow.repo.champion(PROMPT_NAME)
        if champion is None:
            return "no champion"
        if champion["model"] == event.model:
            _mark_seen(uow, event)
            return "already champion"
    spec = domain.ExperimentSpec(
        prompt_name=PROMPT_NAME,
        arms=(
            domain.ArmIn(champion["version"], champion["model"], 0.5, True),
            domain.ArmIn(champion["version"], event.model, 0.5, False),
        ),
        min_lift_to_ship=settings.finetune_min_lift,
        # A local model on a CPU is slower than a hosted API by design; cost and quality decide here.
        max_latency_ratio=None,
        source="finetune",
        note=f"fine-tuned model {event.model_id} ({event.model}, base {event.base_model})",
        **spec_defaults(settings),
    )
    created = create_experiment(spec, uow_factory(), now, queue_if_busy=True)
    _mark_seen(uow_factory(), event)
    return f"experiment {created['experiment_id']} {created['status']}"


def _mark_seen(uow: SqlUnitOfWork, event: ModelRegistered) -> None:
    with uow:
        if not uow.repo.seen(event.message_id):
            uow.repo.mark_seen(event.message_id)
        uow.commit()


# --------------------------------------------------------------------------------------------------------
# Variant generation
# --------------------------------------------------------------------------------------------------------


def _rate_limit(uow: SqlUnitOfWork, name: str, settings: OptimizerSettings, now: datetime) -> None:
    last = uow.repo.last_generation(name)
    if last is None:
        return
    wait = settings.generation_min_interval_s - (now - _aware(last["at"])).total_seconds()
    if wait > 0:
        raise domain.RateLimited(
            f"variants of {name!r} were generated at {_aware(last['at']).isoformat()}; the next generation is "
            f"allowed in {math.ceil(wait)} s (at most one per {settings.generation_min_interval_s:g} s)",
            retry_after_s=wait,
        )


def generate_variants(
    name: str,
    uow_factory: UowFactory,
    generator: VariantGenerator,
    settings: OptimizerSettings,
    now: datetime | None = None,
    *,
    count: int | None = None,
) -> dict[str, Any]:
    """Ask the generator for variants of the champion, keep those that pass the guardrails as candidate
    versions (lineage: parent = champion, reason = the generator's rationale), record the cost. Rate
    limited per prompt (RateLimited carries the wait); the provider call runs outside any transaction."""
    now = now or utcnow()
    count = count or settings.generation_count
    with uow_factory() as uow:
        champion = _require_prompt(uow, name)
        _rate_limit(uow, name, settings, now)
        parent = uow.repo.version(name, champion["version"])
        assert parent is not None
    result = generator.generate(parent["template"], count)
    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    with uow_factory() as uow:
        repo = uow.repo
        _rate_limit(uow, name, settings, now)  # another generation may have won the race meanwhile
        existing = repo.versions(name)
        templates = [v["template"] for v in existing]
        numbers = [v["version"] for v in existing]
        generation_id = repo.add_generation(
            {
                "prompt_name": name,
                "at": now,
                "source": result.source,
                "model": result.model,
                "parent_version": champion["version"],
                "requested": count,
                "accepted": [],
                "rejected": [],
                "cost_usd": result.cost_usd,
                "tokens_in": result.tokens_in,
                "tokens_out": result.tokens_out,
            }
        )
        for cand in result.candidates:
            problem = domain.variant_problem(
                cand.template,
                templates,
                min_chars=settings.min_variant_chars,
                max_chars=settings.max_variant_chars,
                duplicate_ratio=settings.near_duplicate_ratio,
            )
            if problem is not None:
                rejected.append({"reason": problem, "rationale": cand.rationale, "preview": cand.template[:200]})
                continue
            version = domain.next_version(numbers, champion["version"])
            repo.add_version(
                {
                    "name": name,
                    "version": version,
                    "template": cand.template,
                    "parent_version": champion["version"],
                    "reason": f"{result.source}: {cand.rationale}",
                    "source": result.source,
                    "status": domain.VERSION_CANDIDATE,
                    "generation_id": generation_id,
                }
            )
            templates.append(cand.template)
            numbers.append(version)
            row = repo.version(name, version)
            assert row is not None
            accepted.append(_version_view(row))
        repo.finish_generation(generation_id, [v["version"] for v in accepted], rejected)
        uow.commit()
    log.info("generated %d variants of %s (%d rejected)", len(accepted), name, len(rejected))
    return {
        "generation_id": generation_id,
        "prompt_name": name,
        "parent_version": champion["version"],
        "source": result.source,
        "model": result.model,
        "cost_usd": result.cost_usd,
        "tokens_in": result.tokens_in,
        "tokens_out": result.tokens_out,
        "accepted": accepted,
        "rejected": rejected,
    }


def auto_cycle(
    uow_factory: UowFactory,
    generator: VariantGenerator,
    settings: OptimizerSettings,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The self-learning loop's beat: for every prompt with no experiment running or queued, take the
    untested candidates descended from the champion (generating new ones when there are none and the rate
    limit allows) and start the next experiment: champion as control, candidates as treatments."""
    now = now or utcnow()
    out: list[dict[str, Any]] = []
    if not settings.auto_experiment:
        return out
    with uow_factory() as uow:
        names = uow.repo.prompt_names()
    for name in names:
        with uow_factory() as uow:
            repo = uow.repo
            busy = repo.active_experiment(name) is not None or any(
                e["prompt_name"] == name for e in repo.experiments(status=domain.QUEUED)
            )
            champion = repo.champion(name)
            if busy or champion is None:
                continue
            tested = repo.tested_versions(name)
            candidates = [
                v["version"]
                for v in repo.versions(name)
                if v["status"] == domain.VERSION_CANDIDATE
                and v["parent_version"] == champion["version"]
                and v["version"] not in tested
            ]
        generated = None
        if not candidates:
            try:
                generated = generate_variants(name, uow_factory, generator, settings, now)
            except domain.RateLimited as exc:
                out.append({"prompt_name": name, "action": "waiting", "reason": str(exc)})
                continue
            except GenerationFailed as exc:
                log.warning("variant generation for %s failed: %s", name, exc)
                out.append({"prompt_name": name, "action": "generation_failed", "reason": str(exc)})
                continue
            candidates = [v["version"] for v in generated["accepted"]]
        if not candidates:
            out.append({"prompt_name": name, "action": "no_candidates", "reason": "every variant was rejected"})
            continue
        chosen = candidates[: settings.generation_count]
        spec = domain.ExperimentSpec(
            prompt_name=name,
            arms=(domain.ArmIn(champion["version"], champion["model"], None, True),)
            + tuple(domain.ArmIn(v, champion["model"], None, False) for v in chosen),
            allocation=settings.auto_allocation,
            source="auto",
            note=f"automatic: champion {champion['version']} against {', '.join(chosen)}",
            **spec_defaults(settings),
        )
        try:
            created = create_experiment(spec, uow_factory(), now)
        except domain.OptimizerError as exc:
            out.append({"prompt_name": name, "action": "not_started", "reason": str(exc)})
            continue
        out.append({"prompt_name": name, "action": "started", **created, "generated": generated is not None})
    return out


# --------------------------------------------------------------------------------------------------------
# Read models
# --------------------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe: tuples to lists, non-finite floats to None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, tuple | list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _iso(ts: datetime | None) -> str | None:
    return _aware(ts).isoformat() if ts else None


def _version_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": row["version"],
        "template": row["template"],
        "parent_version": row["parent_version"],
        "reason": row["reason"],
        "source": row["source"],
        "status": row["status"],
        "created_at": _iso(row["created_at"]),
    }


def _experiment_summary(exp: dict[str, Any], arms: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "experiment_id": exp["experiment_id"],
        "prompt_name": exp["prompt_name"],
        "status": exp["status"],
        "source": exp["source"],
        "note": exp["note"],
        "allocation": exp["allocation"],
        "created_at": _iso(exp["created_at"]),
        "started_at": _iso(exp["started_at"]),
        "ended_at": _iso(exp["ended_at"]),
        "decision": exp["decision"] or exp["last_status"],
        "winner_arm_id": exp["winner_arm_id"],
        "reason": exp["reason"] or exp["last_reason"] or "",
        "rolled_back": bool(exp["rolled_back"]),
        "weights": exp["weights"],
        "arms": [
            {
                "arm_id": a["arm_id"],
                "prompt_version": a["prompt_version"],
                "model": a["model"],
                "is_control": bool(a["is_control"]),
                "weight": float(exp["weights"].get(a["arm_id"], a["initial_weight"])),
            }
            for a in arms
        ],
    }


def list_experiments(uow: SqlUnitOfWork, status: str | None = None) -> list[dict[str, Any]]:
    with uow:
        return [_experiment_summary(e, uow.repo.arms(e["experiment_id"])) for e in uow.repo.experiments(status)]


def experiment_view(experiment_id: str, uow: SqlUnitOfWork, now: datetime | None = None) -> dict[str, Any]:
    """Configuration, per-arm analysis and the decision (the live one while running, the final one after)."""
    now = now or utcnow()
    with uow:
        exp = _require_experiment(uow, experiment_id)
        arms = uow.repo.arms(experiment_id)
        _, analysis, live = _evaluate(uow, exp, arms, now)
    by_arm = {a["arm_id"]: a for a in arms}
    arm_views = []
    for result in analysis.arms:
        a = by_arm[result.arm_id]
        arm_views.append(
            {
                "arm_id": result.arm_id,
                "prompt_version": a["prompt_version"],
                "model": a["model"],
                "is_control": bool(a["is_control"]),
                "weight": float(exp["weights"].get(result.arm_id, a["initial_weight"])),
                **{k: v for k, v in asdict(result).items() if k not in ("arm_id", "is_control")},
            }
        )
    ended = exp["status"] not in domain.ACTIVE_STATES and exp["status"] != domain.QUEUED
    decision = (
        {"status": exp["decision"], "arm_id": exp["winner_arm_id"], "reason": exp["reason"], "final": True}
        if ended or exp["status"] == domain.AWAITING_APPROVAL
        else {"status": live.status, "arm_id": live.arm_id, "reason": live.reason, "final": False}
    )
    return _clean(
        {
            **_experiment_summary(exp, arms),
            "config": {
                "metric": exp["metric"],
                "alpha": exp["alpha"],
                "min_duration_s": exp["min_duration_s"],
                "min_feedback_per_arm": exp["min_feedback_per_arm"],
                "max_feedback_per_arm": exp["max_feedback_per_arm"],
                "target_lift": exp["target_lift"],
                "min_lift_to_ship": exp["min_lift_to_ship"],
                "guardrails": {
                    "max_cost_ratio": exp["max_cost_ratio"],
                    "max_latency_ratio": exp["max_latency_ratio"],
                    "min_feedback_rate_ratio": exp["min_feedback_rate_ratio"],
                },
            },
            "analysis": {
                "status": analysis.status,
                "metric": analysis.metric,
                "control_id": analysis.control_id,
                "alpha": analysis.alpha,
                "srm": {"p_value": analysis.srm_p_value, "flagged": analysis.srm_flag},
                "p_value_kind": "always-valid (mSPRT), Holm-corrected across treatments",
                "arms": arm_views,
            },
            "decision": decision,
        }
    )


def prompts_view(uow: SqlUnitOfWork, name: str | None = None) -> list[dict[str, Any]]:
    """Every prompt: its versions with lineage and status, the champion, the champion history, generations."""
    with uow:
        repo = uow.repo
        names = [name] if name else repo.prompt_names()
        out = []
        for n in names:
            champion = repo.champion(n)
            if champion is None:
                raise domain.NotFound(f"unknown prompt {n!r}")
            out.append(
                {
                    "name": n,
                    "champion": {
                        "version": champion["version"],
                        "model": champion["model"],
                        "since": _iso(champion["since"]),
                        "reason": champion["reason"],
                    },
                    "versions": [_version_view(v) for v in repo.versions(n)],
                    "champion_history": [
                        {
                            "version": h["version"],
                            "model": h["model"],
                            "kind": h["kind"],
                            "reason": h["reason"],
                            "experiment_id": h["experiment_id"],
                            "previous_version": h["previous_version"],
                            "since": _iso(h["since"]),
                        }
                        for h in repo.champion_history(n)
                    ],
                    "generations": [
                        {
                            "id": g["id"],
                            "at": _iso(g["at"]),
                            "source": g["source"],
                            "model": g["model"],
                            "parent_version": g["parent_version"],
                            "accepted": g["accepted"],
                            "rejected": len(g["rejected"] or []),
                            "cost_usd": g["cost_usd"],
                        }
                        for g in repo.generations(n, limit=20)
                    ],
                }
            )
    return out
