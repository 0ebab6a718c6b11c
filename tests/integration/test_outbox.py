"""The transactional outbox on a real SQLite file: staging is idempotent, the relay publishes in order and in
batches, a publish that fails halfway through a batch loses nothing and repeats nothing that went out, and rows it
cannot read become dead letters (with the raw value when it is not even a JSON object)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table, create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from shared.contracts import Command, Event, FeedbackErased, utcnow
from shared.deadletter import UNREADABLE, DeadLetters, dead_letter_table
from shared.outbox import BatchedRelay, outbox_table, pending, relay, relay_after_commit, relay_when_done, stage
from tests.support import stage_raw


class BrokerDown(ConnectionError):
    pass


class RecordingBus:
    """Records what it published; raises on the publish numbered `fail_at` (1-based) and every one after it."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list[Event] = []
        self.fail_at = fail_at
        self.calls = 0

    def publish(self, event: Event) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise BrokerDown("broker went away")
        self.events.append(event)

    def send(self, command: Command) -> None:  # pragma: no cover - the outbox only publishes events
        raise AssertionError("the outbox sends no commands")


class Db:
    def __init__(self, path: Path) -> None:
        self.metadata = MetaData()
        self.table: Table = outbox_table(self.metadata)
        self.dead_table = dead_letter_table(self.metadata)
        self.engine = create_engine(f"sqlite:///{path}")
        self.metadata.create_all(self.engine)
        self.factory: sessionmaker[Session] = sessionmaker(self.engine)
        self.dead = DeadLetters(self.factory, self.dead_table)

    def stage(self, *events: Event) -> None:
        with self.factory() as session, session.begin():
            stage(session, self.table, list(events))

    def rows(self) -> list[dict]:
        with self.factory() as session:
            return [dict(r) for r in session.execute(select(self.table)).mappings()]

    def unpublished(self) -> set[str]:
        return {r["event_id"] for r in pending(self.factory, self.table)}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Db]:
    d = Db(tmp_path / "outbox.db")
    yield d
    d.engine.dispose()


def _event(n: int = 0) -> FeedbackErased:
    return FeedbackErased(session_key=f"k{n}", feedback_ids=[], explanation_ids=[], erased_at=utcnow())


def _staged_in_order(db: Db, count: int) -> list[FeedbackErased]:
    """`count` events, each created a second after the one before (the relay publishes oldest first)."""
    events = [_event(i) for i in range(count)]
    for i, ev in enumerate(events):
        stage_raw(db.factory, db.table, str(ev.message_id), ev.type, ev.to_payload(), age_s=float(count - i))
    return events


def test_staging_the_same_event_twice_keeps_one_row(db: Db) -> None:
    ev = _event()
    db.stage(ev)
    db.stage(ev, _event(1))
    rows = db.rows()
    assert sorted(r["event_id"] for r in rows) == sorted([str(ev.message_id), str(rows[1]["event_id"])])
    assert len(rows) == 2
    mine = next(r for r in rows if r["event_id"] == str(ev.message_id))
    assert mine["event_type"] == "feedback.erased" and mine["published_at"] is None
    assert mine["payload"] == ev.to_payload()


def test_new_events_are_staged_without_a_lookup_and_a_reused_id_is_refused_not_skipped(db: Db) -> None:
    from sqlalchemy.exc import IntegrityError

    ev, fresh = _event(), _event(1)
    db.stage(ev)
    with db.factory() as session, session.begin():
        stage(session, db.table, [fresh], new=True)
    assert {r["event_id"] for r in db.rows()} == {str(ev.message_id), str(fresh.message_id)}
    with pytest.raises(IntegrityError), db.factory() as session, session.begin():
        stage(session, db.table, [ev], new=True)  # not new after all: the transaction fails, nothing is hidden
    assert len(db.rows()) == 2


def test_relay_publishes_oldest_first_marks_them_and_returns_the_count(db: Db) -> None:
    events = _staged_in_order(db, 5)
    bus = RecordingBus()
    assert relay(db.factory, db.table, bus) == 5
    assert [e.message_id for e in bus.events] == [e.message_id for e in events]
    assert all(r["published_at"] is not None for r in db.rows())
    assert db.unpublished() == set()
    assert relay(db.factory, db.table, bus) == 0  # nothing is published twice
    assert len(bus.events) == 5


def test_relay_takes_at_most_one_batch_per_call(db: Db) -> None:
    events = _staged_in_order(db, 5)
    bus = RecordingBus()
    assert relay(db.factory, db.table, bus, limit=2) == 2
    assert [e.message_id for e in bus.events] == [e.message_id for e in events[:2]]
    assert db.unpublished() == {str(e.message_id) for e in events[2:]}
    assert relay(db.factory, db.table, bus, limit=2) == 2
    assert relay(db.factory, db.table, bus, limit=2) == 1
    assert [e.message_id for e in bus.events] == [e.message_id for e in events]


def test_one_relay_call_takes_500_rows_by_default(db: Db) -> None:
    events = [_event(i) for i in range(501)]
    with db.factory() as session, session.begin():
        session.execute(
            db.table.insert(),
            [
                {"event_id": str(e.message_id), "event_type": e.type, "payload": e.to_payload(), "created_at": utcnow()}
                for e in events
            ],
        )
    bus = RecordingBus()
    assert relay(db.factory, db.table, bus) == 500
    assert len(db.unpublished()) == 1
    assert relay(db.factory, db.table, bus) == 1


def test_a_publish_failing_halfway_through_a_batch_keeps_what_went_out_and_retries_only_the_rest(db: Db) -> None:
    events = _staged_in_order(db, 6)
    broken = RecordingBus(fail_at=4)  # three go out, the fourth publish raises
    with pytest.raises(BrokerDown):
        relay(db.factory, db.table, broken)
    sent = [e.message_id for e in broken.events]
    assert sent == [e.message_id for e in events[:3]]
    # the three that went out are marked; the others wait for the next relay
    assert db.unpublished() == {str(e.message_id) for e in events[3:]}
    healthy = RecordingBus()
    assert relay(db.factory, db.table, healthy) == 3
    assert [e.message_id for e in healthy.events] == [e.message_id for e in events[3:]]
    assert db.unpublished() == set()


def test_relay_after_commit_swallows_a_broker_outage_and_leaves_the_events_for_the_periodic_relay(db: Db) -> None:
    events = _staged_in_order(db, 3)
    assert relay_after_commit(db.factory, db.table, RecordingBus(fail_at=1)) == 0
    assert db.unpublished() == {str(e.message_id) for e in events}
    assert relay_after_commit(db.factory, db.table, RecordingBus()) == 3
    assert db.unpublished() == set()


def test_a_request_relays_when_its_change_is_done_and_not_when_it_was_refused(db: Db) -> None:
    bus = RecordingBus()
    with pytest.raises(LookupError), relay_when_done(db.factory, db.table, bus):
        _staged_in_order(db, 1)  # a row of an earlier request, still pending
        raise LookupError("refused")
    assert bus.events == [] and len(db.unpublished()) == 1
    with relay_when_done(db.factory, db.table, bus):
        _staged_in_order(db, 1)
    assert len(bus.events) == 2 and db.unpublished() == set()


def test_publishing_a_requests_own_events_leaves_the_other_pending_rows_alone(db: Db) -> None:
    mine, *others = _staged_in_order(db, 3)
    bus = RecordingBus()
    assert relay_after_commit(db.factory, db.table, bus, [mine]) == 1
    assert [e.message_id for e in bus.events] == [mine.message_id]
    assert db.unpublished() == {str(e.message_id) for e in others}
    assert relay_after_commit(db.factory, db.table, RecordingBus(fail_at=1), [others[0]]) == 0  # broker down
    assert db.unpublished() == {str(e.message_id) for e in others}


def test_an_unreadable_row_becomes_a_dead_letter_with_its_payload_and_the_rest_are_published(db: Db) -> None:
    good = _staged_in_order(db, 2)
    stage_raw(db.factory, db.table, "not-a-dict", "no.such.event", [1, 2, 3], age_s=10)
    stage_raw(db.factory, db.table, "unknown-type", "no.such.event", {"x": 1}, age_s=9)
    stage_raw(db.factory, db.table, "huge", "no.such.event", list(range(2000)), age_s=8)
    bus = RecordingBus()
    assert relay(db.factory, db.table, bus) == 2  # dead letters are not counted as published
    assert [e.message_id for e in bus.events] == [e.message_id for e in good]
    assert db.unpublished() == set()  # and they do not come back
    dead = {d["message_id"]: d for d in db.dead.list()}
    assert set(dead) == {"not-a-dict", "unknown-type", "huge"}
    assert dead["huge"]["raw"] == repr(list(range(2000)))[:2000]  # kept, cut to 2000 characters
    assert dead["unknown-type"]["task"] == "outbox:no.such.event"
    assert dead["unknown-type"]["reason"] == UNREADABLE
    assert dead["unknown-type"]["payload"] == {"x": 1} and dead["unknown-type"]["raw"] is None
    assert "outbox row of type 'no.such.event'" in dead["unknown-type"]["error"]
    assert "unknown event type 'no.such.event'" in dead["unknown-type"]["error"]
    assert dead["not-a-dict"]["payload"] is None and dead["not-a-dict"]["raw"] == "[1, 2, 3]"


def test_pending_lists_only_unpublished_rows(db: Db) -> None:
    first, second = _staged_in_order(db, 2)
    relay(db.factory, db.table, RecordingBus(), limit=1)
    assert [r["event_id"] for r in pending(db.factory, db.table)] == [str(second.message_id)]
    assert uuid.UUID(pending(db.factory, db.table)[0]["event_id"]) == second.message_id
    assert first.message_id != second.message_id


class BatchRecordingBus(RecordingBus):
    """Also publishes batches (like `CeleryBus.publish_many`), recording each batch's size."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__(fail_at)
        self.batches: list[int] = []

    def publish_many(self, events: list[Event]) -> None:
        for event in events:
            self.publish(event)
        self.batches.append(len(events))


def test_the_relay_thread_publishes_what_requests_submit_in_batches_and_marks_them(db: Db) -> None:
    events = _staged_in_order(db, 5)
    bus = BatchRecordingBus()
    after: list[list[Event]] = []
    batched = BatchedRelay(db.factory, db.table, linger_s=30.0, after_batch=after.append)
    for event in events:
        batched.submit(bus, [event])
    batched.close()  # publishes what is queued: within one linger, one batch
    assert bus.batches == [5] and [e.message_id for e in bus.events] == [e.message_id for e in events]
    assert after == [events]
    assert db.unpublished() == set()


def test_the_relay_thread_leaves_what_it_could_not_publish_for_the_periodic_relay(db: Db) -> None:
    down, up = _staged_in_order(db, 2)
    batched = BatchedRelay(db.factory, db.table, linger_s=0.0)
    batched.submit(BatchRecordingBus(fail_at=1), [down])  # each event goes out on the bus it came with
    batched.submit(bus := BatchRecordingBus(), [up])
    batched.close()
    assert [e.message_id for e in bus.events] == [up.message_id]
    assert db.unpublished() == {str(down.message_id)}
    assert relay(db.factory, db.table, RecordingBus()) == 1


def test_staging_one_event_twice_in_the_same_call_keeps_one_row(db: Db) -> None:
    ev = _event()
    db.stage(ev, ev)
    assert [r["event_id"] for r in db.rows()] == [str(ev.message_id)]


def test_relay_on_a_batching_bus_publishes_one_batch_dead_letters_the_unreadable_and_marks_all(db: Db) -> None:
    events = _staged_in_order(db, 3)
    stage_raw(db.factory, db.table, "bad-row", "no.such.event", {"x": 1})
    bus = BatchRecordingBus()
    assert relay(db.factory, db.table, bus) == 3
    assert bus.batches == [3] and [e.message_id for e in bus.events] == [e.message_id for e in events]
    assert db.unpublished() == set()
    assert [d["message_id"] for d in db.dead.list()] == ["bad-row"]


def test_a_relayed_erasure_event_keeps_no_session_key_once_published(db: Db) -> None:
    from shared.outbox import ERASED_PAYLOAD

    (erased,) = _staged_in_order(db, 1)
    assert relay(db.factory, db.table, RecordingBus()) == 1
    (row,) = db.rows()
    assert row["published_at"] is not None and row["payload"] == ERASED_PAYLOAD
    assert erased.session_key not in str(row["payload"])


def test_closing_the_relay_thread_while_it_lingers_publishes_the_batch_and_ends_the_thread(db: Db) -> None:
    (event,) = _staged_in_order(db, 1)
    bus = BatchRecordingBus()
    batched = BatchedRelay(db.factory, db.table, linger_s=30.0)
    batched.submit(bus, [event])
    batched.close(timeout_s=5.0)
    assert bus.batches == [1] and db.unpublished() == set()
    assert not batched._thread.is_alive()
