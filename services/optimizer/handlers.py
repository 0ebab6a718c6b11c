"""Optimizer use cases that react to other services' events, and the self-learning loop's beat. Like every
use case of the optimizer, each takes a message or a command and its dependencies, commits one unit of work,
and stages the events it caused (published from the outbox after the commit). Handlers of incoming events are
idempotent on the message id; events they stage have ids derived from what caused them, so a retry
republishes the same ids.

Feed (from the router and the feedback service): `on_explanation_created`, `on_feedback_recorded`,
`on_feedback_erased`.
Loop: `on_model_registered` (test a fine-tuned model against the champion), `auto_cycle` (beat: generate
variants and start the next experiment).

The other use cases live beside this module:
- registry.py: the prompt registry (`ensure_seeded`, `add_version`, `archive_version`);
- experiments.py: experiments (`spec_defaults`, `create_experiment`, `run_decisions` (beat),
  `decide_experiment`, `start_queued`, `promote_experiment`, `stop_experiment`, `rollback_experiment`,
  `rollback_prompt`);
- views.py: the read models (`experiment_view`, `list_experiments`, `prompts_view`);
- search.py: the variant search (`generate_variants` with the prompt's history, exhaustion, `search_view`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from services.optimizer import domain, search
from services.optimizer.config import OptimizerSettings
from services.optimizer.experiments import create_experiment, spec_defaults
from services.optimizer.generation import GenerationFailed, VariantGenerator
from services.optimizer.registry import SearchExhausted, UowFactory
from services.optimizer.store import EXPOSURE_FIELDS, SqlUnitOfWork
from shared import votes
from shared.contracts import ExplanationCreated, FeedbackErased, FeedbackRecorded, ModelRegistered, utcnow
from shared.db import first_of_each, handle_many_once, handle_once
from shared.prompts import PROMPT_NAME

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Feed from the router and the feedback service
# --------------------------------------------------------------------------------------------------------


def on_explanation_created(event: ExplanationCreated, uow: SqlUnitOfWork) -> bool:
    """Count an exposure (with its cost and latency) for the arm that served it, in the session it was served
    to (the unit of analysis; an event without a session key is its own session) and its signal (the segment).
    An explanation a fallback model wrote is recorded as such: it and the votes on it do not count for the
    arm's quality, only for its fallback rate, cost and latency."""

    def apply(uow: SqlUnitOfWork) -> bool:
        erased = uow.repo.erased_session(event.session_key) if event.session_key else None
        return uow.repo.add_exposure(_exposure(event), session_key=_unit(event, erased), signal=str(event.signal))

    return handle_once(uow, event.message_id, apply, duplicate=False)


def on_explanation_created_batch(events: list[ExplanationCreated], uow: SqlUnitOfWork) -> list[bool]:
    """`on_explanation_created` for a batch, set-based (the same outcomes, exposures and units as one by one):
    one query each for the handled ids, the recorded exposures and the erased sessions, one insert of many
    rows into each table. An explanation twice in the batch (under two message ids) is recorded once."""

    def apply(uow: SqlUnitOfWork, fresh: list[ExplanationCreated]) -> list[bool]:
        repo = uow.repo
        known = repo.exposures_known(str(e.explanation_id) for e in fresh)
        erased = repo.erased_sessions(e.session_key for e in fresh if e.session_key)
        outcomes, new = first_of_each(fresh, lambda e: str(e.explanation_id), known)
        repo.add_exposures(
            [(_exposure(e), _unit(e, erased.get(e.session_key) if e.session_key else None), str(e.signal)) for e in new]
        )
        return outcomes

    return handle_many_once(uow, events, apply, duplicate=False)


def _exposure(event: ExplanationCreated) -> dict[str, Any]:
    return event.row(*EXPOSURE_FIELDS)


def _unit(event: ExplanationCreated, erased: tuple[datetime, str] | None) -> str | None:
    """The unit an exposure counts in: its session, or, for one served before its session was erased (whose
    event arrives after the erasure, `erased`: when, and the anonymous unit), that anonymous unit."""
    if erased is not None and votes.erased_before(erased[0], event.created_at):
        return erased[1]
    return event.session_key


def on_feedback_recorded(event: FeedbackRecorded, uow: SqlUnitOfWork) -> str:
    """Count a vote for its arm; a replacing vote (same feedback_id) overwrites the earlier one, so it counts
    once. Returns stored, replaced, stale, erased or duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        if votes.erased_before(repo.vote_erased_at(event.feedback_id), event.submitted_at):
            return "erased"  # the session asked to be forgotten after this vote: it stays forgotten
        return votes.keep_newest(repo, votes.vote_row(event, "experiment_id", "arm_id"))

    return handle_once(uow, event.message_id, apply)


def on_feedback_recorded_batch(events: list[FeedbackRecorded], uow: SqlUnitOfWork) -> list[str]:
    """`on_feedback_recorded` for a batch, set-based (the same outcomes and stored votes as one by one): one
    query each for the handled ids, the erased votes and the stored votes, one write of many rows each."""

    def apply(uow: SqlUnitOfWork, fresh: list[FeedbackRecorded]) -> list[str]:
        outcomes, newest = votes.keep_newest_of_batch(uow.repo, fresh, "experiment_id", "arm_id")
        uow.repo.write_votes(newest)
        return outcomes

    return handle_many_once(uow, events, apply)


def on_feedback_erased(event: FeedbackErased, uow: SqlUnitOfWork) -> int:
    """Forget an erased session (GDPR): its votes leave the analysis; its exposures stay, under an anonymous
    unit instead of its key (see `OptimizerRepository.erase_session`). Returns how many votes were removed.

    What this does to an experiment's figures: the session's votes no longer count (the arm's n, positives,
    rate and interval are recomputed without them at the next decision and in every view), while its
    exposures, cost and latency, and so the traffic split and the sample-ratio check, stay as served. A
    decision already taken is not revisited: it was right on the data it had."""

    def apply(uow: SqlUnitOfWork) -> int:
        removed = uow.repo.erase_session(
            event.session_key,
            [str(f) for f in event.feedback_ids],
            [str(e) for e in event.explanation_ids],
            event.erased_at,
        )
        return removed

    return handle_once(uow, event.message_id, apply, duplicate=0)


# --------------------------------------------------------------------------------------------------------
# The self-learning loop
# --------------------------------------------------------------------------------------------------------


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


def auto_cycle(
    uow_factory: UowFactory,
    generator: VariantGenerator,
    settings: OptimizerSettings,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The self-learning loop's beat: for every prompt with no experiment running or queued, take the
    untested candidates descended from the champion (generating new ones, with the search's history, when
    there are none and the rate limit allows) and start the next experiment: champion as control, candidates
    as treatments. A round that ended at its cap with a leader that may still reach the target lift gives that
    leader one more round (`search.retest_candidate`) beside the next proposals, one fewer of them: the round
    drops whichever arms cannot win and gives their share of its budget to the others, so a re-test costs no
    round of its own. A search with nothing left is announced once (SearchExhausted) and generates no more."""
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
        retest = None
        if not candidates and (retest := search.retest_candidate(uow_factory(), name, settings, now)) is not None:
            with uow_factory() as uow:  # archived when its round ended; a candidate again for one more round
                uow.repo.set_version_status(name, retest, domain.VERSION_CANDIDATE)
                uow.commit()
        fresh = settings.generation_count - (retest is not None)  # a re-tested leader takes one arm of the round
        if not candidates and fresh > 0:
            if retest is None and search.already_announced(uow_factory(), name):
                out.append({"prompt_name": name, "action": "exhausted", "reason": "announced before; nothing changed"})
                continue
            # With a re-test, whatever stops generation (nothing left, the rate limit, a failed provider) leaves
            # the leader to run alone; the search is announced exhausted once nothing is left to re-test either.
            try:
                generated = search.generate_variants(name, uow_factory, generator, settings, now, count=fresh)
            except SearchExhausted as exc:
                if retest is None:
                    search.announce_exhausted(uow_factory(), name, str(exc))
                    out.append({"prompt_name": name, "action": "exhausted", "reason": str(exc)})
                    continue
            except domain.RateLimited as exc:
                if retest is None:
                    out.append({"prompt_name": name, "action": "waiting", "reason": str(exc)})
                    continue
            except GenerationFailed as exc:
                log.warning("variant generation for %s failed: %s", name, exc)
                if retest is None:
                    out.append({"prompt_name": name, "action": "generation_failed", "reason": str(exc)})
                    continue
            candidates = [v["version"] for v in generated["accepted"]] if generated else []
        if retest is not None:
            candidates = [retest, *candidates]
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
# Withdrawn models (erasure reached their training data)
# --------------------------------------------------------------------------------------------------------


def on_model_withdrawn(event: Any, uow_factory: UowFactory, now: datetime | None = None) -> dict[str, Any]:
    """A model may no longer be used (shared.contracts.ModelWithdrawn): every experiment with an arm on it is
    stopped (the control, the champion, serves), a champion on it is rolled back to the latest earlier champion
    on another model, and its ModelRegistered is marked as seen so a late or replayed one starts nothing."""
    from services.optimizer import experiments as exps
    from shared.contracts import derived_id

    now = now or utcnow()
    with uow_factory() as uow:
        if uow.repo.seen(event.message_id):
            return {"outcome": "duplicate"}
        hit = [
            e["experiment_id"]
            for status in domain.ALL_STATES
            if status not in (domain.CONCLUDED, domain.STOPPED)
            for e in uow.repo.experiments(status=status)
            if any(a["model"] == event.model for a in uow.repo.arms(e["experiment_id"]))
        ]
        champions = [
            name for name in uow.repo.prompt_names() if (c := uow.repo.champion(name)) and c["model"] == event.model
        ]
    reason = f"model {event.model} withdrawn: {event.reason}"[:500]
    stopped = []
    for experiment_id in hit:
        try:
            exps.stop_experiment(experiment_id, uow_factory(), now, reason=reason)
            stopped.append(experiment_id)
        except domain.Conflict:  # ended meanwhile
            pass
    restored = []
    for name in champions:
        with uow_factory() as uow:
            earlier = [h for h in uow.repo.champion_history(name) if h["model"] != event.model]
        if earlier:
            exps.rollback_prompt(name, uow_factory(), now, version=earlier[-1]["version"], model=earlier[-1]["model"])
            restored.append(name)
        else:
            log.error("prompt %s has no champion other than the withdrawn model %s", name, event.model)
    with uow_factory() as uow:
        for message_id in (event.message_id, derived_id("model.registered", event.model_id)):
            if not uow.repo.seen(message_id):
                uow.repo.mark_seen(message_id)
        uow.commit()
    return {"outcome": "withdrawn", "stopped": stopped, "rolled_back": restored}
