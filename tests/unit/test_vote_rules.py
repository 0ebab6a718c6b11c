"""The vote rules every service that keeps votes applies (`shared.votes`): the newest vote wins whatever order
the queue delivers them in, and what a session did before its erasure stays erased."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from shared import votes
from shared.clock import as_utc

T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_first_vote_is_inserted_and_a_newer_one_replaces_it() -> None:
    assert votes.vote_outcome(None, T0) == "insert"
    assert votes.vote_outcome(T0, T0 + timedelta(seconds=1)) == "replace"


def test_an_older_vote_arriving_late_does_not_overwrite_a_newer_one() -> None:
    assert votes.vote_outcome(T0, T0 - timedelta(seconds=1)) == "stale"


def test_a_second_vote_with_the_same_timestamp_replaces_the_first() -> None:
    # the same message twice is caught by its message id before this rule; two votes stamped alike are two
    # changes of mind, and the one that arrives last wins
    assert votes.vote_outcome(T0, T0) == "replace"
    assert votes.vote_outcome(T0, T0.replace(tzinfo=None)) == "replace"


def test_naive_timestamps_from_sqlite_compare_as_utc() -> None:
    assert votes.vote_outcome(T0.replace(tzinfo=None), T0 + timedelta(seconds=1)) == "replace"
    assert votes.vote_outcome(T0.replace(tzinfo=None), T0 - timedelta(seconds=1)) == "stale"


def test_times_in_another_zone_compare_by_the_instant() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert votes.vote_outcome(T0, T0.astimezone(plus_two) - timedelta(seconds=1)) == "stale"
    assert as_utc(T0.astimezone(plus_two)) == T0
    assert as_utc(T0.astimezone(plus_two)).utcoffset() == timedelta(0)


def test_votes_cast_before_an_erasure_are_dropped_and_later_ones_are_not() -> None:
    assert votes.erased_before(T0, T0 - timedelta(seconds=1))
    assert not votes.erased_before(T0, T0 + timedelta(seconds=1))
    assert not votes.erased_before(None, T0)


def test_a_vote_cast_at_the_instant_of_the_erasure_is_dropped() -> None:
    assert votes.erased_before(T0, T0)
    assert votes.erased_before(T0.replace(tzinfo=None), T0)
    assert not votes.erased_before(T0, T0 + timedelta(microseconds=1))


class Rows:
    """One vote row per feedback id, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.writes: list[bool] = []

    def vote_submitted_at(self, feedback_id: str) -> datetime | None:
        return self.rows[feedback_id]["submitted_at"] if feedback_id in self.rows else None

    def upsert_vote(self, values: dict, *, replace: bool) -> None:
        assert replace == (values["feedback_id"] in self.rows)
        self.writes.append(replace)
        self.rows[values["feedback_id"]] = values


def test_keep_newest_writes_a_new_or_newer_vote_and_skips_a_stale_one() -> None:
    rows = Rows()
    assert votes.keep_newest(rows, {"feedback_id": "f", "rating": 1, "submitted_at": T0}) == "stored"
    later = T0 + timedelta(seconds=1)
    assert votes.keep_newest(rows, {"feedback_id": "f", "rating": -1, "submitted_at": later}) == "replaced"
    earlier = T0 - timedelta(seconds=1)
    assert votes.keep_newest(rows, {"feedback_id": "f", "rating": 1, "submitted_at": earlier}) == "stale"
    assert rows.writes == [False, True]  # insert, then replace; nothing for the stale one
    assert rows.rows["f"]["rating"] == -1


def test_a_vote_row_has_the_common_fields_ids_as_text_the_time_in_utc_and_what_the_store_adds() -> None:
    class Vote:
        feedback_id, explanation_id = uuid.UUID(int=1), uuid.UUID(int=2)
        rating, stars, comment = 1, None, "ok"
        submitted_at = T0.astimezone(timezone(timedelta(hours=2)))

    row = votes.vote_row(Vote(), "comment")
    assert row == {
        "feedback_id": str(uuid.UUID(int=1)),
        "explanation_id": str(uuid.UUID(int=2)),
        "rating": 1,
        "stars": None,
        "submitted_at": T0,
        "comment": "ok",
    }
    assert row["submitted_at"].utcoffset() == timedelta(0)


def test_a_batch_keeps_each_votes_newest_row_and_counts_its_writes() -> None:
    """`NewestInBatch` decides each vote of a batch after the ones before it, and writes each id once."""
    batch = votes.NewestInBatch({"stored": T0})  # "stored" has a row from before the batch
    row = lambda fid, s, rating=1: {"feedback_id": fid, "submitted_at": T0 + timedelta(seconds=s), "rating": rating}  # noqa: E731
    outcomes = [
        batch.keep(row("new", 1)),
        batch.keep(row("new", 3, rating=-1)),
        batch.keep(row("new", 2)),  # older than the one the batch already kept
        batch.keep(row("stored", -1)),  # older than the stored row
        batch.keep(row("stored", 5)),
    ]
    assert outcomes == ["stored", "replaced", "stale", "stale", "replaced"]
    new, replacing = batch.writes()
    assert new == [(row("new", 3, rating=-1), 2)]  # the newest row, written twice by the batch
    assert replacing == [(row("stored", 5), 1)]


def test_the_latest_erasure_of_a_vote_counts_whatever_order_they_arrive_in() -> None:
    assert votes.later_erasure(None, T0)
    assert votes.later_erasure(T0, T0 + timedelta(seconds=1))
    assert not votes.later_erasure(T0, T0 - timedelta(seconds=1))  # a late, older erasure moves nothing back
    assert not votes.later_erasure(T0, T0)
    assert not votes.later_erasure(T0.replace(tzinfo=None), T0.astimezone(timezone(timedelta(hours=2))))
