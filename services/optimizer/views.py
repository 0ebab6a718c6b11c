"""Read models of the optimizer: JSON-safe views of experiments (configuration, per-arm analysis, the live or
final decision) and of the prompt registry (versions with lineage, champion and its history, generations).
They read through one unit of work and change nothing.

Views: `list_experiments`, `experiment_view`, `prompts_view`.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from datetime import datetime
from typing import Any

from services.optimizer import domain
from services.optimizer.experiments import evaluate, require_experiment
from services.optimizer.registry import iso, require_prompt, version_view
from services.optimizer.store import ArmRow, ExperimentRow, SqlUnitOfWork
from shared.contracts import utcnow


def _clean(value: Any) -> Any:
    """JSON-safe: tuples to lists, non-finite floats to None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, tuple | list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _experiment_summary(exp: ExperimentRow, arms: list[ArmRow]) -> dict[str, Any]:
    return {
        "experiment_id": exp["experiment_id"],
        "prompt_name": exp["prompt_name"],
        "status": exp["status"],
        "source": exp["source"],
        "note": exp["note"],
        "allocation": exp["allocation"],
        "created_at": iso(exp["created_at"]),
        "started_at": iso(exp["started_at"]),
        "ended_at": iso(exp["ended_at"]),
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
        exp = require_experiment(uow, experiment_id)
        arms = uow.repo.arms(experiment_id)
        _, analysis, live = evaluate(uow, exp, arms, now)
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
                "futility_alpha": exp["futility_alpha"],
                "min_lift_to_ship": exp["min_lift_to_ship"],
                "guardrails": {
                    "max_cost_ratio": exp["max_cost_ratio"],
                    "max_latency_ratio": exp["max_latency_ratio"],
                    "min_feedback_rate_ratio": exp["min_feedback_rate_ratio"],
                    "feedback_rate_grace_s": exp["feedback_rate_grace_s"],
                },
            },
            "analysis": {
                "status": analysis.status,
                "metric": analysis.metric,
                "control_id": analysis.control_id,
                "alpha": analysis.alpha,
                "srm": {
                    "p_value": analysis.srm_p_value,
                    "flagged": analysis.srm_flag,
                    "unit": analysis.srm_unit,
                    "p_value_fixed": analysis.srm_p_value_fixed,
                },
                "unit": "session",
                "variance": "session-clustered (delta method): design_effect = clustered / independent variance",
                "p_value_kind": "always-valid (mSPRT), Bonferroni-corrected across treatments",
                "interval_kind": "always-valid confidence sequence, Bonferroni-corrected across treatments "
                "(the interval the decision uses: ship when it lies above the minimum lift)",
                "power_kind": "of the always-valid test that decides, at the target lift (a lower bound under "
                "continuous monitoring)",
                "target_lift": analysis.target_lift,
                "min_lift": analysis.min_lift,
                "arms": arm_views,
                "segments": {
                    "by": "signal",
                    "correction": "Holm over segments x treatments (p-values); Bonferroni (intervals)",
                    "note": "segments inform; they never drive shipping",
                    "results": [asdict(seg) for seg in analysis.segments],
                    "disagreeing": [f"{seg.arm_id} on {seg.segment}" for seg in analysis.segments if seg.disagrees],
                },
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
            champion = require_prompt(uow, n)
            out.append(
                {
                    "name": n,
                    "champion": {
                        "version": champion["version"],
                        "model": champion["model"],
                        "since": iso(champion["since"]),
                        "reason": champion["reason"],
                    },
                    "versions": [version_view(v) for v in repo.versions(n)],
                    "champion_history": [
                        {
                            "version": h["version"],
                            "model": h["model"],
                            "kind": h["kind"],
                            "reason": h["reason"],
                            "experiment_id": h["experiment_id"],
                            "previous_version": h["previous_version"],
                            "since": iso(h["since"]),
                        }
                        for h in repo.champion_history(n)
                    ],
                    "generations": [
                        {
                            "id": g["id"],
                            "at": iso(g["at"]),
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
