"""Prompt registry use cases: the versions of each prompt (seeded, hand-written, generated) with their lineage
and status, and the champion with its history. It is the bottom of the optimizer's use-case modules (it
imports none of them): experiments.py, views.py and handlers.py use its champion helpers (`set_champion`,
`require_prompt`) and small shared helpers (`UowFactory`, `iso`, `version_view`).

Commands: `ensure_seeded`, `add_version`, `archive_version`.
Variants: `generate_variants` (ask the generator, with the prompt's search history when the caller has it, and
keep the variants that pass the guardrails as candidates; a proposal that repeats an existing version or an
earlier rejected one is rejected as a repeat; `SearchExhausted` when the generator has nothing left). The
history itself is read in search.py, which also decides when the search is exhausted and announces it.
Rolling the champion back stops the running experiment, so `rollback_prompt` lives in experiments.py; the
read model of the registry, `prompts_view`, in views.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from services.optimizer import domain
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import SearchHistory, VariantGenerator, fingerprint
from services.optimizer.store import ChampionRow, PromptVersionRow, SqlUnitOfWork
from shared.clock import as_utc
from shared.contracts import ChampionChanged, PromptTemplate, derived_id, utcnow
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


# --------------------------------------------------------------------------------------------------------
# Variant generation
# --------------------------------------------------------------------------------------------------------


def _rate_limit(uow: SqlUnitOfWork, name: str, settings: OptimizerSettings, now: datetime) -> None:
    last = uow.repo.last_generation(name)
    if last is None:
        return
    wait = settings.generation_min_interval_s - (now - as_utc(last["at"])).total_seconds()
    if wait > 0:
        raise domain.RateLimited(
            f"variants of {name!r} were generated at {as_utc(last['at']).isoformat()}; the next generation is "
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
    history: SearchHistory | None = None,
) -> dict[str, Any]:
    """Ask the generator for variants of the champion, keep those that pass the guardrails as candidate
    versions (lineage: parent = champion, reason = the generator's rationale), record the cost. Rate
    limited per prompt (RateLimited carries the wait); the provider call runs outside any transaction.
    With a `history` the generator sees what was tried; a generator with nothing left raises
    SearchExhausted and records no generation."""
    now = now or utcnow()
    count = count or settings.generation_count
    with uow_factory() as uow:
        champion = require_prompt(uow, name)
        _rate_limit(uow, name, settings, now)
        parent = uow.repo.version(name, champion["version"])
        assert parent is not None
    result = generator.generate(parent["template"], count, history)
    if result.exhausted and not result.candidates:
        raise SearchExhausted(f"the search for better versions of {name!r} is exhausted: {result.note}")
    repeats = _known_proposals(history)
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
            key = fingerprint(cand.template)
            problem = repeats.get(key) or domain.variant_problem(
                cand.template,
                templates,
                min_chars=settings.min_variant_chars,
                max_chars=settings.max_variant_chars,
                duplicate_ratio=settings.near_duplicate_ratio,
            )
            if problem is not None:
                rejected.append(
                    {"reason": problem, "rationale": cand.rationale, "preview": cand.template[:200], "fingerprint": key}
                )
                repeats.setdefault(key, f"repeats a proposal rejected before ({problem})")
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
            repeats[key] = f"repeats {version}, added in the same generation"
            row = repo.version(name, version)
            assert row is not None
            accepted.append(version_view(row))
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
        "note": result.note,
    }


def _known_proposals(history: SearchHistory | None) -> dict[str, str]:
    """fingerprint -> why a proposal with it is a repeat: an existing version (and how it fared), or a
    proposal the guardrails rejected before."""
    if history is None:
        return {}
    out = {r.fingerprint: f"repeats a proposal rejected before ({r.reason})" for r in history.rejected if r.fingerprint}
    for v in history.versions:
        out[fingerprint(v.template)] = f"repeats {v.version} ({v.outcome})"
    return out
