"""The feedback handlers on a real store: SQLite files, and PostgreSQL when TEST_POSTGRES_URL is set."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text

from services.feedback import handlers
from services.feedback.store import Store, feedback, outbox, quarantine
from shared.contracts import ExplanationCreated, FeedbackErased, FeedbackRecorded
from tests.support import disposed_after, explanation_created

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(store_url: Callable[[str], str]) -> Iterator[Store]:
    yield from disposed_after(Store(store_url("feedback")))


def _explanation(eid: uuid.UUID | None = None, session: str | None = "k") -> ExplanationCreated:
    """An explanation served to the session whose key is `session` (None: an event from before the binding)."""
    return explanation_created(eid, session, ticker="AAPL", signal="BUY", tokens_in=10, tokens_out=20, created_at=T0)


def _staged(store: Store) -> list[dict]:
    with store.factory() as s:
        return [dict(r) for r in s.execute(select(outbox)).mappings()]


def _votes(store: Store) -> list[dict]:
    with store.factory() as s:
        return [dict(r) for r in s.execute(select(feedback)).mappings()]


def test_vote_on_a_known_explanation_is_stored_and_announced(store: Store) -> None:
    exp = _explanation(session="key-a")
    handlers.on_explanation_created(exp, store.uow())
    cmd = handlers.new_vote(exp.explanation_id, "key-a", 1, 5, "clear", T0)
    assert handlers.record_feedback(cmd, store.uow()) == "stored"
    (vote,) = _votes(store)
    assert vote["rating"] == 1 and vote["stars"] == 5 and vote["session_key"] == "key-a"
    events = [e for e in _staged(store) if e["event_type"] == FeedbackRecorded.type]
    assert len(events) == 1
    assert events[0]["payload"]["prompt_version"] == "v1.0" and events[0]["payload"]["replaced"] is False


def test_second_vote_from_same_session_replaces_first(store: Store) -> None:
    exp = _explanation(session="key-a")
    handlers.on_explanation_created(exp, store.uow())
    handlers.record_feedback(handlers.new_vote(exp.explanation_id, "key-a", 1, None, None, T0), store.uow())
    later = handlers.new_vote(exp.explanation_id, "key-a", -1, 2, None, T0 + timedelta(seconds=5))
    assert handlers.record_feedback(later, store.uow()) == "replaced"
    (vote,) = _votes(store)
    assert vote["rating"] == -1 and vote["stars"] == 2 and vote["revisions"] == 2


def test_an_older_vote_delivered_late_is_ignored(store: Store) -> None:
    exp = _explanation()
    handlers.on_explanation_created(exp, store.uow())
    handlers.record_feedback(handlers.new_vote(exp.explanation_id, "k", -1, None, None, T0), store.uow())
    stale = handlers.new_vote(exp.explanation_id, "k", 1, None, None, T0 - timedelta(seconds=5))
    assert handlers.record_feedback(stale, store.uow()) == "stale"
    assert _votes(store)[0]["rating"] == -1


def test_redelivered_command_is_stored_exactly_once(store: Store) -> None:
    exp = _explanation()
    handlers.on_explanation_created(exp, store.uow())
    cmd = handlers.new_vote(exp.explanation_id, "k", 1, None, None, T0)
    assert handlers.record_feedback(cmd, store.uow()) == "stored"
    assert handlers.record_feedback(cmd, store.uow()) == "duplicate"
    assert len(_votes(store)) == 1
    assert len([e for e in _staged(store) if e["event_type"] == FeedbackRecorded.type]) == 1


def test_vote_on_an_unknown_explanation_is_quarantined_not_counted(store: Store) -> None:
    cmd = handlers.new_vote(uuid.uuid4(), "k", 1, None, None, T0)
    assert handlers.record_feedback(cmd, store.uow()) == "quarantined"
    assert _votes(store) == []
    assert not [e for e in _staged(store) if e["event_type"] == FeedbackRecorded.type]
    with store.factory() as s:
        (row,) = s.execute(select(quarantine)).mappings()
    assert "not (yet) issued" in row["reason"]


def test_quarantined_vote_is_released_when_its_explanation_arrives(store: Store) -> None:
    eid = uuid.uuid4()
    handlers.record_feedback(handlers.new_vote(eid, "k", 1, 4, None, T0), store.uow())
    assert handlers.on_explanation_created(_explanation(eid), store.uow()) == 1
    assert len(_votes(store)) == 1
    with store.factory() as s:
        assert s.execute(select(quarantine)).first() is None


def test_erasure_deletes_votes_and_drops_votes_cast_before_it(store: Store) -> None:
    exp = _explanation()
    handlers.on_explanation_created(exp, store.uow())
    first = handlers.new_vote(exp.explanation_id, "k", 1, None, "my email is a@b.co", T0)
    handlers.record_feedback(first, store.uow())
    queued_before = handlers.new_vote(exp.explanation_id, "k", -1, None, None, datetime.now(UTC) - timedelta(seconds=1))
    event, staged = handlers.erase_session("k", store.uow())
    assert isinstance(event, FeedbackErased) and event.feedback_ids == [first.feedback_id] and staged
    assert _votes(store) == []
    assert handlers.record_feedback(queued_before, store.uow()) == "erased"
    assert _votes(store) == []
    # The erasure also forgot which explanations were served to the session, so a vote on one of those no
    # longer counts; on an explanation served after the erasure it does.
    after = handlers.new_vote(exp.explanation_id, "k", 1, None, None, datetime.now(UTC) + timedelta(seconds=1))
    assert handlers.record_feedback(after, store.uow()) == "unbound_explanation"
    fresh = _explanation(session="k").model_copy(update={"created_at": datetime.now(UTC) + timedelta(seconds=1)})
    handlers.on_explanation_created(fresh, store.uow())
    again = handlers.new_vote(fresh.explanation_id, "k", 1, None, None, datetime.now(UTC) + timedelta(seconds=1))
    assert handlers.record_feedback(again, store.uow()) == "stored"
    with store.factory() as s:
        actions = [r[0] for r in s.execute(text("select action from audit order by id"))]
    assert actions[:2] == ["erase_session", "drop_vote_of_erased_session"]


def test_a_vote_from_a_session_the_explanation_was_not_served_to_is_dropped_and_counted(store: Store) -> None:
    exp = _explanation(session="served")
    handlers.on_explanation_created(exp, store.uow())
    cmd = handlers.new_vote(exp.explanation_id, "intruder", 1, 5, "stuffed", T0)
    assert handlers.record_feedback(cmd, store.uow()) == "other_session"
    assert _votes(store) == [] and not [e for e in _staged(store) if e["event_type"] == FeedbackRecorded.type]
    assert handlers.dropped_counts(store.uow()) == {"other_session": 1}


def test_quarantined_votes_from_other_sessions_are_dropped_when_released_and_the_served_one_counts(
    store: Store,
) -> None:
    """The race: votes arrive before the explanation's event. On release only the served session's vote is
    stored; the others are counted, and nothing of them is kept (not even in the quarantine)."""
    eid = uuid.uuid4()
    for i in range(150):
        handlers.record_feedback(handlers.new_vote(eid, f"fresh-{i}", 1, None, None, T0), store.uow())
    handlers.record_feedback(handlers.new_vote(eid, "served", -1, None, None, T0), store.uow())
    assert handlers.on_explanation_created(_explanation(eid, session="served"), store.uow()) == 151
    (vote,) = _votes(store)
    assert vote["session_key"] == "served" and vote["rating"] == -1
    assert handlers.dropped_counts(store.uow()) == {"other_session": 150}
    with store.factory() as s:
        assert s.execute(select(quarantine)).first() is None


def test_an_explanation_without_a_served_session_counts_no_vote(store: Store) -> None:
    exp = _explanation(session=None)
    handlers.on_explanation_created(exp, store.uow())
    cmd = handlers.new_vote(exp.explanation_id, "k", 1, None, None, T0)
    assert handlers.record_feedback(cmd, store.uow()) == "unbound_explanation"
    assert _votes(store) == []


def test_erasing_a_session_held_nowhere_here_writes_only_a_tombstone(store: Store) -> None:
    event, staged = handlers.erase_session("nobody", store.uow(), tombstone_s=60)
    assert not staged and event.feedback_ids == []
    with store.factory() as s:
        counts = {t: s.execute(text(f"select count(*) from {t}")).scalar_one() for t in ("audit", "erasures", "outbox")}
        assert counts == {"audit": 0, "erasures": 0, "outbox": 0}
        assert s.execute(text("select count(*) from erasure_tombstones")).scalar_one() == 1


def test_erasure_forgets_which_explanations_were_served_to_the_session(store: Store) -> None:
    exp = _explanation(session="k")
    handlers.on_explanation_created(exp, store.uow())
    handlers.erase_session("k", store.uow())
    with store.factory() as s:
        assert s.execute(text("select count(*) from served_to")).scalar_one() == 0


def test_concurrent_lookups_of_unseen_explanations_share_one_replica_read(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The vote route's replica reads go in groups: ids asked for while a read is in flight wait for the next
    one; each request still gets its own explanation's answer (served session, none bound, not known)."""
    import asyncio

    from services.feedback.api import KnownIds

    served = [uuid.uuid4() for _ in range(20)]
    for eid in served:
        handlers.on_explanation_created(_explanation(eid, session=f"key-{eid}"), store.uow())
    unbound = uuid.uuid4()
    handlers.on_explanation_created(_explanation(unbound, session=None), store.uow())
    unknown = uuid.uuid4()
    reads: list[int] = []
    real = handlers.served_sessions

    def counted(uow: Any, ids: list[uuid.UUID]) -> dict[uuid.UUID, str | None]:
        reads.append(len(ids))
        return real(uow, ids)

    monkeypatch.setattr(handlers, "served_sessions", counted)
    known_ids = KnownIds()
    asked = [*served, unbound, unknown, served[0]]

    async def all_at_once() -> list[tuple[bool, str | None]]:
        return await asyncio.gather(*(known_ids.lookup(eid, store) for eid in asked))

    answers = asyncio.run(all_at_once())
    assert answers == [
        *((True, f"key-{eid}") for eid in served),
        (True, None),
        (False, None),
        (True, f"key-{served[0]}"),
    ]
    assert reads == [len(served) + 2]  # one read, each id once
    assert known_ids.get(served[3]) == (True, f"key-{served[3]}") and known_ids.get(unknown) == (False, None)
    assert asyncio.run(known_ids.lookup(served[3], store)) == (True, f"key-{served[3]}") and len(reads) == 1
