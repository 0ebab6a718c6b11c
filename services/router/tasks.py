"""Celery entry points of the router service (queue "router"): the events that keep its routing replica up
to date. Each turns a payload into an event and calls the handler; the outbox is relayed after the commit."""

from __future__ import annotations

from functools import lru_cache

from services.router import handlers
from services.router.config import get_settings
from services.router.store import Store, outbox
from shared.bus import bus_for, make_celery, use_dead_letters
from shared.contracts import (
    AllocationChanged,
    ChampionChanged,
    ExperimentConcluded,
    ExperimentStarted,
    FeedbackErased,
    ModelRegistered,
    ModelWithdrawn,
    ResendExplanations,
)
from shared.logging import configure_logging
from shared.outbox import relay

settings = get_settings()
app = make_celery("router", settings)
configure_logging("router-worker", settings.log_level)


@lru_cache
def _store() -> Store:
    s = get_settings()
    store = Store(s.db_url)
    handlers.ensure_seeded(store.uow(), s.resolved_default_model())
    return store


# What a task cannot handle goes to this service's dead-letter store (shared.bus.ReliableTask).
use_dead_letters(app, lambda: _store().dead_letters)


def _relay() -> int:
    return relay(_store().factory, outbox, bus_for(app))


@app.task(name="router.on_champion_changed")
def on_champion_changed(payload: dict) -> str:
    outcome = handlers.on_champion_changed(ChampionChanged.from_payload(payload), _store().uow())
    _relay()
    return outcome


@app.task(name="router.on_experiment_started")
def on_experiment_started(payload: dict) -> str:
    outcome = handlers.on_experiment_started(ExperimentStarted.from_payload(payload), _store().uow())
    _relay()
    return outcome


@app.task(name="router.on_allocation_changed")
def on_allocation_changed(payload: dict) -> str:
    outcome = handlers.on_allocation_changed(AllocationChanged.from_payload(payload), _store().uow())
    _relay()
    return outcome


@app.task(name="router.on_experiment_concluded")
def on_experiment_concluded(payload: dict) -> str:
    outcome = handlers.on_experiment_concluded(ExperimentConcluded.from_payload(payload), _store().uow())
    _relay()
    return outcome


@app.task(name="router.on_model_registered")
def on_model_registered(payload: dict) -> str:
    outcome = handlers.on_model_registered(ModelRegistered.from_payload(payload), _store().uow())
    _relay()
    return outcome


@app.task(name="router.on_model_withdrawn")
def on_model_withdrawn(payload: dict) -> str:
    outcome = handlers.on_model_withdrawn(ModelWithdrawn.from_payload(payload), _store().uow())
    _relay()
    return outcome


@app.task(name="router.on_feedback_erased")
def on_feedback_erased(payload: dict) -> int:
    erased = handlers.on_feedback_erased(FeedbackErased.from_payload(payload), _store().uow())
    _relay()
    return erased


@app.task(name="router.relay_outbox")
def relay_outbox() -> int:
    return _relay()


@app.task(name="router.resend_explanations")
def resend_explanations(payload: dict) -> int:
    """Publish the `ExplanationCreated` of these explanations again (`ResendExplanations`, from the feedback
    service's sweep): straight to the bus, not through the outbox, whose row of that event id was published
    long ago. A broker error is transient: the task is retried, then dead-lettered."""
    events = handlers.explanation_events(_store().uow(), ResendExplanations.from_payload(payload).explanation_ids)
    if events:
        bus_for(app).publish_many(events)
    return len(events)
