"""Feedback use cases. Each takes a message and its dependencies, commits one unit of work, and stages the
events it caused (published from the outbox after the commit). All are idempotent on the message id."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from services.feedback import domain
from services.feedback.store import EXPLANATION_FIELDS, ExplanationRow, SqlUnitOfWork
from shared import votes
from shared.contracts import (
    ExplanationCreated,
    FeedbackErased,
    FeedbackRecorded,
    RecordFeedback,
    derived_id,
    utcnow,
)
from shared.db import handle_many_once, handle_once
from shared.privacy import erasure_tag

log = logging.getLogger(__name__)


def record_feedback(cmd: RecordFeedback, uow: SqlUnitOfWork) -> str:
    """Store a vote. Returns what happened: stored, replaced, stale, duplicate, quarantined, erased, or the
    reason it does not count (other_session, unbound_explanation)."""

    def apply(uow: SqlUnitOfWork) -> str:
        outcome = _apply_vote(cmd, uow)
        log.info("feedback %s", outcome, extra={"feedback_id": str(cmd.feedback_id)})
        return outcome

    return handle_once(uow, cmd.message_id, apply)


def record_feedback_batch(cmds: list[RecordFeedback], uow: SqlUnitOfWork) -> list[str]:
    """`record_feedback` for a batch, set-based: the same outcomes, in order, and the same stored state as the
    votes one after the other, in one unit of work of a few statements whatever the batch's size (one query
    each for the handled message ids, the sessions' erasures, the replica's explanations and the stored votes;
    one insert or update of many rows for each kind of write)."""

    def apply(uow: SqlUnitOfWork, fresh: list[RecordFeedback]) -> list[str]:
        repo = uow.repo
        erased = repo.erased_at_many(c.session_key for c in fresh)
        replica = repo.explanations_by_id(c.explanation_id for c in fresh)
        batch = _VoteBatch(repo.votes_submitted_at(str(c.feedback_id) for c in fresh))
        outcomes: list[str] = []
        for cmd in fresh:
            outcome = batch.vote(cmd, erased.get(cmd.session_key), replica.get(str(cmd.explanation_id)))
            outcomes.append(outcome)
            log.info("feedback %s", outcome, extra={"feedback_id": str(cmd.feedback_id)})
        batch.write(uow)
        return outcomes

    return handle_many_once(uow, cmds, apply)


class _VoteBatch:
    """The votes of a batch, applied in order in memory by `_apply_vote`'s rules (`vote`), then written in a few
    statements (`write`): the votes each feedback id keeps, the audit of votes dropped for an erased session,
    the quarantined votes, the refusal counts, and the events staged (`events`, in the order they were caused;
    a caller may add its own there). `stored` maps the batch's feedback ids to the `submitted_at` stored."""

    def __init__(self, stored: dict[str, datetime]) -> None:
        self.newest = votes.NewestInBatch(stored)
        self.dropped: list[str] = []
        self.quarantined: list[tuple[uuid.UUID, dict]] = []
        self.refused: Counter[str] = Counter()
        self.events: list[FeedbackRecorded | FeedbackErased] = []

    def vote(self, cmd: RecordFeedback, erased_at: datetime | None, explanation: ExplanationRow | None) -> str:
        """The vote's outcome, given its session's erasure and the replica's row of its explanation."""
        outcome, event = _batch_outcome(cmd, erased_at, explanation, self.newest)
        if outcome == "erased":
            self.dropped.append(erasure_tag(cmd.session_key)[:12])
        elif outcome == "quarantined":
            self.quarantined.append((cmd.message_id, cmd.to_payload()))
        elif outcome in domain.REFUSAL_MESSAGES:
            self.refused[outcome] += 1
        if event is not None:
            self.events.append(event)
        return outcome

    def write(self, uow: SqlUnitOfWork) -> None:
        repo = uow.repo
        repo.audit_many("worker", "drop_vote_of_erased_session", self.dropped, {})
        repo.quarantine_many(self.quarantined, domain.QUARANTINE_UNKNOWN)
        for reason, n in sorted(self.refused.items()):
            repo.count_dropped(reason, n)
        repo.write_votes(self.newest)
        uow.add_events(*self.events)


def _apply_vote(cmd: RecordFeedback, uow: SqlUnitOfWork) -> str:
    repo = uow.repo
    if votes.erased_before(repo.erased_at(cmd.session_key), cmd.submitted_at):
        repo.audit("worker", "drop_vote_of_erased_session", erasure_tag(cmd.session_key)[:12], {})
        return "erased"
    explanation = repo.explanation(cmd.explanation_id)
    if explanation is None:
        repo.quarantine(cmd.message_id, cmd.to_payload(), domain.QUARANTINE_UNKNOWN)
        return "quarantined"
    refusal = domain.vote_refusal(explanation["session_key"], cmd.session_key)
    if refusal is not None:  # counted, never stored: nothing of the vote is kept
        repo.count_dropped(refusal)
        return refusal
    row = votes.vote_row(cmd, "session_key", "comment") | {"stored_at": utcnow()}
    outcome = votes.keep_newest(repo, row)
    if outcome == "stale":
        return "stale"
    uow.add_events(_recorded(cmd, explanation, replaced=outcome == "replaced"))
    return outcome


def _batch_outcome(
    cmd: RecordFeedback,
    erased_at: datetime | None,
    explanation: ExplanationRow | None,
    newest: votes.NewestInBatch,
) -> tuple[str, FeedbackRecorded | None]:
    """`_apply_vote`'s decision for a vote of a batch, given its session's erasure, the replica's row of its
    explanation and the votes the batch kept before it (`newest`, which keeps this one if it counts). Returns
    the outcome and, for a stored or replacing vote, the FeedbackRecorded to publish."""
    if votes.erased_before(erased_at, cmd.submitted_at):
        return "erased", None
    if explanation is None:
        return "quarantined", None
    refusal = domain.vote_refusal(explanation["session_key"], cmd.session_key)
    if refusal is not None:
        return refusal, None
    outcome = newest.keep(votes.vote_row(cmd, "session_key", "comment") | {"stored_at": utcnow()})
    if outcome == "stale":
        return "stale", None
    return outcome, _recorded(cmd, explanation, replaced=outcome == "replaced")


def _recorded(cmd: RecordFeedback, explanation: ExplanationRow, *, replaced: bool) -> FeedbackRecorded:
    return FeedbackRecorded(
        message_id=derived_id("feedback.recorded", cmd.message_id),
        feedback_id=cmd.feedback_id,
        explanation_id=cmd.explanation_id,
        session_key=cmd.session_key,
        rating=cmd.rating,
        stars=cmd.stars,
        has_comment=bool(cmd.comment),
        replaced=replaced,
        submitted_at=cmd.submitted_at,
        prompt_name=explanation["prompt_name"],
        prompt_version=explanation["prompt_version"],
        model=explanation["model"],
        signal=explanation["signal"],
        ticker=explanation["ticker"],
        experiment_id=explanation["experiment_id"],
        arm_id=explanation["arm_id"],
    )


def on_explanation_created(event: ExplanationCreated, uow: SqlUnitOfWork) -> int:
    """Keep the replica of issued explanation ids; release votes that arrived before it. Returns how many
    quarantined votes were released. An explanation served before its session was erased (the event was still
    on its way) is kept without the session: no vote on it counts, the key is not stored, and the erasure is
    announced again for it, so the services that hold it (the router first) forget the session there too."""

    def apply(uow: SqlUnitOfWork) -> int:
        repo = uow.repo
        erased_at = repo.erased_at(event.session_key) if event.session_key else None
        served_key, erased_again = _served_key(event, erased_at)
        if erased_again is not None:
            uow.add_events(erased_again)
        repo.add_explanation(_replica_row(event), session_key=served_key)
        released = repo.take_quarantined(event.explanation_id)
        for payload in released:
            _apply_vote(RecordFeedback.from_payload(payload), uow)
        return len(released)

    return handle_once(uow, event.message_id, apply, duplicate=0)


def on_explanation_created_batch(events: list[ExplanationCreated], uow: SqlUnitOfWork) -> list[int]:
    """`on_explanation_created` for a batch, set-based: the same outcomes, in order, the same replica, released
    votes, refusal counts, audit and staged events as one by one, in a few statements (one query each for the
    handled ids, the replica's rows, the quarantined votes, the erasures of the sessions served and voting and
    the stored votes; one insert or update of many rows for each kind of write). An explanation twice in the
    batch (under two message ids) is kept as its first message has it, and its votes are released once."""

    def apply(uow: SqlUnitOfWork, fresh: list[ExplanationCreated]) -> list[int]:
        repo = uow.repo
        replica = repo.explanations_by_id(e.explanation_id for e in fresh)
        waiting = {
            eid: [RecordFeedback.from_payload(p) for p in payloads]
            for eid, payloads in repo.take_quarantined_many(str(e.explanation_id) for e in fresh).items()
        }
        released = [cmd for cmds in waiting.values() for cmd in cmds]
        erased = repo.erased_at_many(
            [e.session_key for e in fresh if e.session_key] + [c.session_key for c in released]
        )
        batch = _VoteBatch(repo.votes_submitted_at(str(c.feedback_id) for c in released))
        new: list[tuple[dict, str | None]] = []
        outcomes = []
        for e in fresh:
            eid = str(e.explanation_id)
            served_key, erased_again = _served_key(e, erased.get(e.session_key) if e.session_key else None)
            if erased_again is not None:
                batch.events.append(erased_again)
            if eid not in replica:
                row = _replica_row(e)
                new.append((row, served_key))
                replica[eid] = cast(ExplanationRow, row | {"session_key": served_key or None})  # as read back
            cmds = waiting.pop(eid, [])
            for cmd in cmds:
                batch.vote(cmd, erased.get(cmd.session_key), replica[eid])
            outcomes.append(len(cmds))
        repo.add_explanations(new)
        batch.write(uow)
        return outcomes

    return handle_many_once(uow, events, apply, duplicate=0)


def _served_key(event: ExplanationCreated, erased_at: datetime | None) -> tuple[str | None, FeedbackErased | None]:
    """The session the replica binds the explanation to, and the erasure to announce again, given when its
    session asked to be forgotten (`erased_at`). Served while its session was being erased (the router wrote it
    after handling the erasure, or its event was on its way): bound to no session, and erased again everywhere,
    this explanation included."""
    if event.session_key and erased_at is not None and votes.erased_before(erased_at, event.created_at):
        again = FeedbackErased(
            message_id=derived_id("feedback.erased", event.session_key, event.explanation_id),
            session_key=event.session_key,
            feedback_ids=[],
            explanation_ids=[event.explanation_id],
            erased_at=erased_at,
        )
        return None, again
    return event.session_key, None


def _replica_row(event: ExplanationCreated) -> dict[str, Any]:
    return event.row(*EXPLANATION_FIELDS)


def erase_session(
    session_key: str, uow: SqlUnitOfWork, *, actor: str = "data-subject", tombstone_s: float = 2 * 86_400
) -> tuple[FeedbackErased, bool]:
    """Forget every vote and comment of a session and its events in the outbox (a vote not yet published is
    never published), remember that it asked by its erasure tag (so queued votes cast before the request are
    dropped too), audit it, and tell the other services. Returns the event and whether it was staged in the
    outbox (where its payload, which names the key, is dropped once published).

    A session this service holds nothing of (no vote, no quarantined vote, no explanation served to it) leaves
    no permanent row: only a tombstone that drops its votes still in flight and is purged after `tombstone_s`,
    and the event is not staged (the caller publishes it directly, and answers 503 if it cannot): otherwise
    anyone could add rows for ever by erasing made-up sessions."""
    now = utcnow()
    with uow:
        repo = uow.repo
        repo.purge_tombstones(now)
        held = repo.holds_session(session_key)
        if held:
            feedback_ids, explanation_ids = repo.erase_session(session_key, now)
            repo.audit(actor, "erase_session", erasure_tag(session_key)[:12], {"votes_erased": len(feedback_ids)})
        else:
            feedback_ids, explanation_ids = [], []
            repo.add_tombstone(session_key, now, now + timedelta(seconds=tombstone_s))
        event = FeedbackErased(
            message_id=derived_id("feedback.erased", session_key, now.isoformat()),
            session_key=session_key,
            feedback_ids=[uuid.UUID(f) for f in feedback_ids],
            explanation_ids=[uuid.UUID(e) for e in explanation_ids],
            erased_at=now,
        )
        if held:
            uow.add_events(event)
        uow.commit()
    return event, held


def audit_read(uow: SqlUnitOfWork, what: str, detail: dict | None = None) -> None:
    with uow:
        uow.repo.audit("admin", "read", what, detail or {})
        uow.commit()


def served_session(uow: SqlUnitOfWork, explanation_id: uuid.UUID) -> tuple[bool, str | None]:
    """(whether the replica knows the explanation, the session key it was served to or None)."""
    with uow:
        row = uow.repo.explanation(explanation_id)
    return (False, None) if row is None else (True, row["session_key"])


def served_sessions(uow: SqlUnitOfWork, explanation_ids: list[uuid.UUID]) -> dict[uuid.UUID, str | None]:
    """`served_session` for many explanations in one read: the ones the replica knows, with the session key
    each was served to (None: not bound); an id it does not know is absent."""
    with uow:
        rows = uow.repo.explanations_by_id(explanation_ids)
    return {eid: rows[str(eid)]["session_key"] for eid in explanation_ids if str(eid) in rows}


def dropped_counts(uow: SqlUnitOfWork) -> dict[str, int]:
    with uow:
        return uow.repo.dropped_counts()


def new_vote(
    explanation_id: uuid.UUID,
    session_key: str,
    rating: Literal[1, -1],
    stars: int | None,
    comment: str | None,
    submitted_at: datetime | None = None,
) -> RecordFeedback:
    return RecordFeedback(
        feedback_id=domain.feedback_id_for(session_key, explanation_id),
        explanation_id=explanation_id,
        session_key=session_key,
        rating=rating,
        stars=stars,
        comment=comment,
        submitted_at=submitted_at or utcnow(),
    )
