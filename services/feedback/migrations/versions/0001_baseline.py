"""baseline: the schema create_all made before migrations

Create Date: 2026-12-01 23:13:50.959576
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_tables import create_indexes, create_outbox, create_processed_messages, drop_indexes, drop_outbox

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "erasures",
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_key"),
    )
    op.create_table(
        "explanations",
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("signal", sa.String(length=8), nullable=False),
        sa.Column("ticker", sa.String(length=32), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=True),
        sa.Column("arm_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id"),
    )
    op.create_table(
        "feedback",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.Column("rating", sa.SmallInteger(), nullable=False),
        sa.Column("stars", sa.SmallInteger(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revisions", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("feedback_id"),
    )
    create_indexes("feedback", "explanation_id", "session_key")

    create_outbox()

    create_processed_messages()
    op.create_table(
        "quarantine",
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.Column("command", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    create_indexes("quarantine", "explanation_id", "feedback_id", "session_key")


def downgrade() -> None:
    drop_indexes("quarantine", "session_key", "feedback_id", "explanation_id")

    op.drop_table("quarantine")
    op.drop_table("processed_messages")
    drop_outbox()
    drop_indexes("feedback", "session_key", "explanation_id")

    op.drop_table("feedback")
    op.drop_table("explanations")
    op.drop_table("erasures")
    op.drop_table("audit")
