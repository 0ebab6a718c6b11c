"""The vote rules every service that keeps votes applies, pure (no I/O).

- One vote per (session, explanation) under one feedback id; a second vote replaces the first, and the newer
  `submitted_at` wins whatever order the queue delivers them in (`vote_outcome`).
- A vote cast before its session was erased is dropped when it arrives after the erasure, and so is an
  explanation served before it (`erased_before`); what the session does after its erasure counts again.
"""

from __future__ import annotations

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


def erased_before(erased_at: datetime | None, submitted_at: datetime) -> bool:
    """True when something was submitted (a vote cast, an explanation served) at or before its session asked
    to be forgotten: it must not come back."""
    return erased_at is not None and as_utc(submitted_at) <= as_utc(erased_at)
