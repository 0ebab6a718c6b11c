"""The feedback store with more than one of everything: a session with votes on several explanations, several
sessions, several erasures. Each change must touch its own rows and no other (one vote changed, one session
erased), which a store holding a single row cannot show."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from sqlalchemy import select

from services.feedback import handlers
from services.feedback.store import Store, erasure_tombstones, feedback, quarantine, served_to
from shared.privacy import erasure_tag
from tests.support import disposed_after, explanation_created

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(store_url: Callable[[str], str]) -> Iterator[Store]:
    yield from disposed_after(Store(store_url("feedback")))


def _served(store: Store, session: str | None, ticker: str = "AAPL") -> uuid.UUID:
    eid = uuid.uuid4()
    handlers.on_explanation_created(
        explanation_created(eid, session, ticker=ticker, signal="BUY", tokens_in=10, tokens_out=20, created_at=T0),
        store.uow(),
    )
    return eid


def _vote(store: Store, eid: uuid.UUID, session: str, rating: Literal[1, -1], stars: int | None, at: datetime) -> str:
    return handlers.record_feedback(handlers.new_vote(eid, session, rating, stars, None, at), store.uow())


def _utc(at: datetime | None) -> datetime:
    """A time read back from the store (naive on SQLite) as UTC; None fails the test."""
    assert at is not None
    return at.replace(tzinfo=UTC)


def _votes(store: Store) -> dict[tuple[str, str], dict]:
    with store.factory() as s:
        rows = s.execute(select(feedback)).mappings().all()
    return {(r["session_key"], r["explanation_id"]): dict(r) for r in rows}


def test_a_session_changing_one_of_its_two_votes_leaves_the_other_alone(store: Store) -> None:
    first, second = _served(store, "s1"), _served(store, "s1", ticker="MSFT")
    other = _served(store, "s2")
    assert _vote(store, first, "s1", 1, 5, T0) == "stored"
    assert _vote(store, second, "s1", 1, 4, T0) == "stored"
    assert _vote(store, other, "s2", -1, 1, T0) == "stored"
    assert _vote(store, first, "s1", -1, 2, T0 + timedelta(seconds=5)) == "replaced"
    votes = _votes(store)
    assert len(votes) == 3
    changed = votes[("s1", str(first))]
    assert (changed["rating"], changed["stars"], changed["revisions"]) == (-1, 2, 2)
    for key, stars in ((("s1", str(second)), 4), (("s2", str(other)), 1)):
        untouched = votes[key]
        assert (untouched["stars"], untouched["revisions"]) == (stars, 1)
        assert untouched["submitted_at"].replace(tzinfo=UTC) == T0
    assert votes[("s1", str(second))]["rating"] == 1 and votes[("s2", str(other))]["rating"] == -1


def test_the_replica_knows_each_explanation_with_its_own_session(store: Store) -> None:
    a, b, unbound = _served(store, "sa"), _served(store, "sb"), _served(store, None)
    with store.uow() as uow:
        row_a, row_b = uow.repo.explanation(a), uow.repo.explanation(b)
        assert row_a is not None and row_a["session_key"] == "sa"
        assert row_b is not None and row_b["session_key"] == "sb"
        row = uow.repo.explanation(unbound)
        assert row is not None and row["session_key"] is None and row["ticker"] == "AAPL"
        assert uow.repo.explanation(uuid.uuid4()) is None
        # a second copy of the event changes nothing; a new explanation is added
        fields = {k: v for k, v in row.items() if k != "session_key"}
        assert uow.repo.add_explanation({**fields, "explanation_id": str(a)}, session_key="sc") is False
        assert uow.repo.add_explanation({**fields, "explanation_id": str(uuid.uuid4())}, session_key="sd") is True
    with store.factory() as s:
        assert s.execute(select(served_to.c.session_key).where(served_to.c.explanation_id == str(a))).all() == [("sa",)]
        assert s.execute(select(served_to).where(served_to.c.explanation_id == str(unbound))).first() is None


def test_erasing_one_session_keeps_every_other_sessions_rows(store: Store) -> None:
    mine, theirs = _served(store, "gone"), _served(store, "stays")
    _vote(store, mine, "gone", 1, None, T0)
    _vote(store, theirs, "stays", 1, 3, T0)
    unknown = uuid.uuid4()
    _vote(store, unknown, "gone", 1, None, T0)  # quarantined, both sessions
    _vote(store, unknown, "stays", -1, None, T0)
    with store.uow() as uow:
        feedback_ids, explanation_ids = uow.repo.erase_session("gone", T0 + timedelta(hours=1))
        uow.commit()
    assert explanation_ids == [str(mine)] and len(feedback_ids) == 1
    assert set(_votes(store)) == {("stays", str(theirs))}
    with store.factory() as s:
        assert [r.session_key for r in s.execute(select(quarantine.c.session_key))] == ["stays"]
        assert [r.session_key for r in s.execute(select(served_to.c.session_key))] == ["stays"]
    with store.uow() as uow:
        assert uow.repo.holds_session("stays") and not uow.repo.holds_session("gone")
        assert uow.repo.erased_at("gone") is not None and uow.repo.erased_at("stays") is None


def test_holds_session_sees_votes_quarantined_votes_and_served_explanations(store: Store) -> None:
    _served(store, "served-only")
    voted = _served(store, "voter")
    _vote(store, voted, "voter", 1, None, T0)
    _vote(store, uuid.uuid4(), "waiting", 1, None, T0)  # only in the quarantine
    with store.uow() as uow:
        for session in ("served-only", "voter", "waiting"):
            assert uow.repo.holds_session(session), session
        assert not uow.repo.holds_session("nobody")


def test_erasing_a_session_replaces_its_tombstone_and_keeps_the_others(store: Store) -> None:
    eid = _served(store, "k")
    _vote(store, eid, "k", 1, None, T0)
    with store.uow() as uow:
        uow.repo.add_tombstone("k", T0, T0 + timedelta(days=1))
        uow.repo.add_tombstone("other", T0, T0 + timedelta(days=1))
        uow.repo.erase_session("k", T0 + timedelta(hours=1))
        uow.commit()
    with store.factory() as s:
        left = [r.session_key for r in s.execute(select(erasure_tombstones.c.session_key))]
    assert left == [erasure_tag("other")]  # tombstones are kept by the session's tag, not its key


def test_a_second_erasure_moves_the_erasure_time_forward(store: Store) -> None:
    eid = _served(store, "k")
    _vote(store, eid, "k", 1, None, T0)
    first, later = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    for at in (first, later):
        with store.uow() as uow:
            uow.repo.erase_session("k", at)
            uow.commit()
    with store.uow() as uow:
        assert _utc(uow.repo.erased_at("k")) == later


def test_erased_at_is_the_later_of_an_erasure_and_a_tombstone(store: Store) -> None:
    erased, tombstoned = T0 + timedelta(hours=1), T0 + timedelta(hours=3)
    with store.uow() as uow:
        uow.repo.erase_session("k", erased)
        uow.repo.add_tombstone("k", tombstoned, tombstoned + timedelta(days=1))
        uow.repo.add_tombstone("early", T0, T0 + timedelta(days=1))
        uow.commit()
    with store.uow() as uow:
        assert _utc(uow.repo.erased_at("k")) == tombstoned
        assert _utc(uow.repo.erased_at("early")) == T0
    with store.uow() as uow:  # and the other way round
        uow.repo.erase_session("early", T0 + timedelta(hours=5))
        uow.commit()
    with store.uow() as uow:
        assert _utc(uow.repo.erased_at("early")) == T0 + timedelta(hours=5)


def test_a_tombstone_is_replaced_by_a_newer_one_and_purged_only_after_it_expires(store: Store) -> None:
    now = T0 + timedelta(days=10)
    with store.uow() as uow:
        uow.repo.add_tombstone("k", T0, now - timedelta(seconds=1))
        uow.repo.add_tombstone("k", T0 + timedelta(hours=1), now + timedelta(hours=1))  # replaces the first
        uow.repo.add_tombstone("old", T0, now - timedelta(seconds=1))
        uow.repo.add_tombstone("edge", T0, now)
        uow.commit()
    with store.uow() as uow:
        assert uow.repo.purge_tombstones(now) == 1  # only "old": expired before now
        uow.commit()
    with store.uow() as uow:
        assert uow.repo.erased_at("old") is None
        assert _utc(uow.repo.erased_at("k")) == T0 + timedelta(hours=1)
        assert uow.repo.erased_at("edge") is not None


def test_releasing_quarantined_votes_takes_only_that_explanations_in_arrival_order(store: Store) -> None:
    waiting, other = uuid.uuid4(), uuid.uuid4()
    _vote(store, waiting, "s", 1, None, T0)
    _vote(store, other, "s", -1, None, T0)
    _vote(store, waiting, "t", -1, None, T0)
    with store.uow() as uow:
        listed = uow.repo.list_quarantine()
        assert len(listed) == 3 and len(uow.repo.list_quarantine(limit=2)) == 2
        newest_first = [("t", waiting), ("s", other), ("s", waiting)]
        expected = [str(handlers.new_vote(e, k, 1, None, None).feedback_id) for k, e in newest_first]
        assert [r["feedback_id"] for r in listed] == expected
        taken = uow.repo.take_quarantined(waiting)
        uow.commit()
    assert [c["session_key"] for c in taken] == ["s", "t"]
    with store.uow() as uow:
        assert [r["explanation_id"] for r in uow.repo.list_quarantine()] == [str(other)]


def test_dropped_votes_are_counted_per_reason(store: Store) -> None:
    with store.uow() as uow:
        for reason in ("other_session", "other_session", "unbound_explanation"):
            uow.repo.count_dropped(reason)
        uow.commit()
    with store.uow() as uow:
        assert uow.repo.dropped_counts() == {"other_session": 2, "unbound_explanation": 1}


def test_the_audit_log_lists_newest_first_up_to_the_limit(store: Store) -> None:
    with store.uow() as uow:
        for i in range(3):
            uow.repo.audit("admin", "read", f"thing-{i}", {"i": i})
        uow.commit()
    with store.uow() as uow:
        log = uow.repo.audit_log()
        assert [r["subject"] for r in log] == ["thing-2", "thing-1", "thing-0"]
        assert log[0]["actor"] == "admin" and log[0]["action"] == "read" and log[0]["detail"] == {"i": 2}
        assert [r["subject"] for r in uow.repo.audit_log(limit=1)] == ["thing-2"]
