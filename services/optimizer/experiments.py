"""Experiment use cases: create (or queue) an experiment, the decision round that analyzes every running one
and acts on it (promote, conclude, pause or reweight the adaptive allocation), queued experiments starting when
their prompt is free, and the operator's promote, stop and rollback. Both rollbacks (of an experiment's
promotion, and of a prompt's champion) restore an earlier champion and stop the running experiment, whose
control is no longer the champion.

Commands: `spec_defaults`, `create_experiment`, `decide_experiment`, `run_decisions` (beat), `start_queued`,
`promote_experiment`, `stop_experiment`, `rollback_experiment`, `rollback_prompt`.
`require_experiment` and `evaluate` (analysis and live decision) are shared with the read models in views.py.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from typing import Any

from services.optimizer import domain
from services.optimizer.config import OptimizerSettings
from services.optimizer.registry import UowFactory, require_prompt, set_champion
from services.optimizer.stats.analysis import analyze
from services.optimizer.stats.bayesian import many_to_one_control_share, thompson_weights
from services.optimizer.stats.decision import (
    DECISION_INCONCLUSIVE,
    DECISION_KEEP_CONTROL,
    DECISION_SHIP,
    DECISION_UNHEALTHY,
    Decision,
    decide,
    futile_arms,
    guardrail_failures,
)
from services.optimizer.stats.results import Analysis, ArmData
from services.optimizer.store import ArmRow, ExperimentRow, SqlUnitOfWork
from shared.clock import as_utc
from shared.contracts import (
    AllocationChanged,
    ArmSpec,
    ExperimentConcluded,
    ExperimentStarted,
    PromptTemplate,
    derived_id,
    utcnow,
)

log = logging.getLogger(__name__)


def _seed_of(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------------------
# Create and start
# --------------------------------------------------------------------------------------------------------


#: The experiment options the service's settings give (a setting of the same name) where an experiment leaves
#: them unset.
SETTING_OPTIONS = (
    "metric",
    "alpha",
    "min_duration_s",
    "min_feedback_per_arm",
    "max_feedback_per_arm",
    "target_lift",
    "futility_alpha",
    "feedback_rate_grace_s",
)


def spec_defaults(settings: OptimizerSettings, **overrides: Any) -> dict[str, Any]:
    """Experiment options from the service's settings, with per-experiment overrides (None: the setting)."""
    base = {name: getattr(settings, name) for name in SETTING_OPTIONS}
    return base | {k: v for k, v in overrides.items() if v is not None}


def create_experiment(
    spec: domain.ExperimentSpec, uow: SqlUnitOfWork, now: datetime | None = None, *, queue_if_busy: bool = False
) -> dict[str, Any]:
    """Validate and start an experiment (or queue it behind the running one when `queue_if_busy`)."""
    now = now or utcnow()
    with uow:
        repo = uow.repo
        require_prompt(uow, spec.prompt_name)
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
                "futility_alpha": spec.futility_alpha,
                "feedback_rate_grace_s": spec.feedback_rate_grace_s,
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


def require_experiment(uow: SqlUnitOfWork, experiment_id: str) -> ExperimentRow:
    return domain.known(uow.repo.experiment(experiment_id), f"experiment {experiment_id}")


# --------------------------------------------------------------------------------------------------------
# Decisions: analyze, decide, act
# --------------------------------------------------------------------------------------------------------


def evaluate(
    uow: SqlUnitOfWork, exp: ExperimentRow, arms: list[ArmRow], now: datetime
) -> tuple[list[ArmData], Analysis, Decision]:
    """Analyze an experiment with the session as the unit: per-session aggregates of every arm (explanations
    a fallback wrote excluded from quality), the sessions of the recent half for the novelty check, and one
    segment per signal; the SRM check counts sessions against the weights each was assigned with."""
    started = exp["started_at"]
    end = exp["ended_at"] or now
    elapsed_s = max(0.0, (as_utc(end) - as_utc(started)).total_seconds()) if started else 0.0
    arm_ids = [a["arm_id"] for a in arms]
    rows = uow.repo.session_rows(exp["experiment_id"], started)
    grace_s = exp["feedback_rate_grace_s"]
    snapshot = domain.arm_snapshot(
        rows,
        arm_ids,
        recent_since=elapsed_s / 2 if elapsed_s > 0 else None,
        settled_until=elapsed_s - float(grace_s) if grace_s is not None else None,
    )
    data = snapshot.total
    history = domain.AllocationHistory([(int(s), dict(w)) for s, w in exp["allocation_history"] or []])
    total_sessions = sum(d.sessions or 0 for d in data)
    weights = history.average(total_sessions) or dict(exp["weights"])
    total_feedback = sum(d.n for d in data)
    per_day = total_feedback / (elapsed_s / 86400) if elapsed_s > 0 and total_feedback else None
    control = next((a["arm_id"] for a in arms if a["is_control"]), arms[0]["arm_id"] if arms else "control")
    config = domain.decision_config(exp)
    analysis = analyze(
        data,
        control,
        weights,
        metric=config.metric,
        alpha=config.alpha,
        target_lift=config.target_lift,
        min_lift=config.min_lift_to_ship,
        futility_alpha=config.futility_alpha,
        feedback_per_day=per_day,
        srm_threshold=config.srm_threshold,
        seed=_seed_of(exp["experiment_id"]),
        recent=snapshot.recent,
        segments=snapshot.segments,
    )
    served = {arm for arm, w in (exp["weights"] or {}).items() if float(w) > 0}
    return data, analysis, decide(analysis, config, elapsed_s=elapsed_s, served=served or None)


def _end(
    uow: SqlUnitOfWork,
    exp: ExperimentRow,
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


def _promote(uow: SqlUnitOfWork, exp: ExperimentRow, arm_id: str, reason: str, now: datetime) -> int | None:
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
        cid = set_champion(
            uow,
            name,
            arm["prompt_version"],
            arm["model"],
            kind="promotion",
            reason=f"won experiment {exp['experiment_id']} ({arm_id}): {reason}",
            experiment_id=exp["experiment_id"],
        )
        repo.update_experiment(exp["experiment_id"], promoted_champion_id=cid)
    _end(uow, exp, domain.CONCLUDED, DECISION_SHIP, arm_id, reason, now)
    return cid


def decide_experiment(
    experiment_id: str, uow: SqlUnitOfWork, settings: OptimizerSettings, now: datetime | None = None
) -> dict[str, Any]:
    """Look at one running experiment: analyze, decide, act (promote, conclude, pause or reweight)."""
    now = now or utcnow()
    with uow:
        repo = uow.repo
        exp = require_experiment(uow, experiment_id)
        if exp["status"] not in domain.ACTIVE_STATES:
            return {"experiment_id": experiment_id, "status": exp["status"], "action": "none"}
        arms = repo.arms(experiment_id)
        data, analysis, decision = evaluate(uow, exp, arms, now)
        repo.update_experiment(
            experiment_id, last_status=decision.status, last_reason=decision.reason, last_decided_at=now
        )
        action = "none"
        if exp["status"] == domain.AWAITING_APPROVAL:
            # The winner waits for an operator, traffic still split: keep checking what could invalidate it.
            fails = guardrail_failures(analysis, exp["winner_arm_id"] or "", domain.decision_config(exp))
            if decision.status == DECISION_UNHEALTHY:
                _end(uow, exp, domain.PAUSED, decision.status, None, decision.reason, now, archive_treatments=False)
                action = "paused"
            elif fails:
                reason = f"approval withdrawn: {exp['winner_arm_id']} no longer passes its guardrails: " + "; ".join(
                    fails
                )
                repo.update_experiment(experiment_id, status=domain.RUNNING, winner_arm_id=None, reason=reason)
                action = "approval_withdrawn"
        elif exp["status"] == domain.RUNNING:
            if decision.status == DECISION_SHIP and decision.arm_id is not None:
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
            elif decision.status in (DECISION_KEEP_CONTROL, DECISION_INCONCLUSIVE):
                _end(uow, exp, domain.CONCLUDED, decision.status, None, decision.reason, now)
                action = "concluded"
            elif decision.status == DECISION_UNHEALTHY:
                _end(uow, exp, domain.PAUSED, decision.status, None, decision.reason, now, archive_treatments=False)
                action = "paused"
            elif _reallocate(uow, exp, arms, data, analysis, settings):
                action = "reweighted"
        uow.commit()
    if action != "none":
        log.info("experiment %s: %s (%s)", experiment_id, action, decision.reason)
    return {"experiment_id": experiment_id, "decision": decision.status, "reason": decision.reason, "action": action}


def _reallocate(
    uow: SqlUnitOfWork,
    exp: ExperimentRow,
    arms: list[ArmRow],
    data: list[ArmData],
    analysis: Analysis,
    settings: OptimizerSettings,
) -> bool:
    """Fixed: only arms that can no longer win leave the split (`_drop_futile`). Adaptive: Thompson weights in
    batches, only after `adaptive_batch` new feedback events and once every arm has `adaptive_min_feedback_per_arm`;
    an arm whose always-valid interval lies below the target lift (futile) gets no more traffic. The history
    records, with each weight change, the number of sessions at that moment (the SRM check tests every session
    against the weights it was assigned with). Publishes AllocationChanged when the weights move."""
    if exp["allocation"] != "adaptive":
        return settings.drop_futile_arms and _drop_futile(uow, exp, data, analysis)
    total_feedback = sum(d.n for d in data)
    futile = futile_arms(analysis)
    dropped_now = any(float(exp["weights"].get(a, 0.0)) > 0 for a in futile)
    if total_feedback - int(exp["reweighted_at_feedback"] or 0) < settings.adaptive_batch and not dropped_now:
        return False
    control = next((a["arm_id"] for a in arms if a["is_control"]), None)
    new = thompson_weights(
        data,
        floor=settings.adaptive_floor,
        min_feedback_per_arm=settings.adaptive_min_feedback_per_arm,
        current=exp["weights"],
        seed=_seed_of(f"{exp['experiment_id']}:{len(exp['allocation_history'] or [])}"),
        metric=exp["metric"],
        control_id=control,
        # square-root rule: the control keeps just enough traffic for the many-to-one comparison
        control_share=many_to_one_control_share(len(data) - 1) if control else None,
        excluded=futile,
    )
    return _set_weights(uow, exp, data, new, {"reweighted_at_feedback": total_feedback})


def _drop_futile(uow: SqlUnitOfWork, exp: ExperimentRow, data: list[ArmData], analysis: Analysis) -> bool:
    """A fixed split stops serving an arm that can no longer win: once its always-valid interval lies below
    the target lift (the same `futile_arms` rule adaptive allocation applies), its weight goes to 0 and the
    arms still in the race keep their proportions among themselves. The decision never reads a futile arm
    (it cannot ship), so its users would be spent for nothing; the always-valid intervals of the other arms
    stay valid under the change, and the SRM check tests each session against the weights it was assigned
    with (`allocation_history`)."""
    weights = {arm: float(w) for arm, w in exp["weights"].items()}
    dropped = {a for a in futile_arms(analysis) if weights.get(a, 0.0) > 0}
    if not dropped:
        return False
    live = sum(w for arm, w in weights.items() if arm not in dropped)
    if live <= 0:
        return False
    new = {arm: (0.0 if arm in dropped else w / live) for arm, w in weights.items()}
    return _set_weights(uow, exp, data, new, {})


def _set_weights(
    uow: SqlUnitOfWork, exp: ExperimentRow, data: list[ArmData], new: dict[str, float], values: dict[str, Any]
) -> bool:
    """Record new weights (with the number of sessions at that moment in the history) and publish
    AllocationChanged, when they moved; `values` are stored either way."""
    changed = domain.weights_changed(exp["weights"], new)
    if changed:
        history = list(exp["allocation_history"] or [])
        history.append([sum(d.sessions or 0 for d in data), new])
        values = values | {"weights": new, "allocation_history": history}
        uow.add_events(
            AllocationChanged(
                message_id=derived_id("optimizer.allocation_changed", exp["experiment_id"], len(history)),
                experiment_id=exp["experiment_id"],
                weights=new,
            )
        )
    if values:
        uow.repo.update_experiment(exp["experiment_id"], **values)
    return changed


def start_queued(uow: SqlUnitOfWork, now: datetime | None = None) -> list[str]:
    """Start the oldest queued experiment of every prompt that has none running. A queued fine-tune
    experiment is re-based on the champion of the moment (its control, and its treatment's prompt)."""
    now = now or utcnow()
    started = []
    with uow:
        repo = uow.repo
        queued = sorted(repo.experiments(status=domain.QUEUED), key=lambda e: as_utc(e["created_at"]))
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
    """The beat's decision round: every running experiment is looked at (one awaiting approval too: its SRM and
    guardrails are re-checked); queued ones start when free."""
    now = now or utcnow()
    with uow_factory() as uow:
        running = [e["experiment_id"] for e in uow.repo.experiments(status=domain.RUNNING)]
        running += [e["experiment_id"] for e in uow.repo.experiments(status=domain.AWAITING_APPROVAL)]
    results = []
    for experiment_id in running:
        try:
            results.append(decide_experiment(experiment_id, uow_factory(), settings, now))
        except Exception:  # one broken experiment must not block the others
            log.exception("decision on %s failed", experiment_id)
    for experiment_id in start_queued(uow_factory(), now):
        results.append({"experiment_id": experiment_id, "action": "started"})
    return results


# --------------------------------------------------------------------------------------------------------
# Operator actions: promote, stop, roll back
# --------------------------------------------------------------------------------------------------------


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
        exp = require_experiment(uow, experiment_id)
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
            _, _, decision = evaluate(uow, exp, arms, now)
            if decision.status != DECISION_SHIP or decision.arm_id is None:
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
        exp = require_experiment(uow, experiment_id)
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
        exp = require_experiment(uow, experiment_id)
        if not exp["promoted_champion_id"]:
            raise domain.Conflict(f"experiment {experiment_id} promoted nothing; there is nothing to roll back")
        if exp["rolled_back"]:
            raise domain.Conflict(f"experiment {experiment_id} has already been rolled back")
        promoted = repo.champion_by_id(int(exp["promoted_champion_id"]))
        assert promoted is not None
        previous_version, previous_model = promoted["previous_version"], promoted["previous_model"]
        if not previous_version or not previous_model:  # both are set together (registry.set_champion)
            raise domain.Conflict("there is no earlier champion to restore")
        name = exp["prompt_name"]
        current = repo.champion(name)
        assert current is not None
        reason = (
            f"rollback of experiment {experiment_id}: restored {promoted['previous_version']} "
            f"({promoted['previous_model']}) in place of {current['version']}"
        )
        stopped = _stop_active_for(uow, name, "stopped by a rollback of the champion", now)
        cid = set_champion(uow, name, previous_version, previous_model, kind="rollback", reason=reason)
        repo.update_experiment(experiment_id, rolled_back=True)
        uow.commit()
    return {
        "experiment_id": experiment_id,
        "champion_id": cid,
        "champion": {"version": promoted["previous_version"], "model": promoted["previous_model"]},
        "reason": reason,
    } | ({"stopped_experiment": stopped} if stopped else {})


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
        current = require_prompt(uow, name)
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
        cid = set_champion(uow, name, target["version"], target["model"], kind="rollback", reason=reason)
        uow.commit()
    return {"champion_id": cid, "version": target["version"], "model": target["model"], "reason": reason} | (
        {"stopped_experiment": stopped} if stopped else {}
    )
