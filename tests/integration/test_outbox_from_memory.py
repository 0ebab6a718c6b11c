"""A worker publishes what it has just committed from memory (`shared.outbox.relay_committed`), on a real
service store: only what was committed is published (not a message's events rolled back with its savepoint,
nor a transaction left without commit); the table is read instead on the first call, after a failed
publication and after an overflow, so nothing pending is left behind; an erasure's event keeps no key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, select

from services.feedback.store import Store
from shared.contracts import FeedbackErased, utcnow
from shared.db import run_batch, run_in_one_transaction
from shared.outbox import ERASED_PAYLOAD, JustCommitted, pending, relay_committed, stage
from tests.integration.test_outbox import RecordingBus


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield s
    s.dispose()


def _event(n: int) -> FeedbackErased:
    return FeedbackErased(session_key=f"key-{n}", feedback_ids=[], explanation_ids=[], erased_at=utcnow())


def _outbox(store: Store) -> Table:
    assert store.outbox is not None
    return store.outbox


def _unpublished(store: Store) -> set[str]:
    return {r["event_id"] for r in pending(store.factory, _outbox(store))}


def _commit(store: Store, *events: FeedbackErased) -> None:
    with store.uow() as uow:
        uow.add_events(*events)
        uow.commit()


def _relay(store: Store, bus: RecordingBus, **kw: int) -> int:
    return relay_committed(store.factory, _outbox(store), bus, store.just_committed, **kw)


def _ids(events: list) -> list[str]:
    return [str(e.message_id) for e in events]


def test_the_first_call_reads_the_table_and_later_ones_publish_only_what_this_process_committed(
    store: Store,
) -> None:
    before = _event(0)
    _commit(store, before)  # committed before the relay started: only in the table
    bus = RecordingBus()
    assert _relay(store, bus) == 1 and _ids(bus.events) == _ids([before])

    mine = [_event(1), _event(2)]
    _commit(store, *mine)
    other = _event(3)  # staged by another process: this one never saw it
    with store.factory() as session, session.begin():
        stage(session, _outbox(store), [other])
    assert _relay(store, bus) == 2
    assert _ids(bus.events) == _ids([before, *mine])
    assert _unpublished(store) == {str(other.message_id)}


def test_nothing_is_published_from_a_transaction_left_without_commit(store: Store) -> None:
    bus = RecordingBus()
    _relay(store, bus)
    with store.uow() as uow:
        uow.add_events(_event(1))  # and no commit: rolled back
    assert _relay(store, bus) == 0 and bus.events == []


def test_a_message_rolled_back_to_its_savepoint_takes_its_events_with_it(store: Store) -> None:
    bus = RecordingBus()
    _relay(store, bus)
    events = [_event(i) for i in range(4)]

    def handle(event: FeedbackErased, uow: Any) -> str:
        with uow:
            uow.add_events(event)
            if event is events[1]:
                raise ValueError("this message fails after staging its event")
            if event is events[2]:
                return "left without commit"  # the message's savepoint is rolled back
            uow.commit()
        with uow:  # a second block, left without commit: its savepoint and its event go
            uow.add_events(_event(10 + events.index(event)))
        return "ok"

    results = run_in_one_transaction(store.uow(), events, handle)
    assert [ok for ok, _ in results] == [True, False, True, True], results
    assert _relay(store, bus) == 2
    assert _ids(bus.events) == _ids([events[0], events[3]])
    assert _unpublished(store) == set()


def test_a_set_based_batch_publishes_its_events_and_its_fallback_only_those_of_the_messages_kept(
    store: Store,
) -> None:
    bus = RecordingBus()
    _relay(store, bus)
    events = [_event(i) for i in range(3)]

    def many(items: list[FeedbackErased], uow: Any) -> list[str]:
        uow.add_events(*items)
        if any(e is events[1] for e in items):
            raise ValueError("the set-based path fails: the batch goes one message at a time")
        return ["ok"] * len(items)

    def each(event: FeedbackErased, uow: Any) -> str:
        if event is events[1]:
            raise ValueError("bad message")
        with uow:
            uow.add_events(event)
            uow.commit()
        return "ok"

    run_batch(store.uow(), events, many, each)
    assert _relay(store, bus) == 2 and _ids(bus.events) == _ids([events[0], events[2]])

    good = [_event(5), _event(6)]
    run_batch(store.uow(), good, many, each)
    assert _relay(store, bus) == 2 and _ids(bus.events[2:]) == _ids(good)


def test_a_failed_publication_leaves_the_events_pending_and_the_next_call_reads_the_table(store: Store) -> None:
    bus = RecordingBus()
    _relay(store, bus)
    events = [_event(1), _event(2)]
    _commit(store, *events)
    with pytest.raises(ConnectionError):
        _relay(store, RecordingBus(fail_at=1))
    assert _unpublished(store) == set(_ids(events))
    assert _relay(store, bus) == 2 and sorted(_ids(bus.events)) == sorted(_ids(events))
    assert _unpublished(store) == set()
    assert _relay(store, bus) == 0 and len(bus.events) == 2  # nothing twice


def test_more_than_the_limit_in_memory_leaves_them_to_the_table_and_a_full_table_read_is_continued(
    store: Store,
) -> None:
    store.just_committed = JustCommitted(limit=2)
    bus = RecordingBus()
    _relay(store, bus)
    events = [_event(i) for i in range(5)]
    _commit(store, *events[:2])
    _commit(store, *events[2:])  # over the limit: memory is dropped, the table has them all
    assert _relay(store, bus, limit=3) == 3
    assert _relay(store, bus, limit=3) == 2  # three were read: the table might hold more
    assert sorted(_ids(bus.events)) == sorted(_ids(events))
    assert _unpublished(store) == set()


def test_an_erasure_event_published_from_memory_keeps_no_key_in_its_row(store: Store) -> None:
    bus = RecordingBus()
    _relay(store, bus)
    erased = _event(7)
    _commit(store, erased)
    assert _relay(store, bus) == 1
    with store.factory() as session:
        (payload,) = session.execute(select(_outbox(store).c.payload)).scalars()
    assert payload == ERASED_PAYLOAD and erased.session_key not in str(payload)


def test_a_process_that_never_relays_from_memory_keeps_nothing_there(store: Store) -> None:
    _commit(store, _event(1))
    assert store.just_committed.take() == ([], False)


def test_as_many_events_as_the_limit_are_still_published_from_memory(store: Store) -> None:
    store.just_committed = JustCommitted(limit=2)
    bus = RecordingBus()
    _relay(store, bus)
    other = _event(9)  # staged by another process: only a read of the table would publish it
    with store.factory() as session, session.begin():
        stage(session, _outbox(store), [other])
    mine = [_event(1), _event(2)]
    _commit(store, *mine)
    assert _relay(store, bus) == 2 and _ids(bus.events) == _ids(mine)
    assert _unpublished(store) == {str(other.message_id)}
