"""Operations that several services' migration revisions share: the plumbing tables every store has (outbox,
processed messages, dead letters) and Alembic's batch form of creating and dropping per-column indexes.

FROZEN HISTORY. Each function here is part of the revisions that call it (named in its docstring) and creates
what those revisions created when they were written. Never change one: a store migrated before the change and
one migrated after would differ, and no revision would say so. When a shared table changes, the current code
(`shared/outbox.py`, `shared/db.py`, `shared/deadletter.py`) changes, and each service gets a new revision
(`python -m shared.migrations revision <service> -m "..."`) with the operations spelt out in it.

These run inside a revision (`alembic.op` is bound to the migration in progress).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def create_indexes(table: str, *columns: str) -> None:
    """A non-unique index `ix_<table>_<column>` on each column, in the given order (Alembic's batch form)."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.create_index(batch_op.f(f"ix_{table}_{column}"), [column], unique=False)


def drop_indexes(table: str, *columns: str) -> None:
    """Drop the indexes `create_indexes(table, *columns)` made, in the given order."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.drop_index(batch_op.f(f"ix_{table}_{column}"))


def create_outbox() -> None:
    """The outbox as every service's revision 0001 created it (and the dashboard's 0003 downgrade restores)."""
    op.create_table(
        "outbox",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("event_id"),
    )
    create_indexes("outbox", "published_at")


def drop_outbox() -> None:
    """Every service's revision 0001 downgrade, and the dashboard's 0003 upgrade."""
    drop_indexes("outbox", "published_at")
    op.drop_table("outbox")


def create_processed_messages() -> None:
    """The handled message ids (idempotent handlers) as every service's revision 0001 created them."""
    op.create_table(
        "processed_messages",
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )


def create_dead_letters() -> None:
    """The dead letters as every service's revision 0002 created them."""
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=100), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    create_indexes("dead_letters", "message_id", "replayed_at")


def drop_dead_letters() -> None:
    """Every service's revision 0002 downgrade."""
    drop_indexes("dead_letters", "replayed_at", "message_id")
    op.drop_table("dead_letters")
