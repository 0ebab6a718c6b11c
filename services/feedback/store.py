"""The feedback service's own store: its tables, repository and unit of work. No other service opens it."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TypedDict, cast

import sqlalchemy as sa

from services.feedback.domain import StoredVote
from shared import db
from shared.clock import as_utc
from shared.contracts import ExplanationCreated, Signal, utcnow
from shared.outbox import outbox_table
from shared.privacy import erasure_tag
from shared.votes import NewestInBatch

metadata = sa.MetaData()

explanations = sa.Table(
    "explanations",
    metadata,
    *db.contract_columns("explanation_id", primary_key=True),
    *db.contract_columns(
        "prompt_name", "prompt_version", "model", "signal", "ticker", "experiment_id", "arm_id", "created_at"
    ),
)
#: What this copy keeps of each ExplanationCreated.
EXPLANATION_FIELDS = db.copied_fields(explanations, ExplanationCreated)

# The session each explanation was served to (keyed hash, from ExplanationCreated.session_key): the only session
# whose vote on it counts. A table of its own rather than a column of `explanations`, so a store made before it
# gains it at start-up (create_all adds missing tables, never missing columns). An explanation without a row
# here predates the binding: no session's vote on it can be verified, so none counts.
served_to = sa.Table(
    "served_to",
    metadata,
    *db.contract_columns("explanation_id", primary_key=True),
    *db.contract_columns("session_key", index=True),
)

feedback = sa.Table(
    "feedback",
    metadata,
    *db.contract_columns("feedback_id", primary_key=True),
    *db.contract_columns("explanation_id", "session_key", index=True),
    *db.contract_columns("rating", "stars"),
    sa.Column("comment", sa.Text),
    *db.contract_columns("submitted_at"),
    sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revisions", sa.Integer, nullable=False, default=1),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("message_id", sa.String(36), primary_key=True),
    *db.contract_columns("feedback_id", "explanation_id", "session_key", index=True),
    sa.Column("command", sa.JSON, nullable=False),
    sa.Column("reason", sa.String(200), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)

# Erasure records keep `erasure_tag(session_key)` (a one-way digest, in the column named session_key), never the
# key itself: enough to drop a vote of the session still in flight, nothing to join with.
erasures = sa.Table(
    "erasures",
    metadata,
    *db.erasure_columns(),
)

# An erasure of a session this service held nothing of: remembered only until votes still in flight have
# arrived (they are dropped if cast before it), then purged, so such requests leave no permanent row.
erasure_tombstones = sa.Table(
    "erasure_tombstones",
    metadata,
    *db.erasure_columns(),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

# How many votes the worker dropped, by reason (e.g. a quarantined vote from a session the explanation was not
# served to, released when the explanation arrived). Counts only: nothing of the dropped vote is kept.
dropped_votes = sa.Table(
    "dropped_votes",
    metadata,
    sa.Column("reason", sa.String(64), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(128), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
)

processed = db.processed_table(metadata)

outbox = outbox_table(metadata)


class ExplanationRow(TypedDict):
    """The replica of an issued explanation, with the session it was served to (None: not bound)."""

    explanation_id: str
    prompt_name: str
    prompt_version: str
    model: str
    signal: Signal
    ticker: str
    experiment_id: str | None
    arm_id: str | None
    created_at: datetime
    session_key: str | None


class QuarantinedRow(TypedDict):
    feedback_id: str
    explanation_id: str
    reason: str
    received_at: datetime


class AuditRow(TypedDict):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]


class FeedbackRepository(db.MessageLog):
    processed = processed  # the table MessageLog.seen / mark_seen use
    outbox = outbox  # the table forget_session_messages rewrites

    # -- explanation replica ----------------------------------------------------------------------------
    def explanation(self, explanation_id: uuid.UUID) -> ExplanationRow | None:
        """The replica's row with `session_key`, the session it was served to (None: not bound)."""
        row = (
            self.s.execute(
                sa.select(explanations, served_to.c.session_key)
                .outerjoin(served_to, served_to.c.explanation_id == explanations.c.explanation_id)
                .where(explanations.c.explanation_id == str(explanation_id))
            )
            .mappings()
            .first()
        )
        return cast(ExplanationRow, dict(row)) if row else None

    def explanations_by_id(self, explanation_ids: Iterable[uuid.UUID]) -> dict[str, ExplanationRow]:
        """`explanation` for many ids in one query: the rows the replica has, by explanation id."""
        q = sa.select(explanations, served_to.c.session_key).outerjoin(
            served_to, served_to.c.explanation_id == explanations.c.explanation_id
        )
        rows = db.select_in(self.s, q, explanations.c.explanation_id, sorted({str(e) for e in explanation_ids}))
        return {r.explanation_id: cast(ExplanationRow, dict(r._mapping)) for r in rows}

    def add_explanation(self, values: dict[str, Any], session_key: str | None = None) -> bool:
        if self.explanation(uuid.UUID(values["explanation_id"])) is not None:
            return False
        self.s.execute(explanations.insert().values(**values))
        if session_key:
            self.s.execute(served_to.insert().values(explanation_id=values["explanation_id"], session_key=session_key))
        return True

    def add_explanations(self, rows: list[tuple[dict[str, Any], str | None]]) -> None:
        """`add_explanation` for many explanations none of which the replica has, (values, the session it was
        served to or None) each: one insert of many rows into each table."""
        if not rows:
            return
        self.s.execute(explanations.insert(), [values for values, _ in rows])
        served = [{"explanation_id": values["explanation_id"], "session_key": key} for values, key in rows if key]
        if served:
            self.s.execute(served_to.insert(), served)

    # -- votes ------------------------------------------------------------------------------------------
    def vote_submitted_at(self, feedback_id: uuid.UUID | str) -> datetime | None:
        return db.value_of(self.s, feedback, "feedback_id", "submitted_at", str(feedback_id))

    def vote(self, feedback_id: uuid.UUID) -> StoredVote | None:
        row = self.s.execute(
            sa.select(feedback.c.rating, feedback.c.stars, feedback.c.submitted_at).where(
                feedback.c.feedback_id == str(feedback_id)
            )
        ).first()
        return StoredVote(row.rating, row.stars, row.submitted_at) if row else None

    def votes_submitted_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]:
        """`vote_submitted_at` for many ids in one query: the stored ones, by feedback id."""
        return db.values_by_key(self.s, feedback, "feedback_id", "submitted_at", feedback_ids)

    def write_votes(self, batch: NewestInBatch) -> None:
        """A batch's votes (`NewestInBatch`): each feedback id's newest row, `revisions` counting every write."""
        db.write_rows(self.s, feedback, "feedback_id", *batch.writes(), counter="revisions")

    def upsert_vote(self, values: dict[str, Any], *, replace: bool) -> None:
        if replace:
            self.s.execute(
                feedback.update()
                .where(feedback.c.feedback_id == values["feedback_id"])
                .values(**values, revisions=feedback.c.revisions + 1)
            )
        else:
            self.s.execute(feedback.insert().values(**values, revisions=1))

    # -- quarantine -------------------------------------------------------------------------------------
    def quarantine(self, message_id: uuid.UUID, command: dict[str, Any], reason: str) -> None:
        self.s.execute(
            quarantine.insert().values(
                message_id=str(message_id),
                feedback_id=command["feedback_id"],
                explanation_id=command["explanation_id"],
                session_key=command["session_key"],
                command=command,
                reason=reason,
                received_at=utcnow(),
            )
        )

    def quarantine_many(self, commands: list[tuple[uuid.UUID, dict[str, Any]]], reason: str) -> None:
        """`quarantine` for many (message id, command payload) in one statement."""
        if commands:
            self.s.execute(
                quarantine.insert(),
                [
                    {
                        "message_id": str(message_id),
                        "feedback_id": command["feedback_id"],
                        "explanation_id": command["explanation_id"],
                        "session_key": command["session_key"],
                        "command": command,
                        "reason": reason,
                        "received_at": utcnow(),  # in the batch's order: they are released in this order
                    }
                    for message_id, command in commands
                ],
            )

    def take_quarantined(self, explanation_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = self.s.execute(
            sa.select(quarantine.c.command)
            .where(quarantine.c.explanation_id == str(explanation_id))
            .order_by(quarantine.c.received_at)
        ).all()
        self.s.execute(sa.delete(quarantine).where(quarantine.c.explanation_id == str(explanation_id)))
        return [r.command for r in rows]

    def take_quarantined_many(self, explanation_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """`take_quarantined` for many explanations: one query per `IN_CHUNK` ids, and a delete where there was
        something. Returns the commands waiting for each explanation that has any, in the order they were
        quarantined."""
        q = sa.select(quarantine.c.explanation_id, quarantine.c.command).order_by(quarantine.c.received_at)
        waiting: dict[str, list[dict[str, Any]]] = {}
        for explanation_id, command in db.select_in(
            self.s, q, quarantine.c.explanation_id, sorted(set(explanation_ids))
        ):
            waiting.setdefault(explanation_id, []).append(command)
        taken = sorted(waiting)
        for k in range(0, len(taken), db.IN_CHUNK):
            self.s.execute(sa.delete(quarantine).where(quarantine.c.explanation_id.in_(taken[k : k + db.IN_CHUNK])))
        return waiting

    def quarantined_explanations(self, since: datetime, until: datetime, limit: int = 500) -> list[uuid.UUID]:
        """Explanations with votes quarantined between `since` and `until`, oldest first."""
        q = (
            sa.select(quarantine.c.explanation_id, sa.func.min(quarantine.c.received_at).label("first"))
            .where(quarantine.c.received_at >= since, quarantine.c.received_at <= until)
            .group_by(quarantine.c.explanation_id)
            .order_by("first")
            .limit(limit)
        )
        return [uuid.UUID(r.explanation_id) for r in self.s.execute(q)]

    def list_quarantine(self, limit: int = 100) -> list[QuarantinedRow]:
        rows = self.s.execute(
            sa.select(
                quarantine.c.feedback_id, quarantine.c.explanation_id, quarantine.c.reason, quarantine.c.received_at
            )
            .order_by(quarantine.c.received_at.desc())
            .limit(limit)
        ).mappings()
        return [cast(QuarantinedRow, dict(r)) for r in rows]

    def count_dropped(self, reason: str, n: int = 1) -> None:
        updated = db.rowcount(
            self.s.execute(
                dropped_votes.update().where(dropped_votes.c.reason == reason).values(count=dropped_votes.c.count + n)
            )
        )
        if not updated:
            self.s.execute(dropped_votes.insert().values(reason=reason, count=n))

    def dropped_counts(self) -> dict[str, int]:
        rows = self.s.execute(sa.select(dropped_votes.c.reason, dropped_votes.c.count)).all()
        return {reason: int(count) for reason, count in rows}

    # -- erasure ----------------------------------------------------------------------------------------
    def erased_at(self, session_key: str) -> datetime | None:
        """The latest time this session asked to be forgotten (a permanent erasure or a tombstone), or None."""
        tag = erasure_tag(session_key)
        times = [
            row.erased_at
            for table in (erasures, erasure_tombstones)
            if (row := self.s.execute(sa.select(table.c.erased_at).where(table.c.session_key == tag)).first())
        ]
        return max(times, key=as_utc) if times else None

    def erased_at_many(self, session_keys: Iterable[str]) -> dict[str, datetime]:
        """`erased_at` for many sessions in one query (erasures and tombstones): the erased ones, by key."""
        by_tag = {erasure_tag(k): k for k in set(session_keys)}
        q = sa.union_all(
            sa.select(erasures.c.session_key, erasures.c.erased_at),
            sa.select(erasure_tombstones.c.session_key, erasure_tombstones.c.erased_at),
        ).subquery()
        found: dict[str, datetime] = {}
        for tag, at in db.select_in(self.s, sa.select(q.c.session_key, q.c.erased_at), q.c.session_key, sorted(by_tag)):
            key = by_tag[tag]
            if key not in found or as_utc(at) > as_utc(found[key]):
                found[key] = at
        return found

    def holds_session(self, session_key: str) -> bool:
        """Whether anything of this session is kept here: votes, quarantined votes, explanations served to it."""
        for table in (feedback, quarantine, served_to):
            if self.s.execute(
                sa.select(table.c.session_key).where(table.c.session_key == session_key).limit(1)
            ).first():
                return True
        return False

    def add_tombstone(self, session_key: str, at: datetime, expires_at: datetime) -> None:
        tag = erasure_tag(session_key)
        self.s.execute(sa.delete(erasure_tombstones).where(erasure_tombstones.c.session_key == tag))
        self.s.execute(erasure_tombstones.insert().values(session_key=tag, erased_at=at, expires_at=expires_at))

    def purge_tombstones(self, now: datetime) -> int:
        return db.rowcount(self.s.execute(sa.delete(erasure_tombstones).where(erasure_tombstones.c.expires_at < now)))

    def erase_session(self, session_key: str, at: datetime) -> tuple[list[str], list[str]]:
        """Delete everything of the session (votes, quarantined votes, which explanations were served to it, its
        events in the outbox) and record the erasure by its tag. Returns its feedback ids and the explanations
        it voted on or was served."""
        rows = self.s.execute(
            sa.select(feedback.c.feedback_id, feedback.c.explanation_id).where(feedback.c.session_key == session_key)
        ).all()
        served = self.s.execute(sa.select(served_to.c.explanation_id).where(served_to.c.session_key == session_key))
        explanation_ids = sorted({r.explanation_id for r in rows} | {r.explanation_id for r in served})
        self.s.execute(sa.delete(feedback).where(feedback.c.session_key == session_key))
        self.s.execute(sa.delete(quarantine).where(quarantine.c.session_key == session_key))
        self.s.execute(sa.delete(served_to).where(served_to.c.session_key == session_key))
        tag = erasure_tag(session_key)
        self.s.execute(sa.delete(erasure_tombstones).where(erasure_tombstones.c.session_key == tag))
        db.upsert(self.s, erasures, "session_key", {"session_key": tag, "erased_at": at})
        self.forget_session_messages(session_key)
        return [r.feedback_id for r in rows], explanation_ids

    # -- audit ------------------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
        self.s.execute(audit.insert().values(at=utcnow(), actor=actor, action=action, subject=subject, detail=detail))

    def audit_many(self, actor: str, action: str, subjects: list[str], detail: dict[str, Any]) -> None:
        """`audit` of one action on many subjects in one statement."""
        if subjects:
            self.s.execute(
                audit.insert(),
                [{"at": utcnow(), "actor": actor, "action": action, "subject": s, "detail": detail} for s in subjects],
            )

    def audit_log(self, limit: int = 100) -> list[AuditRow]:
        rows = self.s.execute(sa.select(audit).order_by(audit.c.id.desc()).limit(limit)).mappings()
        return [cast(AuditRow, dict(r)) for r in rows]


#: The unit of work handlers take: one transaction, `repo` is this service's repository.
SqlUnitOfWork = db.UnitOfWork[FeedbackRepository]


class Store(db.SqlStore[FeedbackRepository]):
    """This service's database: its tables, repository and outbox on the shared store plumbing."""

    def __init__(self, url: str) -> None:
        super().__init__(url, metadata, FeedbackRepository, outbox)
