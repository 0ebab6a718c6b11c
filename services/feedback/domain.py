"""Feedback rules, free of any framework.

- One vote per (session, explanation): the vote's id is derived from both, so a second vote from the same
  session replaces the first (the newer `submitted_at` wins, whatever order the queue delivers them in).
- Feedback on an explanation the service has not seen is quarantined, never counted; it is released when
  the explanation's `ExplanationCreated` arrives (the two can race), and stays quarantined otherwise.
- A vote submitted before its session was erased is dropped when it arrives after the erasure.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from shared.contracts import derived_id

QUARANTINE_UNKNOWN = "explanation id not (yet) issued by the router"


def feedback_id_for(session_key: str, explanation_id: uuid.UUID) -> uuid.UUID:
    return derived_id("feedback", session_key, explanation_id)


@dataclass(frozen=True)
class StoredVote:
    rating: int
    stars: int | None
    submitted_at: datetime


def vote_outcome(existing: StoredVote | None, submitted_at: datetime) -> str:
    """'insert', 'replace' or 'stale' (an older vote that arrived after a newer one)."""
    if existing is None:
        return "insert"
    if _aware(submitted_at) < _aware(existing.submitted_at):
        return "stale"
    return "replace"


def erased_before(erased_at: datetime | None, submitted_at: datetime) -> bool:
    """True when the vote was cast before its session asked to be forgotten."""
    return erased_at is not None and _aware(submitted_at) <= _aware(erased_at)


def _aware(ts: datetime) -> datetime:
    from datetime import UTC

    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
