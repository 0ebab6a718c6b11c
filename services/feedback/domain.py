"""Feedback rules, free of any framework.

- One vote per (session, explanation): the vote's id is derived from both, so a second vote from the same
  session replaces the first (the newer `submitted_at` wins, whatever order the queue delivers them in).
- Feedback on an explanation the service has not seen is quarantined, never counted; it is released when
  the explanation's `ExplanationCreated` arrives (the two can race), and stays quarantined otherwise.
- A vote submitted before its session was erased is dropped when it arrives after the erasure.
  (These two are `shared.votes`, the rules every service that keeps votes applies.)
- A vote counts only from the session the explanation was served to (`ExplanationCreated.session_key`). The
  API refuses any other session's vote (403) when the replica already knows the explanation; a vote that was
  quarantined because the explanation had not arrived yet is checked when it is released, and dropped (only
  counted) if it came from another session. An explanation that carries no session key (it predates the
  binding, or its session was erased) cannot be voted on: no vote on it can be verified, so none counts.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from datetime import datetime

from shared.contracts import derived_id

QUARANTINE_UNKNOWN = "explanation id not (yet) issued by the router"
OTHER_SESSION = "other_session"
UNBOUND = "unbound_explanation"

REFUSAL_MESSAGES = {
    OTHER_SESSION: "this explanation was not served to this session: only the session it was served to can vote on it",
    UNBOUND: "votes on this explanation cannot be verified (it predates session binding, or the session it was "
    "served to was erased) and are not accepted",
}


def feedback_id_for(session_key: str, explanation_id: uuid.UUID) -> uuid.UUID:
    return derived_id("feedback", session_key, explanation_id)


@dataclass(frozen=True)
class StoredVote:
    rating: int
    stars: int | None
    submitted_at: datetime


def vote_refusal(served_session_key: str | None, voter_session_key: str) -> str | None:
    """Why a session's vote on an explanation does not count (OTHER_SESSION, UNBOUND), or None when it does."""
    if served_session_key is None:
        return UNBOUND
    if not hmac.compare_digest(served_session_key.encode(), voter_session_key.encode()):
        return OTHER_SESSION
    return None
