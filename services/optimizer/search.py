"""The variant search of a prompt, as a whole: what every round tried and what it learned, the history a
generator is given, and when the search is exhausted.

- `load_history`: the prompt's `SearchHistory` (every version with the result of its latest experiment, the
  proposals the guardrails rejected and why, how many generations in a row added nothing) read through the
  real analysis of each experiment (`experiments.evaluate`, the same numbers `GET /api/experiments/{id}`
  shows).
- `generate_variants`: ask the generator for variants with that history and keep those the guardrails pass as
  candidate versions; SearchExhausted when the generator has nothing left or `generation_patience`
  generations in a row for this champion added nothing.
- `announce_exhausted` / `already_announced`: the SearchExhausted event, staged once per state of the search
  (champion and number of versions); the dashboard turns it into an alert. Its id is derived from that state
  and remembered in the processed-message log, so the beat's next checks neither publish it again nor call
  the generator.
- `search_view`: the latest rounds with what each tried and learned, the rejected proposals, and whether the
  search is exhausted (`GET /api/prompts/{name}` carries it as "search"; a public GET, so it analyses at most
  the latest VIEW_ROUNDS experiments).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Any

from services.optimizer import domain
from services.optimizer.config import OptimizerSettings
from services.optimizer.experiments import evaluate
from services.optimizer.generation import (
    OUTCOME_CHAMPION,
    OUTCOME_LOST,
    OUTCOME_STOPPED,
    OUTCOME_TESTING,
    OUTCOME_UNTESTED,
    OUTCOME_WON,
    RejectedProposal,
    SearchHistory,
    TriedVersion,
    VariantGenerator,
    fingerprint,
)
from services.optimizer.registry import SearchExhausted, UowFactory, iso, require_prompt, version_view
from services.optimizer.stats.decision import DECISION_INCONCLUSIVE, DECISION_SHIP
from services.optimizer.stats.results import ArmResult
from services.optimizer.store import SqlUnitOfWork
from shared.clock import as_utc
from shared.contracts import SearchExhausted as SearchExhaustedEvent
from shared.contracts import derived_id, utcnow
from shared.rows import from_row

log = logging.getLogger(__name__)

OUTCOME_REPLACED = "replaced"  # was champion, replaced by a winner or a rollback
REJECTED_KEPT = 50  # latest rejected proposals a generator is shown (deduplicated)
VIEW_ROUNDS = 20  # rounds the public view analyses and shows (the latest): a GET must stay cheap


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _json_safe(value: Any) -> Any:
    """Tuples to lists, non-finite floats to None (an interval may be unbounded early on)."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, tuple | list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _survey(
    uow: SqlUnitOfWork, name: str, now: datetime, *, analyze_last: int | None = None
) -> tuple[SearchHistory, list[dict[str, Any]]]:
    """One pass over the prompt's registry and experiments: the history and the rounds (oldest first).
    `analyze_last`: analyse only the latest rounds (the public view; older rounds keep their verdicts)."""
    repo = uow.repo
    champion = require_prompt(uow, name)
    versions = repo.versions(name)
    facts: dict[str, dict[str, Any]] = {}
    rounds: list[dict[str, Any]] = []
    experiments = sorted(repo.experiments(prompt_name=name), key=lambda e: as_utc(e["created_at"]))
    first_analyzed = 0 if analyze_last is None else max(0, len(experiments) - analyze_last)
    for index, exp in enumerate(experiments):
        arms = repo.arms(exp["experiment_id"])
        control = next((a for a in arms if a["is_control"]), None)
        if control is None:
            continue
        results: dict[str, ArmResult] = {}
        if exp["started_at"] is not None and index >= first_analyzed:
            _, analysis, _ = evaluate(uow, exp, arms, now)
            results = {r.arm_id: r for r in analysis.arms}
        tried = []
        for a in arms:
            r = results.get(a["arm_id"])
            if a["is_control"] or a["prompt_version"] == control["prompt_version"]:
                continue  # a model comparison on the same prompt says nothing about the prompt
            if exp["status"] in (domain.RUNNING, domain.AWAITING_APPROVAL, domain.QUEUED):
                outcome = OUTCOME_TESTING
            elif exp["status"] in (domain.STOPPED, domain.PAUSED):
                outcome = OUTCOME_STOPPED
            elif exp["decision"] == DECISION_SHIP and exp["winner_arm_id"] == a["arm_id"]:
                outcome = OUTCOME_WON
            else:
                outcome = OUTCOME_LOST
            ci = r.lift_ci_sequential if r is not None else None
            fact: dict[str, Any] = {
                "outcome": outcome,
                "experiment_id": exp["experiment_id"],
                "control_version": control["prompt_version"],
                "rate": _finite(r.rate) if r is not None else None,
                "n": r.n if r is not None else 0,
                "lift": _finite(r.lift) if r is not None else None,
                "diff_ci": (float(ci[0]), float(ci[1])) if ci is not None else None,
            }
            facts[a["prompt_version"]] = fact
            tried.append({"version": a["prompt_version"], "arm_id": a["arm_id"], **fact})
        control_result = results.get(control["arm_id"])
        rounds.append(
            {
                "experiment_id": exp["experiment_id"],
                "status": exp["status"],
                "decision": exp["decision"] or exp["last_status"],
                "reason": exp["reason"] or exp["last_reason"] or "",
                "source": exp["source"],
                "started_at": iso(exp["started_at"]),
                "ended_at": iso(exp["ended_at"]),
                "control": {
                    "version": control["prompt_version"],
                    "rate": _finite(control_result.rate) if control_result else None,
                    "n": control_result.n if control_result else 0,
                },
                "votes": sum(r.n for r in results.values()),
                "tried": tried,
            }
        )
    history_versions = []
    for v in versions:
        fact = facts.get(v["version"], {})
        outcome = fact.get("outcome", OUTCOME_UNTESTED)
        if v["version"] == champion["version"]:
            outcome = OUTCOME_CHAMPION
        elif not fact and v["status"] == domain.VERSION_ARCHIVED:
            outcome = OUTCOME_REPLACED
        history_versions.append(from_row(TriedVersion, v, **(fact | {"outcome": outcome})))
    rejected: list[RejectedProposal] = []
    seen: set[str] = set()
    empty, counting = 0, True
    for g in repo.generations(name, limit=200):  # latest first
        if counting and g["parent_version"] == champion["version"]:
            if g["accepted"]:
                counting = False
            else:
                empty += 1
        else:
            counting = False
        for proposal in g["rejected"] or []:
            key = proposal.get("fingerprint") or proposal.get("preview", "")
            if key in seen or len(rejected) >= REJECTED_KEPT:
                continue
            seen.add(key)
            rejected.append(
                RejectedProposal(
                    reason=str(proposal.get("reason", "")),
                    rationale=str(proposal.get("rationale", "")),
                    preview=str(proposal.get("preview", "")),
                    fingerprint=proposal.get("fingerprint"),
                )
            )
    history = SearchHistory(
        prompt_name=name,
        champion_version=champion["version"],
        versions=tuple(history_versions),
        rejected=tuple(rejected),
        empty_generations=empty,
    )
    return history, rounds


def retest_candidate(uow: SqlUnitOfWork, name: str, settings: OptimizerSettings, now: datetime) -> str | None:
    """The version that deserves another round before it counts as lost, or None.

    It is the leader of the prompt's latest round when that round ended inconclusive against today's champion,
    measured at least half the target lift, and its always-valid interval of the relative lift still reaches
    the target (so not a round stopped for futility, where every interval lies below it): a real winner may
    have measured low by chance. One capped look is noisy and a version that lost is never proposed again, so
    without this a +12-point variant that measured +6 in its round is gone for good. It gets
    `settings.retest_rounds` more rounds; each round keeps its own always-valid error bound, so a version that
    is no better ships in a re-test with at most that error again.
    """
    if settings.retest_rounds <= 0:
        return None
    with uow:
        repo = uow.repo
        champion = require_prompt(uow, name)
        experiments = sorted(repo.experiments(prompt_name=name), key=lambda e: as_utc(e["created_at"]))
        if not experiments:
            return None
        last = experiments[-1]
        if last["status"] != domain.CONCLUDED or last["decision"] != DECISION_INCONCLUSIVE:
            return None
        if last["started_at"] is None:
            return None
        arms = repo.arms(last["experiment_id"])
        control = next((a for a in arms if a["is_control"]), None)
        if control is None or control["prompt_version"] != champion["version"]:
            return None
        _, analysis, _ = evaluate(uow, last, arms, now)
        version_of = {a["arm_id"]: a["prompt_version"] for a in arms if not a["is_control"]}
        target = float(last["target_lift"])
        open_ = [
            r
            for r in analysis.arms
            if r.arm_id in version_of
            and version_of[r.arm_id] != champion["version"]
            and r.lift is not None
            and r.lift >= target / 2
            and r.lift_ci_relative is not None
            and r.lift_ci_relative[1] >= target
        ]
        if not open_:
            return None
        leader = version_of[max(open_, key=lambda r: r.lift or 0.0).arm_id]
        rounds = sum(
            1
            for e in experiments
            for a in repo.arms(e["experiment_id"])
            if not a["is_control"] and a["prompt_version"] == leader
        )
        return leader if rounds <= settings.retest_rounds else None


def load_history(uow: SqlUnitOfWork, name: str, now: datetime | None = None) -> SearchHistory:
    with uow:
        return _survey(uow, name, now or utcnow())[0]


def exhaustion(
    history: SearchHistory, template: str, generator: VariantGenerator, settings: OptimizerSettings
) -> str | None:
    """Why the search is exhausted, or None while something is left to try. Asks no provider."""
    if history.empty_generations >= settings.generation_patience:
        return (
            f"the last {history.empty_generations} generations for champion {history.champion_version} added no "
            f"candidate (OPTIMIZER_GENERATION_PATIENCE={settings.generation_patience})"
        )
    remaining = getattr(generator, "remaining", None)
    if remaining is not None and remaining(template, history) == 0:
        return (
            f"every combination of style traits on top of champion {history.champion_version} has been tried "
            "or ruled out (a trait that clearly hurt on its own is not combined)"
        )
    return None


def generate_variants(
    name: str,
    uow_factory: UowFactory,
    generator: VariantGenerator,
    settings: OptimizerSettings,
    now: datetime | None = None,
    *,
    count: int | None = None,
) -> dict[str, Any]:
    """Ask the generator for variants of the champion, showing it the prompt's history, and keep those that
    pass the guardrails as candidate versions (lineage: parent = champion, reason = the generator's rationale);
    record the generation and its cost. A proposal that repeats an existing version or an earlier rejected one
    is rejected as a repeat. SearchExhausted (409) when nothing is left to try, before any provider is asked,
    or when the generator says so (no generation is recorded then). Rate limited per prompt (RateLimited
    carries the wait); the provider call runs outside any transaction."""
    now = now or utcnow()
    history = load_history(uow_factory(), name, now)
    template = history.template_of(history.champion_version) or ""
    why = exhaustion(history, template, generator, settings)
    if why is not None:
        raise SearchExhausted(f"the search for better versions of {name!r} is exhausted: {why}")
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


def _known_proposals(history: SearchHistory) -> dict[str, str]:
    """fingerprint -> why a proposal with it is a repeat: an existing version (and how it fared), or a
    proposal the guardrails rejected before."""
    out = {r.fingerprint: f"repeats a proposal rejected before ({r.reason})" for r in history.rejected if r.fingerprint}
    for v in history.versions:
        out[fingerprint(v.template)] = f"repeats {v.version} ({v.outcome})"
    return out


def _exhaustion_id(name: str, champion_version: str, versions: int) -> Any:
    return derived_id("optimizer.search_exhausted", name, champion_version, versions)


def already_announced(uow: SqlUnitOfWork, name: str) -> bool:
    """Whether the search was announced exhausted in its present state (same champion, no version added)."""
    with uow:
        champion = require_prompt(uow, name)
        return uow.repo.seen(_exhaustion_id(name, champion["version"], len(uow.repo.versions(name))))


def announce_exhausted(uow: SqlUnitOfWork, name: str, reason: str) -> bool:
    """Stage SearchExhausted once for this state of the search. True when it was staged now."""
    with uow:
        champion = require_prompt(uow, name)
        n_versions = len(uow.repo.versions(name))
        event_id = _exhaustion_id(name, champion["version"], n_versions)
        if uow.repo.seen(event_id):
            return False
        uow.repo.mark_seen(event_id)
        uow.add_events(
            SearchExhaustedEvent(
                message_id=event_id,
                prompt_name=name,
                champion_version=champion["version"],
                versions_tried=max(0, n_versions - 1),
                reason=reason[:1000],
            )
        )
        uow.commit()
    return True


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _learned(r: dict[str, Any]) -> str:
    """One sentence: what the round taught."""
    tried = r["tried"]
    control = r["control"]["version"]
    if not tried:
        return "no prompt variant in this round (a model comparison)"
    if any(t["outcome"] == OUTCOME_TESTING for t in tried):
        leader = max(tried, key=lambda t: t["lift"] if t["lift"] is not None else -math.inf)
        return f"collecting: leader so far {leader['version']} ({_pct(leader['lift'])} against {control})"
    won = [t for t in tried if t["outcome"] == OUTCOME_WON]
    hurt = [t["version"] for t in tried if t["diff_ci"] is not None and t["diff_ci"][1] < 0]
    tail = f"; clearly worse: {', '.join(hurt)}" if hurt else ""
    if won:
        w = won[0]
        return f"{w['version']} beat {control} ({_pct(w['lift'])}) and became champion{tail}"
    if all(t["outcome"] == OUTCOME_STOPPED for t in tried):
        return f"stopped without a verdict ({r['reason'][:120]})"
    best = max(tried, key=lambda t: t["lift"] if t["lift"] is not None else -math.inf)
    return f"none beat {control} (best {best['version']} {_pct(best['lift'])}){tail}"


def search_view(
    uow: SqlUnitOfWork,
    name: str,
    generator: VariantGenerator,
    settings: OptimizerSettings,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The search as an operator reads it: rounds (what each tried and learned), what was rejected, what is
    left, and whether the search is exhausted."""
    now = now or utcnow()
    with uow:
        history, rounds = _survey(uow, name, now, analyze_last=VIEW_ROUNDS)
    total_rounds = len(rounds)
    rounds = rounds[-VIEW_ROUNDS:]
    template = history.template_of(history.champion_version) or ""
    why = exhaustion(history, template, generator, settings)
    remaining = getattr(generator, "remaining", None)
    left = remaining(template, history) if remaining is not None else None
    by_version = {v.version: v for v in history.versions}
    for r in rounds:
        for t in r["tried"]:
            v = by_version.get(t["version"])
            t["why"] = v.reason if v is not None else ""
        r["learned"] = _learned(r)
    return _json_safe(
        {
            "champion_version": history.champion_version,
            "exhausted": why is not None,
            "exhausted_reason": why,
            "remaining": left,
            "empty_generations": history.empty_generations,
            "rounds_total": total_rounds,
            "rounds": rounds,
            "versions": [
                {"version": v.version, "outcome": v.outcome, "lift": v.lift, "experiment_id": v.experiment_id}
                for v in history.versions
            ],
            "rejected": [{"reason": r.reason, "rationale": r.rationale} for r in history.rejected[:10]],
        }
    )
