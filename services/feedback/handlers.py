"""Feedback use cases. Each takes a message and its dependencies, commits one unit of work, and stages the
events it caused (published from the outbox after the commit). All are idempotent on the message id."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from services.feedback import domain
from services.feedback.store import SqlUnitOfWork
from shared.contracts import (
    ExplanationCreated,
    FeedbackErased,
    FeedbackRecorded,
    RecordFeedback,
    derived_id,
    utcnow,
)

log = logging.getLogger(__name__)


def record_feedback(cmd: RecordFeedback, uow: SqlUnitOfWork) -> str:
    """Store a vote. Returns what happened: stored, replaced, stale, duplicate, quarantined, erased."""
    with uow:
        repo = uow.repo
        if repo.seen(cmd.message_id):
            return "duplicate"
        repo.mark_seen(cmd.message_id)
        outcome = _apply_vote(cmd, uow)
        uow.commit()
    log.info("feedback %s", outcome, extra={"feedback_id": str(cmd.feedback_id)})
    return outcome


def _apply_vote(cmd: RecordFeedback, uow: SqlUnitOfWork) -> str:
    repo = uow.repo
    if domain.erased_before(repo.erased_at(cmd.session_key), cmd.submitted_at):
        repo.audit("worker", "drop_vote_of_erased_session", cmd.session_key[:12], {"feedback_id": str(cmd.feedback_id)})
        return "erased"
    explanation = repo.explanation(cmd.explanation_id)
    if explanation is None:
        repo.quarantine(cmd.message_id, cmd.to_payload(), domain.QUARANTINE_UNKNOWN)
        return "quarantined"
    existing = repo.vote(cmd.feedback_id)
    outcome = domain.vote_outcome(existing, cmd.submitted_at)
    if outcome == "stale":
        return "stale"
    repo.upsert_vote(
        {
            "feedback_id": str(cmd.feedback_id),
            "explanation_id": str(cmd.explanation_id),
            "session_key": cmd.session_key,
            "rating": cmd.rating,
            "stars": cmd.stars,
            "comment": cmd.comment,
            "submitted_at": cmd.submitted_at,
            "stored_at": utcnow(),
        },
        replace=outcome == "replace",
    )
    uow.add_events(
        FeedbackRecorded(
            message_id=derived_id("feedback.recorded", cmd.message_id),
            feedback_id=cmd.feedback_id,
            explanation_id=cmd.explanation_id,
            session_key=cmd.session_key,
            rating=cmd.rating,
            stars=cmd.stars,
            has_comment=bool(cmd.comment),
            replaced=outcome == "replace",
            submitted_at=cmd.submitted_at,
            prompt_name=explanation["prompt_name"],
            prompt_version=explanation["prompt_version"],
            model=explanation["model"],
            signal=explanation["signal"],
            ticker=explanation["ticker"],
            experiment_id=explanation["experiment_id"],
            arm_id=explanation["arm_id"],
        )
    )
    return "replaced" if outcome == "replace" else "stored"


def on_explanation_created(event: ExplanationCreated, uow: SqlUnitOfWork) -> int:
    """Keep the replica of issued explanation ids; release votes that arrived before it. Returns how many
    quarantined votes were released."""
    with uow:
        repo = uow.repo
        if repo.seen(event.message_id):
            return 0
        repo.mark_seen(event.message_id)
        repo.add_explanation(
            {
                "explanation_id": str(event.explanation_id),
                "prompt_name": event.prompt_name,
                "prompt_version": event.prompt_version,
                "model": event.model,
                "signal": event.signal,
                "ticker": event.ticker,
                "experiment_id": event.experiment_id,
                "arm_id": event.arm_id,
                "created_at": event.created_at,
            }
        )
        released = repo.take_quarantined(event.explanation_id)
        for payload in released:
            _apply_vote(RecordFeedback.from_payload(payload), uow)
        uow.commit()
    return len(released)


def erase_session(session_key: str, uow: SqlUnitOfWork, *, actor: str = "data-subject") -> FeedbackErased:
    """Forget every vote and comment of a session, remember that it asked (so queued votes cast before the
    request are dropped too), audit it, and tell the other services."""
    now = utcnow()
    with uow:
        feedback_ids, explanation_ids = uow.repo.erase_session(session_key, now)
        event = FeedbackErased(
            message_id=derived_id("feedback.erased", session_key, now.isoformat()),
            session_key=session_key,
            feedback_ids=[uuid.UUID(f) for f in feedback_ids],
            explanation_ids=[uuid.UUID(e) for e in explanation_ids],
            erased_at=now,
        )
        uow.repo.audit(actor, "erase_session", session_key[:12], {"votes_erased": len(feedback_ids)})
        uow.add_events(event)
        uow.commit()
    return event


def audit_read(uow: SqlUnitOfWork, what: str, detail: dict | None = None) -> None:
    with uow:
        uow.repo.audit("admin", "read", what, detail or {})
        uow.commit()


def known_explanation(uow: SqlUnitOfWork, explanation_id: uuid.UUID) -> bool:
    with uow:
        return uow.repo.explanation(explanation_id) is not None


def new_vote(
    explanation_id: uuid.UUID,
    session_key: str,
    rating: int,
    stars: int | None,
    comment: str | None,
    submitted_at: datetime | None = None,
) -> RecordFeedback:
    return RecordFeedback(
        feedback_id=domain.feedback_id_for(session_key, explanation_id),
        explanation_id=explanation_id,
        session_key=session_key,
        rating=rating,  # type: ignore[arg-type]
        stars=stars,
        comment=comment,
        submitted_at=submitted_at or utcnow(),
    )
