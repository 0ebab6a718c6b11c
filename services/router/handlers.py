"""Router use cases. Serving an explanation reads the routing state, calls the providers outside any
transaction, then records the explanation and stages `ExplanationCreated` in one unit of work. The event
handlers keep the routing replica up to date; each is idempotent on the event's message id and ignores events
older than the state they would overwrite (the queue does not promise order)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError

from services.router import domain
from services.router.config import DEFAULT_PRICES
from services.router.providers import AttemptError, ProviderRequest, ProviderSet
from services.router.store import ERASED_SESSION, ExplanationRow, RoutingSnapshot, SqlUnitOfWork
from shared.contracts import (
    AllocationChanged,
    ChampionChanged,
    ExperimentConcluded,
    ExperimentStarted,
    ExplanationCreated,
    FeedbackErased,
    ModelRegistered,
    ModelWithdrawn,
    Signal,
    derived_id,
    utcnow,
)
from shared.db import handle_once
from shared.prompts import SEED_PROMPT, TemplateError, check_template, render

log = logging.getLogger(__name__)

#: The seed champion's timestamp: older than any real ChampionChanged, so the first real one always wins.
SEED_TIME = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Explain:
    ticker: str
    signal: Signal
    context: Mapping[str, domain.ContextValue]
    session_key: str


@dataclass(frozen=True)
class Explained:
    """A served explanation: its event (what was recorded and is published: the text, variant, model, tokens,
    cost and latency), the model the variant assigned (`event.model` answered: a fallback when they differ)
    and the provider attempts that failed on the way."""

    event: ExplanationCreated
    requested_model: str
    errors: tuple[AttemptError, ...] = ()


class RoutingUnavailable(Exception):
    """The store holds no champion (the service was not seeded)."""


class Budget(Protocol):
    """Today's provider spend against the daily budget (`limit_usd` None: no budget)."""

    limit_usd: float | None

    def spent(self) -> float: ...

    def add(self, cost_usd: float) -> None: ...


class RoutingSource(Protocol):
    """The routing state as of now (`store.RoutingCache`: in memory, reloaded when it changed)."""

    def current(self) -> RoutingSnapshot: ...


class BudgetSpent(Exception):
    """The daily provider budget is spent and the assigned model is a paid one (503; it was not called)."""

    def __init__(self, limit_usd: float, spent_usd: float, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the daily provider budget of ${limit_usd:.2f} is spent (${spent_usd:.2f} used today, UTC); "
            f"paid models are not called again until 00:00 UTC, in {retry_after_s} s (ROUTER_DAILY_BUDGET_USD)"
        )


def ensure_seeded(uow: SqlUnitOfWork, default_model: str) -> bool:
    """On first start the champion is the seed prompt (v1.0) with the default model. Returns True if it seeded."""
    try:
        with uow:
            if uow.repo.champion() is not None:
                return False
            uow.repo.set_champion(
                {
                    "prompt_name": SEED_PROMPT.name,
                    "prompt_version": SEED_PROMPT.version,
                    "template": SEED_PROMPT.template,
                    "model": default_model,
                    "changed_at": SEED_TIME,
                    "reason": "seed",
                }
            )
            uow.commit()
    except IntegrityError:  # another process seeded at the same moment
        return False
    log.info("router seeded: champion %s with %s", SEED_PROMPT.version, default_model)
    return True


def create_explanation(
    cmd: Explain,
    uow: SqlUnitOfWork,
    providers: ProviderSet,
    *,
    price_overrides: Mapping[str, Mapping[str, float]],
    budget: Budget | None = None,
    routing_source: RoutingSource | None = None,
) -> Explained:
    """Pick the variant, render, call the providers (with fallback), record, stage the event.

    Raises NoProviderConfigured / AllProvidersFailed from the provider layer, RoutingUnavailable when unseeded,
    BudgetSpent when the daily budget is spent and the assigned model is paid (no provider is called then;
    with a free assigned model, only the free models of the fallback chain are tried). `routing_source`: where
    the routing state comes from (the request path passes its `RoutingCache`); without one it is read in `uow`.
    """
    if routing_source is None:
        with uow:
            snapshot = uow.repo.snapshot()
    else:
        snapshot = routing_source.current()
    routing, registered = snapshot.routing, snapshot.models
    if routing is None:
        raise RoutingUnavailable("the router has no champion yet")
    variant = domain.choose_variant(routing, cmd.session_key)
    prompt = render(variant.prompt.text, ticker=cmd.ticker, signal=cmd.signal, context=cmd.context)
    request = ProviderRequest(prompt=prompt, ticker=cmd.ticker, signal=cmd.signal, context=cmd.context)
    chain = providers.chain(variant.model, routing.champion_model)

    def price(model: str) -> dict[str, float]:
        known = registered.get(model)
        return domain.price_for(
            model,
            defaults=DEFAULT_PRICES,
            overrides=price_overrides,
            registered_per_1k=known["cost_per_1k_tokens_usd"] if known else None,
        )

    if budget is not None and budget.limit_usd is not None and not all(domain.is_free(price(m)) for m in chain):
        spent = budget.spent()
        if not domain.budget_left(budget.limit_usd, spent):
            if not domain.is_free(price(chain[0])):
                raise BudgetSpent(budget.limit_usd, spent, domain.seconds_until_reset(utcnow()))
            chain = [m for m in chain if domain.is_free(price(m))]

    started = time.perf_counter()
    result = providers.generate(chain, request, {k: v["serving_base_url"] for k, v in registered.items()})
    latency_ms = round((time.perf_counter() - started) * 1000, 3)

    c = result.completion
    cost = domain.cost_usd(c.tokens_in, c.tokens_out, price(result.model))
    if budget is not None:
        budget.add(cost)
    explanation_id = uuid.uuid4()
    row: ExplanationRow = {
        "explanation_id": str(explanation_id),
        "request_key": domain.request_key(cmd.ticker, cmd.signal, cmd.context),
        "session_key": cmd.session_key,
        "ticker": cmd.ticker,
        "signal": cmd.signal,
        "context": dict(cmd.context),
        "prompt_name": variant.prompt.name,
        "prompt_version": variant.prompt.version,
        "prompt_text": prompt,
        "requested_model": variant.model,
        "model": result.model,
        "provider": result.provider,
        "experiment_id": variant.experiment_id,
        "arm_id": variant.arm_id,
        "text": c.text,
        "tokens_in": c.tokens_in,
        "tokens_out": c.tokens_out,
        "cost_usd": cost,
        "latency_ms": latency_ms,
        "fallback_used": result.fallback_used,
        "created_at": utcnow(),
    }
    event = explanation_event(row)
    with uow:
        uow.repo.add_explanation(row)
        uow.add_new_events(event)  # its id derives from the new explanation's: nothing to look up
        uow.commit()
    return Explained(event=event, requested_model=variant.model, errors=tuple(result.errors))


def explanation_event(row: ExplanationRow) -> ExplanationCreated:
    """The `ExplanationCreated` of a stored explanation, with the message id it was first published with. An
    erased session's explanation gives the event as its erasure left it: no session, prompt or text."""
    explanation_id = uuid.UUID(str(row["explanation_id"]))
    return ExplanationCreated(
        message_id=derived_id("explanation.created", explanation_id),
        explanation_id=explanation_id,
        request_key=row["request_key"],
        ticker=row["ticker"],
        signal=row["signal"],
        prompt_name=row["prompt_name"],
        prompt_version=row["prompt_version"],
        model=row["model"],
        provider=row["provider"],
        experiment_id=row["experiment_id"],
        arm_id=row["arm_id"],
        prompt_text=row["prompt_text"],
        text=row["text"],
        tokens_in=row["tokens_in"],
        tokens_out=row["tokens_out"],
        cost_usd=row["cost_usd"],
        latency_ms=row["latency_ms"],
        fallback_used=bool(row["fallback_used"]),
        created_at=row["created_at"],
        session_key=None if row["session_key"] == ERASED_SESSION else row["session_key"],
    )


def explanation_events(uow: SqlUnitOfWork, explanation_ids: list[uuid.UUID]) -> list[ExplanationCreated]:
    """The events of the stored explanations among `explanation_ids`, to publish again
    (`ResendExplanations`); ids the router never issued are skipped."""
    with uow:
        rows = uow.repo.explanations(explanation_ids)
    return [explanation_event(r) for r in sorted(rows, key=lambda r: r["created_at"])]


def cost_since(uow: SqlUnitOfWork, since: datetime) -> float:
    with uow:
        return uow.repo.cost_since(since)


def get_explanation(uow: SqlUnitOfWork, explanation_id: uuid.UUID) -> ExplanationRow | None:
    with uow:
        return uow.repo.explanation(explanation_id)


# ---------------------------------------------------------------------------------------------------------
# Keeping the routing replica up to date
# ---------------------------------------------------------------------------------------------------------


def _usable(template: str, model: str) -> str | None:
    """Why a template / model cannot serve traffic, or None when it can."""
    try:
        check_template(template)
        domain.split_model(model)
    except (TemplateError, ValueError) as exc:
        return str(exc)
    return None


def on_champion_changed(event: ChampionChanged, uow: SqlUnitOfWork) -> str:
    """Returns: changed, stale (older than the current champion), rejected (unusable template) or duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        current = repo.champion()
        problem = _usable(event.prompt.template, event.model)
        if problem:
            log.error("ignoring champion %s: %s", event.prompt.version, problem)
            outcome = "rejected"
        elif current is not None and current["changed_at"] > event.occurred_at:
            outcome = "stale"
        else:
            repo.set_champion(
                {
                    "prompt_name": event.prompt.name,
                    "prompt_version": event.prompt.version,
                    "template": event.prompt.template,
                    "model": event.model,
                    "changed_at": event.occurred_at,
                    "reason": event.reason[:500],
                }
            )
            outcome = "changed"
        log.info("champion %s -> %s/%s: %s", event.message_id, event.prompt.version, event.model, outcome)
        return outcome

    return handle_once(uow, event.message_id, apply)


def on_experiment_started(event: ExperimentStarted, uow: SqlUnitOfWork) -> str:
    """Returns: started, already_known (a redelivery or it concluded before this arrived), rejected, duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        problems = [p for arm in event.arms if (p := _usable(arm.prompt.template, arm.model))]
        if repo.experiment(event.experiment_id) is not None:
            outcome = "already_known"
        elif not event.arms or problems:
            log.error("ignoring experiment %s: %s", event.experiment_id, "; ".join(problems) or "it has no arms")
            repo.add_experiment(
                _experiment_row(event, status="rejected"),
                [],
            )
            outcome = "rejected"
        else:
            repo.add_experiment(
                _experiment_row(event, status="running"),
                [
                    {
                        "arm_id": arm.arm_id,
                        "prompt_name": arm.prompt.name,
                        "prompt_version": arm.prompt.version,
                        "template": arm.prompt.template,
                        "model": arm.model,
                        "weight": arm.weight,
                        "is_control": arm.is_control,
                    }
                    for arm in event.arms
                ],
            )
            outcome = "started"
        log.info("experiment %s: %s", event.experiment_id, outcome)
        return outcome

    return handle_once(uow, event.message_id, apply)


def _experiment_row(event: ExperimentStarted, *, status: str) -> dict[str, Any]:
    return {
        "experiment_id": event.experiment_id,
        "prompt_name": event.prompt_name,
        "allocation": event.allocation,
        "status": status,
        "started_at": event.occurred_at,
        "weights_at": event.occurred_at,
    }


def on_allocation_changed(event: AllocationChanged, uow: SqlUnitOfWork) -> str:
    """Returns: changed, stale, unknown (no such running experiment) or duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        exp = repo.experiment(event.experiment_id)
        if exp is None or exp["status"] != "running":
            outcome = "unknown"
        elif exp["weights_at"] is not None and exp["weights_at"] > event.occurred_at:
            outcome = "stale"
        else:
            for arm_id, weight in event.weights.items():
                if weight >= 0 and not repo.set_weight(event.experiment_id, arm_id, float(weight)):
                    log.warning("allocation for unknown arm %s of %s ignored", arm_id, event.experiment_id)
            repo.update_experiment(event.experiment_id, weights_at=event.occurred_at)
            outcome = "changed"
        return outcome

    return handle_once(uow, event.message_id, apply)


def on_experiment_concluded(event: ExperimentConcluded, uow: SqlUnitOfWork) -> str:
    """Stops routing traffic to the experiment; the champion (changed by its own event) serves everyone.
    A conclusion that overtakes its start is remembered, so the late start does not revive it."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        values = {
            "status": "concluded",
            "concluded_at": event.occurred_at,
            "decision": event.decision[:64],
            "winner_arm_id": event.winner_arm_id,
        }
        if repo.experiment(event.experiment_id) is None:
            repo.add_experiment(
                {"experiment_id": event.experiment_id, "prompt_name": "", "allocation": "fixed", **values}, []
            )
            outcome = "concluded_before_start"
        else:
            repo.update_experiment(event.experiment_id, **values)
            outcome = "concluded"
        log.info("experiment %s: %s (%s)", event.experiment_id, outcome, event.decision)
        return outcome

    return handle_once(uow, event.message_id, apply)


def on_model_registered(event: ModelRegistered, uow: SqlUnitOfWork) -> str:
    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        try:
            domain.split_model(event.model)
        except ValueError as exc:
            log.error("ignoring registered model: %s", exc)
            return "rejected"
        repo.upsert_model(
            {
                "model": event.model,
                "model_id": event.model_id,
                "base_model": event.base_model,
                "serving_base_url": event.serving_base_url,
                "cost_per_1k_tokens_usd": event.cost_per_1k_tokens_usd,
                "registered_at": event.occurred_at,
            }
        )
        return "registered"

    return handle_once(uow, event.message_id, apply)


def on_model_withdrawn(event: ModelWithdrawn, uow: SqlUnitOfWork) -> str:
    """A model trained on erased data (or withdrawn by an operator): forget where it is served (so no request
    reaches it through its engine) and stop routing to every running experiment that has it in an arm (the
    champion serves everyone; the optimizer ends the experiment too). Returns withdrawn or duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        repo.delete_model(event.model)
        exp_id = repo.running_experiment_id()
        while exp_id is not None and any(a["model"] == event.model for a in repo.arms_of(exp_id)):
            repo.update_experiment(
                exp_id,
                status="concluded",
                concluded_at=event.occurred_at,
                decision="model_withdrawn",
                winner_arm_id=None,
            )
            exp_id = repo.running_experiment_id()
        log.warning("model %s withdrawn: %s", event.model, event.reason)
        return "withdrawn"

    return handle_once(uow, event.message_id, apply)


def on_feedback_erased(event: FeedbackErased, uow: SqlUnitOfWork) -> int:
    """A session was erased: its explanations keep their cost and variant (the figures) but lose the session's
    key, context, prompt and text (`RouterRepository.erase_session`), here and in the outbox. Returns how many
    explanations were erased (0 for a duplicate)."""

    def apply(uow: SqlUnitOfWork) -> int:
        repo = uow.repo
        erased = repo.erase_session(event.session_key, [str(e) for e in event.explanation_ids])
        return erased

    return handle_once(uow, event.message_id, apply, duplicate=0)


def explanation_erased(row: ExplanationRow) -> bool:
    return row["session_key"] == ERASED_SESSION


def routing_state(uow: SqlUnitOfWork) -> dict[str, Any]:
    """What the router serves now: champion, running experiment with normalised weights, known models."""
    with uow:
        repo = uow.repo
        champ = repo.champion()
        exp_id = repo.running_experiment_id()
        exp = repo.experiment(exp_id) if exp_id else None
        arm_rows = repo.arms_of(exp_id) if exp_id else []
        known = repo.models()
    experiment = None
    if exp is not None and arm_rows:
        arms = [
            domain.Arm(r["arm_id"], domain.Template(r["prompt_name"], r["prompt_version"], ""), r["model"], r["weight"])
            for r in arm_rows
        ]
        shares = domain.normalised_weights(arms)
        experiment = {
            "experiment_id": exp["experiment_id"],
            "prompt_name": exp["prompt_name"],
            "allocation": exp["allocation"],
            "started_at": exp["started_at"],
            "arms": [
                {
                    "arm_id": r["arm_id"],
                    "prompt_version": r["prompt_version"],
                    "model": r["model"],
                    "weight": r["weight"],
                    "share": share,
                    "is_control": r["is_control"],
                }
                for r, share in zip(arm_rows, shares, strict=True)
            ],
        }
    return {
        "champion": None
        if champ is None
        else {
            "prompt_name": champ["prompt_name"],
            "prompt_version": champ["prompt_version"],
            "template": champ["template"],
            "model": champ["model"],
            "changed_at": None if champ["changed_at"] == SEED_TIME else champ["changed_at"],
            "reason": champ["reason"],
        },
        "experiment": experiment,
        "models": [
            {
                "model": m["model"],
                "model_id": m["model_id"],
                "base_model": m["base_model"],
                "serving_base_url": m["serving_base_url"],
                "cost_per_1k_tokens_usd": m["cost_per_1k_tokens_usd"],
            }
            for m in known
        ],
    }
