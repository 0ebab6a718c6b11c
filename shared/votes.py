"""The vote rules every service that keeps votes applies, pure (no I/O).

- One vote per (session, explanation) under one feedback id; a second vote replaces the first, and the newer
  `submitted_at` wins whatever order the queue delivers them in (`vote_outcome`).
- A vote cast before its session was erased is dropped when it arrives after the erasure, and so is an
  explanation served before it (`erased_before`); what the session does after its erasure counts again.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, Protocol

from shared.clock import as_utc

VoteOutcome = Literal["insert", "replace", "stale"]


def vote_outcome(stored_submitted_at: datetime | None, submitted_at: datetime) -> VoteOutcome:
    """'insert' (no vote under this id yet), 'replace' (same time or newer than the stored one) or 'stale'
    (older than what is stored: a late redelivery, which must not overwrite the newer vote)."""
    if stored_submitted_at is None:
        return "insert"
    if as_utc(submitted_at) < as_utc(stored_submitted_at):
        return "stale"
    return "replace"


class VoteRows(Protocol):
    """Where a service keeps one row per feedback id (its repository)."""

    def vote_submitted_at(self, feedback_id: Any) -> datetime | None: ...
    def upsert_vote(self, values: dict[str, Any], *, replace: bool) -> None: ...


#: What every store of votes keeps of a vote; each adds its own columns (`vote_row`).
VOTE_FIELDS: tuple[str, ...] = ("feedback_id", "explanation_id", "rating", "stars", "submitted_at")


def vote_row(message: Any, *fields: str) -> dict[str, Any]:
    """A vote (`RecordFeedback`, `FeedbackRecorded`) as a store's row: `VOTE_FIELDS` with the ids as text and
    `submitted_at` in UTC, and the message's `fields` as they are."""
    row = {name: getattr(message, name) for name in (*VOTE_FIELDS, *fields)}
    row.update(
        feedback_id=str(message.feedback_id),
        explanation_id=str(message.explanation_id),
        submitted_at=as_utc(message.submitted_at),
    )
    return row


def keep_newest(rows: VoteRows, row: dict[str, Any]) -> Literal["stored", "replaced", "stale"]:
    """Store the vote `row` (a `vote_row`) by `vote_outcome`: a stale vote is not written ('stale'); otherwise
    it becomes a new row or replaces the stored one under its feedback id ('stored' or 'replaced')."""
    outcome = vote_outcome(rows.vote_submitted_at(row["feedback_id"]), row["submitted_at"])
    if outcome == "stale":
        return "stale"
    rows.upsert_vote(row, replace=outcome == "replace")
    return "replaced" if outcome == "replace" else "stored"


class NewestInBatch:
    """`keep_newest` for a batch of votes applied in order, in memory: `keep(row)` gives each vote the outcome
    it would have had alone (after the ones before it in the batch), and the store then writes only each
    feedback id's last kept row (`writes`), with how many times it was written (a store that counts its
    revisions adds them). `stored` maps the batch's feedback ids to the `submitted_at` stored before it."""

    def __init__(self, stored: dict[str, datetime]) -> None:
        self._latest = dict(stored)
        self._existed = set(stored)
        self._rows: dict[str, dict[str, Any]] = {}
        self._times: dict[str, int] = {}

    def keep(self, row: dict[str, Any]) -> Literal["stored", "replaced", "stale"]:
        fid = row["feedback_id"]
        outcome = vote_outcome(self._latest.get(fid), row["submitted_at"])
        if outcome == "stale":
            return "stale"
        self._latest[fid] = row["submitted_at"]
        self._rows[fid] = row
        self._times[fid] = self._times.get(fid, 0) + 1
        return "replaced" if outcome == "replace" else "stored"

    def writes(self) -> tuple[list[tuple[dict[str, Any], int]], list[tuple[dict[str, Any], int]]]:
        """(new rows, rows replacing a stored one), each with the number of times the batch wrote it."""
        new = [(row, self._times[fid]) for fid, row in self._rows.items() if fid not in self._existed]
        replacing = [(row, self._times[fid]) for fid, row in self._rows.items() if fid in self._existed]
        return new, replacing


class BatchVoteRows(Protocol):
    """Where a service keeps its votes and the ids of erased votes, read for a whole batch at once."""

    def votes_submitted_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]: ...
    def votes_erased_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]: ...


def keep_newest_of_batch(rows: BatchVoteRows, messages: list[Any], *fields: str) -> tuple[list[str], NewestInBatch]:
    """`keep_newest` for a batch of vote events (`FeedbackRecorded`) in order, with the stored and the erased
    votes read once for the batch: 'erased' for a vote cast before its erasure (`erased_before`), else the
    vote's outcome after the ones before it. Returns the outcomes and the rows to write (`NewestInBatch`)."""
    fids = [str(m.feedback_id) for m in messages]
    erased = rows.votes_erased_at(fids)
    newest = NewestInBatch(rows.votes_submitted_at(fids))
    outcomes = [
        "erased" if erased_before(erased.get(str(m.feedback_id)), m.submitted_at) else newest.keep(vote_row(m, *fields))
        for m in messages
    ]
    return outcomes, newest


def erased_before(erased_at: datetime | None, submitted_at: datetime) -> bool:
    """True when something was submitted (a vote cast, an explanation served) at or before its session asked
    to be forgotten: it must not come back."""
    return erased_at is not None and as_utc(submitted_at) <= as_utc(erased_at)


def later_erasure(remembered_at: datetime | None, erased_at: datetime) -> bool:
    """True when an erasure at `erased_at` replaces the one remembered for the same vote: the latest erasure
    counts, so a late or replayed older one never moves the time back (a vote cast between the two would
    otherwise count again)."""
    return remembered_at is None or as_utc(erased_at) > as_utc(remembered_at)
