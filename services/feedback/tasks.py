"""Celery entry points of the feedback service (queue "feedback"). Each turns a payload into a message and
calls the handler; the outbox is relayed after the commit."""

from __future__ import annotations

from functools import lru_cache

from services.feedback import handlers
from services.feedback.config import get_settings
from services.feedback.store import Store, outbox
from shared.bus import CeleryBus, make_celery
from shared.contracts import ExplanationCreated, RecordFeedback
from shared.logging import configure_logging
from shared.outbox import relay

settings = get_settings()
app = make_celery("feedback", settings)
configure_logging("feedback-worker", settings.log_level)


@lru_cache
def _store() -> Store:
    return Store(get_settings().db_url)


def _relay() -> None:
    relay(_store().factory, outbox, CeleryBus(app))


@app.task(name="feedback.record")
def record(payload: dict) -> str:
    outcome = handlers.record_feedback(RecordFeedback.from_payload(payload), _store().uow())
    _relay()
    return outcome


@app.task(name="feedback.on_explanation_created")
def on_explanation_created(payload: dict) -> int:
    released = handlers.on_explanation_created(ExplanationCreated.from_payload(payload), _store().uow())
    _relay()
    return released


@app.task(name="feedback.relay_outbox")
def relay_outbox() -> int:
    return relay(_store().factory, outbox, CeleryBus(app))
