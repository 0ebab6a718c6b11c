"""Transactional outbox: events are written in the same transaction as the change that caused them, and
published after the commit. A crash between commit and publish leaves them in the table, and the periodic
relay (or the next call) publishes them; subscribers deduplicate on the event id, so a second publish is
harmless. This is how "publish after the unit of work commits" survives a crash."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, Text, cast, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.contracts import EVENT_TYPES, Command, Event, utcnow

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """What publishes events and sends commands: `shared.bus.CeleryBus` (a fake in tests)."""

    def publish(self, event: Event) -> None: ...
    def send(self, command: Command) -> None: ...


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("event_id", String(36), primary_key=True),
        Column("event_type", String(64), nullable=False),
        Column("payload", JSON, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
        Column("published_at", DateTime(timezone=True), nullable=True, index=True),
    )


def stage(session: Session, table: Table, events: list[Event], *, new: bool = False) -> list[Event]:
    """Add events to the outbox inside the caller's transaction (idempotent on event id: one already staged,
    or twice in `events`, is added once). One query and one insert for all of them; `new`: the events were
    made in this transaction with fresh ids, so the query is skipped (an id staged before fails the insert
    on the primary key instead of being skipped). Returns the events added."""
    from shared.db import select_in

    if not events:
        return []
    ids = [str(ev.message_id) for ev in events]
    staged = set() if new else set(select_in(session, select(table.c.event_id), table.c.event_id, ids))
    rows = []
    added = []
    for event_id, ev in zip(ids, events, strict=True):
        if event_id not in staged:
            staged.add(event_id)
            added.append(ev)
            rows.append(
                {
                    "event_id": event_id,
                    "event_type": ev.type,
                    "payload": ev.to_payload(),
                    "created_at": utcnow(),  # in staging order: the relay publishes oldest first
                }
            )
    if rows:
        session.execute(table.insert(), rows)
    return added


def relay(factory: sessionmaker[Session], table: Table, bus: Publisher, *, limit: int = 500) -> int:
    """Publish what is staged and not yet published; returns how many were published.

    A row that cannot become an event (an unknown event type, a payload that does not validate) is moved to
    the store's dead letters (as task `outbox:<event type>`) and marked, so it neither blocks the relay nor comes back."""
    from shared.deadletter import UNREADABLE, DeadLetters, dead_letter_table, describe_error

    with factory() as session:
        rows = session.execute(
            select(table.c.event_id, table.c.event_type, table.c.payload)
            .where(table.c.published_at.is_(None))
            .order_by(table.c.created_at)
            .limit(limit)
        ).all()
    published: list[str] = []
    dead: list[tuple[str, str, Any, str]] = []
    publish_many = getattr(bus, "publish_many", None)  # a batch's events in one round trip
    try:
        ready: list[tuple[str, Any]] = []
        for event_id, event_type, payload in rows:
            cls = EVENT_TYPES.get(event_type)
            try:
                if cls is None:
                    raise ValueError(f"unknown event type {event_type!r}")
                event = cls.from_payload(payload)
            except Exception as exc:
                dead.append((event_id, event_type, payload, describe_error(exc)))
                continue
            if publish_many is None:
                bus.publish(event)
                published.append(event_id)
            else:
                ready.append((event_id, event))
        if ready and publish_many is not None:  # ready holds events only when the bus publishes batches
            publish_many([event for _, event in ready])
            published.extend(event_id for event_id, _ in ready)
    finally:  # mark what went out, in one transaction; anything else is published again next time
        if dead:
            letters = DeadLetters(factory, dead_letter_table(table.metadata))
            for event_id, event_type, payload, error in dead:
                letters.add(
                    f"outbox:{event_type}",
                    reason=UNREADABLE,
                    error=f"outbox row of type {event_type!r}: {error}",
                    payload=payload if isinstance(payload, dict) else None,
                    raw=None if isinstance(payload, dict) else repr(payload)[:2000],
                    message_id=event_id,
                )
        done = published + [d[0] for d in dead]
        if done:
            with factory() as session, session.begin():
                session.execute(update(table).where(table.c.event_id.in_(done)).values(published_at=utcnow()))
                if published:  # an erasure's event carries the key it erases: the row keeps none once sent
                    session.execute(
                        update(table)
                        .where(table.c.event_id.in_(published), table.c.event_type.in_(SCRUB_WHEN_PUBLISHED))
                        .values(payload=ERASED_PAYLOAD)
                    )
    return len(published)


def publish_staged(factory: sessionmaker[Session], table: Table, bus: Publisher, events: Sequence[Event]) -> int:
    """Publish events this process has just committed to the outbox, and mark them published. It touches only
    its own rows, so concurrent requests on a hot path do not each republish everyone's pending events."""
    publish_many = getattr(bus, "publish_many", None)  # several events in one round trip
    if publish_many is not None:
        publish_many(events)
    else:
        for event in events:
            bus.publish(event)
    if events:
        with factory() as session, session.begin():
            ids = [str(e.message_id) for e in events]
            session.execute(update(table).where(table.c.event_id.in_(ids)).values(published_at=utcnow()))
            scrub = [str(e.message_id) for e in events if e.type in SCRUB_WHEN_PUBLISHED]
            if scrub:  # an erasure's event carries the key it erases: the row keeps none once sent
                session.execute(update(table).where(table.c.event_id.in_(scrub)).values(payload=ERASED_PAYLOAD))
    return len(events)


class JustCommitted:
    """The events one store's units of work have committed to its outbox in this process, in commit order,
    kept for a worker to publish from memory after its task (`relay_committed`) rather than read back from
    the table, parsed and validated again. Off until `start()`: a process that never takes them keeps none.
    `take()` also says whether they are all that may be pending: not on the first take (what was committed
    before `start`, or by a process killed earlier, is only in the table), nor after more than `limit`
    waited (they are dropped from memory) or a publication of taken events failed (`lost`)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.on = False
        self._events: list[Event] = []
        self._whole = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self.on, self._events, self._whole = True, [], False

    def add(self, events: Sequence[Event]) -> None:
        if not self.on or not events:
            return
        with self._lock:
            if len(self._events) + len(events) > self.limit:
                self._events, self._whole = [], False  # the table has them all
            else:
                self._events.extend(events)

    def take(self) -> tuple[list[Event], bool]:
        """The events committed since the last take, and whether the outbox holds nothing else unpublished
        that this process knows of."""
        with self._lock:
            events, whole = self._events, self._whole
            self._events, self._whole = [], True
        return events, whole

    def lost(self) -> None:
        """Taken events were not (all) published: they are pending in the table only."""
        with self._lock:
            self._whole = False


def relay_committed(
    factory: sessionmaker[Session], table: Table, bus: Publisher, committed: JustCommitted, *, limit: int = 500
) -> int:
    """After a worker's task: publish what this process has just committed, from memory (`publish_staged`:
    one round trip, one marking transaction), or, when that may not be all (`JustCommitted.take`), what the
    table holds pending (`relay`, up to `limit`; the next call reads the table again if that many were
    there). If the publication fails, it raises and the events stay pending in the table. Returns how many
    were published."""
    if not committed.on:
        committed.start()
    events, whole = committed.take()
    try:
        if whole:
            return publish_staged(factory, table, bus, events) if events else 0
        published = relay(factory, table, bus, limit=limit)
        if published >= limit:
            committed.lost()  # there may be more in the table
        return published
    except Exception:
        committed.lost()
        raise


def relay_after_commit(
    factory: sessionmaker[Session], table: Table, bus: Publisher, events: Sequence[Event] | None = None
) -> int:
    """Publish after the commit, for a request: what is pending in the outbox (`relay`), or only `events`
    (`publish_staged`). A broker outage must not turn a done change into a 500 (the client would retry a
    change that happened): what is not published stays in the outbox for the periodic relay
    (`<service>.relay_outbox`). Returns how many were published."""
    try:
        return relay(factory, table, bus) if events is None else publish_staged(factory, table, bus, events)
    except Exception as exc:
        log.warning("outbox relay failed (%s); left for the periodic relay", type(exc).__name__)
        return 0


@contextmanager
def relay_when_done(factory: sessionmaker[Session], table: Table, bus: Publisher) -> Iterator[None]:
    """Around a request's change: once the block has returned (its transaction committed), `relay_after_commit`;
    nothing when it raised (a refusal committed nothing to publish)."""
    yield
    relay_after_commit(factory, table, bus)


class BatchedRelay:
    """Publishes what requests have just committed, after their responses, from one thread and in batches: the
    events of every request that committed within `linger_s` of the first go to the broker in one round trip
    and are marked published in one transaction (`publish_staged`), then `after_batch(events)` runs (the router
    settles the day's spend there). A request only queues its events (`submit`), so neither its response
    nor the next request waits on the broker, a second transaction or a thread of its own.

    Each event is published on the bus it was submitted with. What fails to publish, and what a process killed
    before its batch left behind, is still in the outbox for the periodic relay (`<service>.relay_outbox`).
    `close()` publishes what is queued and stops the thread."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        table: Table,
        *,
        linger_s: float = 0.05,
        after_batch: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.factory = factory
        self.table = table
        self.linger_s = linger_s
        self.after_batch = after_batch
        self._queue: queue.SimpleQueue[tuple[Publisher, list[Event]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self._thread.start()

    def submit(self, bus: Publisher, events: list[Event]) -> None:
        self._queue.put((bus, events))

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.linger_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._publish(batch)
            except Exception:  # the thread must live on: what this batch left is in the outbox for the relay
                log.exception("publishing a batch of %d submissions failed", len(batch))

    def _publish(self, batch: list[tuple[Publisher, list[Event]]]) -> None:
        by_bus: dict[int, tuple[Publisher, list[Event]]] = {}
        for bus, events in batch:
            by_bus.setdefault(id(bus), (bus, []))[1].extend(events)
        for bus, events in by_bus.values():
            relay_after_commit(self.factory, self.table, bus, events)
        if self.after_batch is not None:
            try:
                self.after_batch([e for _, events in batch for e in events])
            except Exception:
                log.exception("after-batch step of the outbox relay failed")


def pending(factory: sessionmaker[Session], table: Table) -> list[dict[str, Any]]:
    """What is staged and not yet published (for tests and operators)."""
    with factory() as session:
        rows = session.execute(select(table).where(table.c.published_at.is_(None))).mappings().all()
    return [dict(r) for r in rows]


# -- erasure -----------------------------------------------------------------------------------------------

#: Events that exist to carry an erasure (the key it erases): the row's payload is dropped once published.
SCRUB_WHEN_PUBLISHED: frozenset[str] = frozenset({"feedback.erased"})
#: Fields of an event that are a session's own data (what it sent, what it was shown): blanked on erasure.
SESSION_DATA_FIELDS: tuple[str, ...] = ("prompt_text", "text", "comment", "context")
#: What a row's payload becomes when its event carried an erased session's data and cannot be kept without it.
ERASED_PAYLOAD: dict[str, Any] = {"erased": True}


def session_event_types() -> frozenset[str]:
    """The event types that can carry a session key (the only ones an erasure has to look at)."""
    return frozenset(t for t, cls in EVENT_TYPES.items() if "session_key" in cls.model_fields)


def redact_session(event_type: str, payload: dict[str, Any], keys: Iterable[str]) -> dict[str, Any] | None:
    """The payload without the session: its key (wherever it appears) removed and its own data blanked, or
    None when the event is not valid without them (a vote, an erasure: such an event is the session's data)."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None or not isinstance(payload, dict):
        return None
    gone = set(keys)

    def scrub(value: Any) -> Any:
        if isinstance(value, str) and value in gone:
            return None
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    out = scrub(payload)
    for name in SESSION_DATA_FIELDS:
        if isinstance(out.get(name), str):
            out[name] = ""
        elif isinstance(out.get(name), dict):
            out[name] = {}
    try:
        cls.from_payload(out)
    except Exception:
        return None
    return out


def forget_session(session: Session, table: Table, keys: Iterable[str]) -> tuple[int, int]:
    """Remove an erased session from this outbox, inside the caller's transaction. A row whose event carries
    the key is rewritten without the session (`redact_session`): published or not, so an unpublished row is
    still published, without the session's data. A row whose event cannot exist without it (a vote of the
    session, an earlier erasure) is emptied and, if not yet published, dropped: it is never published.
    Returns (rewritten, dropped)."""
    keys = [k for k in keys if k]
    rewritten = dropped = 0
    types = session_event_types()
    for key in keys:
        rows = session.execute(
            select(table.c.event_id, table.c.event_type, table.c.payload, table.c.published_at).where(
                table.c.event_type.in_(types), cast(table.c.payload, Text).contains(key)
            )
        ).all()
        for event_id, event_type, payload, published_at in rows:
            redacted = redact_session(event_type, payload, keys)
            values: dict[str, Any] = {"payload": ERASED_PAYLOAD if redacted is None else redacted}
            if redacted is None:
                dropped += 1
                if published_at is None:
                    values["published_at"] = utcnow()  # never to be published: the event was the session's data
            else:
                rewritten += 1
            session.execute(update(table).where(table.c.event_id == event_id).values(**values))
    return rewritten, dropped
