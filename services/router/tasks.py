"""Celery entry points of the router service (queue "router"): the events that keep its routing replica up
to date. Each turns a payload into an event and calls the handler; the outbox is relayed after the commit."""

from __future__ import annotations

from functools import lru_cache

from services.router import handlers
from services.router.config import get_settings
from services.router.store import Store
from shared.bus import bus_for, event_tasks, outbox_relay, worker_app
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

settings = get_settings()


@lru_cache
def _store() -> Store:
    s = get_settings()
    store = Store(s.db_url)
    handlers.ensure_seeded(store.uow(), s.resolved_default_model())
    return store


# What a task cannot handle goes to this service's dead-letter store (shared.bus.ReliableTask).
app = worker_app("router", settings, lambda: _store().dead_letters)


_relay = outbox_relay(app, "router", _store)


#: task -> (the event it takes, the handler that applies it to the routing replica)
EVENT_TASKS = event_tasks(
    app,
    {
        "router.on_champion_changed": (ChampionChanged, handlers.on_champion_changed),
        "router.on_experiment_started": (ExperimentStarted, handlers.on_experiment_started),
        "router.on_allocation_changed": (AllocationChanged, handlers.on_allocation_changed),
        "router.on_experiment_concluded": (ExperimentConcluded, handlers.on_experiment_concluded),
        "router.on_model_registered": (ModelRegistered, handlers.on_model_registered),
        "router.on_model_withdrawn": (ModelWithdrawn, handlers.on_model_withdrawn),
        "router.on_feedback_erased": (FeedbackErased, handlers.on_feedback_erased),
    },
    lambda: _store().uow(),
    after=_relay,
)


@app.task(name="router.resend_explanations")
def resend_explanations(payload: dict) -> int:
    """Publish the `ExplanationCreated` of these explanations again (`ResendExplanations`, from the feedback
    service's sweep): straight to the bus, not through the outbox, whose row of that event id was published
    long ago. A broker error is transient: the task is retried, then dead-lettered."""
    events = handlers.explanation_events(_store().uow(), ResendExplanations.from_payload(payload).explanation_ids)
    if events:
        bus_for(app).publish_many(events)
    return len(events)
