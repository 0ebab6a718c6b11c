from __future__ import annotations

import uuid
from datetime import UTC, datetime

from services.feedback import domain
from shared.privacy import session_key

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_vote_id_is_the_same_for_the_same_session_and_explanation() -> None:
    exp = uuid.uuid4()
    assert domain.feedback_id_for("k1", exp) == domain.feedback_id_for("k1", exp)
    assert domain.feedback_id_for("k1", exp) != domain.feedback_id_for("k2", exp)
    assert domain.feedback_id_for("k1", exp) != domain.feedback_id_for("k1", uuid.uuid4())


def test_session_key_is_keyed_and_not_the_raw_id() -> None:
    a = session_key("session-123", b"secret-a")
    assert a != "session-123" and len(a) == 64
    assert a == session_key("session-123", b"secret-a")
    assert a != session_key("session-123", b"secret-b")


def test_refusals_tell_a_frontend_what_happened_and_the_quarantine_says_what_it_waits_for() -> None:
    """The 403 messages are what a frontend shows or logs: each says why the vote does not count."""
    from services.feedback import domain as d

    assert d.REFUSAL_MESSAGES[d.OTHER_SESSION].startswith("this explanation was not served to this session")
    assert d.REFUSAL_MESSAGES[d.UNBOUND].startswith("votes on this explanation cannot be verified")
    assert d.REFUSAL_MESSAGES[d.UNBOUND].endswith("are not accepted") and "erased" in d.REFUSAL_MESSAGES[d.UNBOUND]
    assert d.vote_refusal(None, "k") == d.UNBOUND and d.vote_refusal("a", "b") == d.OTHER_SESSION
    assert d.OTHER_SESSION == "other_session" and d.UNBOUND == "unbound_explanation"  # metric label values
    assert d.QUARANTINE_UNKNOWN.startswith("explanation id not") and d.QUARANTINE_UNKNOWN.endswith("by the router")
