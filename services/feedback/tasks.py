"""Celery entry points of the feedback service (queue "feedback"). Each turns a payload into a message and
calls the handler; the outbox is relayed after the commit."""

from __future__ import annotations

from functools import lru_cache

from pydantic import ValidationError

from services.feedback import handlers
from services.feedback.config import get_settings
from services.feedback.intake import IntakeJournal
from services.feedback.store import Store
from shared.bus import ask_for_missing_explanations, batch_task, bus_for, outbox_relay, subscribed_tasks, worker_app
from shared.contracts import RecordFeedback
from shared.deadletter import INVALID, UNREADABLE, describe_error

settings = get_settings()


@lru_cache
def _store() -> Store:
    return Store(get_settings().db_url)


# What a task cannot handle goes to this service's dead-letter store (shared.bus.ReliableTask), and leaves the
# intake journal.
app = worker_app(
    "feedback", settings, lambda: _store().dead_letters, batches=True, after=lambda *a: _forget_journal_entry(*a)
)


_relay = outbox_relay(app, "feedback", _store)


@lru_cache
def _journal() -> IntakeJournal:
    return IntakeJournal(get_settings().redis_url, "feedback")


def _forget_journal_entry(task: str, payload: object) -> None:
    """A dead-lettered vote leaves the intake journal (else the sweep would send it again and again)."""
    if task == "feedback.record" and isinstance(payload, dict) and payload.get("message_id"):
        _journal().done(str(payload["message_id"]))


def _recorded(cmds: list[RecordFeedback]) -> None:
    _journal().done_many(cmd.message_id for cmd in cmds)  # committed (or recognised as handled): not again
    _relay()


# Votes are digested in batches: one transaction of a few set-based statements for up to TASK_BATCH_SIZE of them
# (shared.bus.BatchTask, shared.db.run_batch).
record = batch_task(
    app,
    name="feedback.record",
    parse=RecordFeedback.from_payload,
    each=handlers.record_feedback,
    many=handlers.record_feedback_batch,
    uow=lambda: _store().uow(),
    after=_recorded,
)


@app.task(name="feedback.sweep_journal")
def sweep_journal() -> int:
    """Send again the accepted votes that no worker has stored within the grace period. What cannot be read
    (a broken journal entry, a payload that does not validate) is dead-lettered and skipped; the rest goes on.
    Then ask the router again for the explanations that quarantined votes still wait for (`ask_for_missing`)."""
    sent = _sweep_journal()
    ask_for_missing()
    return sent


def ask_for_missing() -> int:
    """Votes wait in the quarantine for their explanation's event. If it does not come within
    `quarantine_resend_after_s` (the event was lost on its way here: a worker killed between taking it off the
    queue and recording it), the router is asked to publish it again; at every sweep, for as long as
    `quarantine_resend_window_s`. Returns how many explanations were asked for."""
    s = get_settings()
    return ask_for_missing_explanations(
        app,
        lambda: _store().uow(),
        lambda repo, since, until: repo.quarantined_explanations(since, until),
        after_s=s.quarantine_resend_after_s,
        window_s=s.quarantine_resend_window_s,
    )


def _sweep_journal() -> int:
    bus = bus_for(app)
    dead = _store().dead_letters

    def unreadable(message_id: str, raw: str, error: str) -> None:
        dead.add("feedback.sweep_journal", reason=UNREADABLE, error=error, raw=raw[:2000], message_id=message_id)

    sent = 0
    for payload in _journal().overdue(get_settings().journal_grace_s, on_unreadable=unreadable):
        try:
            cmd = RecordFeedback.from_payload(payload)
        except ValidationError as exc:
            dead.add("feedback.record", reason=INVALID, error=describe_error(exc), payload=payload)
            _journal().done(str(payload.get("message_id")))
            continue
        bus.send(cmd)
        sent += 1
    return sent


#: task -> its registered consumer, one for each of feedback's subscriptions (`shared.bus.SUBSCRIPTIONS`)
EVENT_TASKS = subscribed_tasks(app, "feedback", handlers, lambda: _store().uow(), after=_relay)
