"""baseline: the schema create_all made before migrations

Create Date: 2026-12-01 23:13:53.946738
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_tables import create_indexes, create_outbox, create_processed_messages, drop_indexes, drop_outbox

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "erased_sessions",
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("feedback_ids", sa.JSON(), nullable=False),
        sa.Column("export_ids", sa.JSON(), nullable=False),
        sa.Column("model_ids", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("session_key"),
    )
    op.create_table(
        "explanations",
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("request_key", sa.String(length=128), nullable=False),
        sa.Column("ticker", sa.String(length=32), nullable=False),
        sa.Column("signal", sa.String(length=8), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=False),
        sa.Column("tokens_out", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id"),
    )
    create_indexes("explanations", "request_key")

    op.create_table(
        "export_feedback",
        sa.Column("export_id", sa.String(length=36), nullable=False),
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("export_id", "feedback_id"),
    )
    create_indexes("export_feedback", "feedback_id")

    op.create_table(
        "exports",
        sa.Column("export_id", sa.String(length=36), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("export_id"),
    )
    create_indexes("exports", "job_id")

    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("min_examples", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("train_export_id", sa.String(length=36), nullable=True),
        sa.Column("heldout_export_id", sa.String(length=36), nullable=True),
        sa.Column("model_id", sa.String(length=64), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    create_indexes("jobs", "state")

    op.create_table(
        "models",
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("adapter_path", sa.Text(), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("train_export_id", sa.String(length=36), nullable=False),
        sa.Column("heldout_export_id", sa.String(length=36), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("serving_base_url", sa.Text(), nullable=True),
        sa.Column("cost_per_1k_tokens_usd", sa.Float(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id"),
        sa.UniqueConstraint("job_id"),
        sa.UniqueConstraint("name"),
    )
    create_outbox()

    create_processed_messages()
    op.create_table(
        "votes",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.Column("rating", sa.SmallInteger(), nullable=False),
        sa.Column("stars", sa.SmallInteger(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("feedback_id"),
    )
    create_indexes("votes", "explanation_id", "session_key")


def downgrade() -> None:
    drop_indexes("votes", "session_key", "explanation_id")

    op.drop_table("votes")
    op.drop_table("processed_messages")
    drop_outbox()
    op.drop_table("models")
    drop_indexes("jobs", "state")

    op.drop_table("jobs")
    drop_indexes("exports", "job_id")

    op.drop_table("exports")
    drop_indexes("export_feedback", "feedback_id")

    op.drop_table("export_feedback")
    drop_indexes("explanations", "request_key")

    op.drop_table("explanations")
    op.drop_table("erased_sessions")
