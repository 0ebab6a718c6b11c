"""Prompt registry use cases: the versions of each prompt (seeded, hand-written, generated) with their lineage
and status, and the champion with its history. It is the bottom of the optimizer's use-case modules (it
imports none of them): experiments.py, views.py and handlers.py use its champion helpers (`set_champion`,
`require_prompt`) and small shared helpers (`UowFactory`, `iso`, `version_view`).

Commands: `ensure_seeded`, `add_version`, `archive_version`. Generated versions are added by the search
(search.py: `generate_variants`), which owns the history a generator is shown.
Rolling the champion back stops the running experiment, so `rollback_prompt` lives in experiments.py; the
read model of the registry, `prompts_view`, in views.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from services.optimizer import domain
from services.optimizer.config import OptimizerSettings
from services.optimizer.store import ChampionRow, PromptVersionRow, SqlUnitOfWork
from shared.clock import as_utc
from shared.contracts import ChampionChanged, PromptTemplate, derived_id
from shared.prompts import SEED_PROMPT, TemplateError, check_template

log = logging.getLogger(__name__)


class SearchExhausted(domain.Conflict):
    """The generator has nothing left to propose for this champion (409): the search stops instead of
    spinning until the champion changes or someone adds a version by hand."""


UowFactory = Callable[[], SqlUnitOfWork]


def iso(ts: datetime | None) -> str | None:
    return as_utc(ts).isoformat() if ts else None


def version_view(row: PromptVersionRow) -> dict[str, Any]:
    return {
        "version": row["version"],
        "template": row["template"],
        "parent_version": row["parent_version"],
        "reason": row["reason"],
        "source": row["source"],
        "status": row["status"],
        "created_at": iso(row["created_at"]),
    }


# --------------------------------------------------------------------------------------------------------
# Versions and the champion
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


def require_prompt(uow: SqlUnitOfWork, name: str) -> ChampionRow:
    return domain.known(uow.repo.champion(name), f"prompt {name!r}")


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
        champion = require_prompt(uow, name)
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
    return version_view(row)


def archive_version(name: str, version: str, uow: SqlUnitOfWork) -> dict[str, Any]:
    with uow:
        champion = require_prompt(uow, name)
        domain.known(uow.repo.version(name, version), f"version {version} of prompt {name!r}")
        if version == champion["version"]:
            raise domain.Conflict(f"{version} is the champion; promote or roll back to another version first")
        if version in uow.repo.versions_in_active_experiments(name):
            raise domain.Conflict(f"{version} is in a running experiment; stop it first")
        uow.repo.set_version_status(name, version, domain.VERSION_ARCHIVED)
        uow.commit()
    return {"name": name, "version": version, "status": domain.VERSION_ARCHIVED}


def set_champion(
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
