"""The feedback rules at their edges: the vote id is stable across releases (a re-vote after a deploy must replace,
not add), equal timestamps, a vote cast at the very instant of an erasure, and the refusal of a session the
explanation was not served to."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from services.feedback import domain

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EXPLANATION = uuid.UUID("00000000-0000-4000-8000-000000000001")


def test_the_vote_id_is_the_same_in_every_release() -> None:
    # uuid5(NAMESPACE_URL, "selflearn:feedback:session-key-1:<explanation id>"): votes stored by an older release
    # must be found (and replaced) by a newer one
    expected = uuid.UUID("5ae4e332-6f3c-5f23-aee6-3cb282e70fd0")
    assert domain.feedback_id_for("session-key-1", EXPLANATION) == expected
    assert expected == uuid.uuid5(uuid.NAMESPACE_URL, f"selflearn:feedback:session-key-1:{EXPLANATION}")


def test_only_the_session_an_explanation_was_served_to_may_vote_on_it() -> None:
    assert domain.vote_refusal("served", "served") is None
    assert domain.vote_refusal("served", "other") == domain.OTHER_SESSION
    assert domain.vote_refusal("served", "serve") == domain.OTHER_SESSION  # a prefix is another session
    assert domain.vote_refusal(None, "served") == domain.UNBOUND
    assert set(domain.REFUSAL_MESSAGES) == {domain.OTHER_SESSION, domain.UNBOUND}
