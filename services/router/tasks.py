"""Celery entry points of the router service (queue "router"): the events that keep its routing replica up
to date. Each turns a payload into an event and calls the handler; the outbox is relayed after the commit."""

from __future__ import annotations

from functools import lru_cache

from services.router import handlers
from services.router.config import get_settings
from services.router.store import Store
from shared.bus import bus_for, outbox_relay, subscribed_tasks, worker_app
from shared.contracts import ResendExplanations

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


#: task -> its registered consumer, one for each of the router's subscriptions (`shared.bus.SUBSCRIPTIONS`),
#: each applying its event to the routing replica
EVENT_TASKS = subscribed_tasks(app, "router", handlers, lambda: _store().uow(), after=_relay)


@app.task(name="router.resend_explanations")
def resend_explanations(payload: dict) -> int:
    """Publish the `ExplanationCreated` of these explanations again (`ResendExplanations`, from the feedback
    service's sweep): straight to the bus, not through the outbox, whose row of that event id was published
    long ago. A broker error is transient: the task is retried, then dead-lettered."""
    events = handlers.explanation_events(_store().uow(), ResendExplanations.from_payload(payload).explanation_ids)
    if events:
        bus_for(app).publish_many(events)
    return len(events)
