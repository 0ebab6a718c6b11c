"""The feedback service's own store: its tables, repository and unit of work. No other service opens it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    delete,
    select,
)
from sqlalchemy.orm import Session

from services.feedback.domain import StoredVote
from shared.contracts import utcnow
from shared.db import MessageLog, SqlStore, UnitOfWork, processed_table
from shared.outbox import outbox_table

metadata = MetaData()

explanations = Table(
    "explanations",
    metadata,
    Column("explanation_id", String(36), primary_key=True),
    Column("prompt_name", String(100), nullable=False),
    Column("prompt_version", String(50), nullable=False),
    Column("model", String(200), nullable=False),
    Column("signal", String(8), nullable=False),
    Column("ticker", String(32), nullable=False),
    Column("experiment_id", String(64)),
    Column("arm_id", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

feedback = Table(
    "feedback",
    metadata,
    Column("feedback_id", String(36), primary_key=True),
    Column("explanation_id", String(36), nullable=False, index=True),
    Column("session_key", String(64), nullable=False, index=True),
    Column("rating", SmallInteger, nullable=False),
    Column("stars", SmallInteger),
    Column("comment", Text),
    Column("submitted_at", DateTime(timezone=True), nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False),
    Column("revisions", Integer, nullable=False, default=1),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("message_id", String(36), primary_key=True),
    Column("feedback_id", String(36), nullable=False, index=True),
    Column("explanation_id", String(36), nullable=False, index=True),
    Column("session_key", String(64), nullable=False, index=True),
    Column("command", JSON, nullable=False),
    Column("reason", String(200), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

erasures = Table(
    "erasures",
    metadata,
    Column("session_key", String(64), primary_key=True),
    Column("erased_at", DateTime(timezone=True), nullable=False),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("detail", JSON, nullable=False),
)

processed = processed_table(metadata)

outbox = outbox_table(metadata)


class FeedbackRepository(MessageLog):
    processed = processed  # the table MessageLog.seen / mark_seen use

    def __init__(self, session: Session) -> None:
        self.s = session

    # -- explanation replica ----------------------------------------------------------------------------
    def explanation(self, explanation_id: uuid.UUID) -> dict[str, Any] | None:
        row = (
            self.s.execute(select(explanations).where(explanations.c.explanation_id == str(explanation_id)))
            .mappings()
            .first()
        )
        return dict(row) if row else None

    def add_explanation(self, values: dict[str, Any]) -> bool:
        if self.explanation(uuid.UUID(values["explanation_id"])) is not None:
            return False
        self.s.execute(explanations.insert().values(**values))
        return True

    # -- votes ------------------------------------------------------------------------------------------
    def vote(self, feedback_id: uuid.UUID) -> StoredVote | None:
        row = self.s.execute(
            select(feedback.c.rating, feedback.c.stars, feedback.c.submitted_at).where(
                feedback.c.feedback_id == str(feedback_id)
            )
        ).first()
        return StoredVote(row.rating, row.stars, row.submitted_at) if row else None

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

    def take_quarantined(self, explanation_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = self.s.execute(
            select(quarantine.c.command)
            .where(quarantine.c.explanation_id == str(explanation_id))
            .order_by(quarantine.c.received_at)
        ).all()
        self.s.execute(delete(quarantine).where(quarantine.c.explanation_id == str(explanation_id)))
        return [r.command for r in rows]

    def list_quarantine(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.s.execute(
            select(quarantine.c.feedback_id, quarantine.c.explanation_id, quarantine.c.reason, quarantine.c.received_at)
            .order_by(quarantine.c.received_at.desc())
            .limit(limit)
        ).mappings()
        return [dict(r) for r in rows]

    # -- erasure ----------------------------------------------------------------------------------------
    def erased_at(self, session_key: str) -> datetime | None:
        row = self.s.execute(select(erasures.c.erased_at).where(erasures.c.session_key == session_key)).first()
        return row.erased_at if row else None

    def erase_session(self, session_key: str, at: datetime) -> tuple[list[str], list[str]]:
        rows = self.s.execute(
            select(feedback.c.feedback_id, feedback.c.explanation_id).where(feedback.c.session_key == session_key)
        ).all()
        self.s.execute(delete(feedback).where(feedback.c.session_key == session_key))
        self.s.execute(delete(quarantine).where(quarantine.c.session_key == session_key))
        if self.erased_at(session_key) is None:
            self.s.execute(erasures.insert().values(session_key=session_key, erased_at=at))
        else:
            self.s.execute(erasures.update().where(erasures.c.session_key == session_key).values(erased_at=at))
        return [r.feedback_id for r in rows], [r.explanation_id for r in rows]

    # -- audit ------------------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, subject: str, detail: dict[str, Any]) -> None:
        self.s.execute(audit.insert().values(at=utcnow(), actor=actor, action=action, subject=subject, detail=detail))

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.s.execute(select(audit).order_by(audit.c.id.desc()).limit(limit)).mappings()
        return [dict(r) for r in rows]


#: The unit of work handlers take: one transaction, `repo` is this service's repository.
SqlUnitOfWork = UnitOfWork[FeedbackRepository]


class Store(SqlStore[FeedbackRepository]):
    """This service's database: its tables, repository and outbox on the shared store plumbing."""

    def __init__(self, url: str) -> None:
        super().__init__(url, metadata, FeedbackRepository, outbox)
