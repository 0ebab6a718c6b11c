"""Celery entry points of the feedback service (queue "feedback"). Each turns a payload into a message and
calls the handler; the outbox is relayed after the commit."""

from __future__ import annotations

from functools import lru_cache

from services.feedback import handlers
from services.feedback.config import get_settings
from services.feedback.store import Store, outbox
from shared.bus import IntakeJournal, bus_for, make_celery
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
    relay(_store().factory, outbox, bus_for(app))


@lru_cache
def _journal() -> IntakeJournal:
    return IntakeJournal(get_settings().redis_url, "feedback")


@app.task(name="feedback.record")
def record(payload: dict) -> str:
    cmd = RecordFeedback.from_payload(payload)
    outcome = handlers.record_feedback(cmd, _store().uow())
    _journal().done(cmd.message_id)  # committed (or recognised as handled): no need to send it again
    _relay()
    return outcome


@app.task(name="feedback.sweep_journal")
def sweep_journal() -> int:
    """Send again the accepted votes that no worker has stored within the grace period."""
    bus = bus_for(app)
    overdue = _journal().overdue(get_settings().journal_grace_s)
    for payload in overdue:
        bus.send(RecordFeedback.from_payload(payload))
    return len(overdue)


@app.task(name="feedback.on_explanation_created")
def on_explanation_created(payload: dict) -> int:
    released = handlers.on_explanation_created(ExplanationCreated.from_payload(payload), _store().uow())
    _relay()
    return released


@app.task(name="feedback.relay_outbox")
def relay_outbox() -> int:
    return relay(_store().factory, outbox, bus_for(app))
