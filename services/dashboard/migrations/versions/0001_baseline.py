"""baseline: the schema create_all made before migrations

Create Date: 2026-12-01 23:13:55.112009
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_tables import create_indexes, create_outbox, create_processed_messages, drop_indexes, drop_outbox

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scope", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("recent_rate", sa.Float(), nullable=True),
        sa.Column("baseline_rate", sa.Float(), nullable=True),
        sa.Column("recent_votes", sa.Integer(), nullable=False),
        sa.Column("baseline_votes", sa.Integer(), nullable=False),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("alert_id"),
    )
    create_indexes("alerts", "created_at")

    op.create_table(
        "champion_changes",
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("previous_version", sa.String(length=50), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    create_indexes("champion_changes", "changed_at")

    op.create_table(
        "erased_votes",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("feedback_id"),
    )
    op.create_table(
        "experiments",
        sa.Column("experiment_id", sa.String(length=64), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=True),
        sa.Column("allocation", sa.String(length=16), nullable=True),
        sa.Column("arms", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decision", sa.String(length=64), nullable=True),
        sa.Column("winner_arm_id", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("concluded_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("experiment_id"),
    )
    op.create_table(
        "explanations",
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ticker", sa.String(length=32), nullable=False),
        sa.Column("signal", sa.String(length=8), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=50), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=True),
        sa.Column("arm_id", sa.String(length=64), nullable=True),
        sa.Column("tokens_in", sa.Integer(), nullable=False),
        sa.Column("tokens_out", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("fallback_used", sa.Boolean(), nullable=False),
        sa.Column("votes", sa.Integer(), nullable=False),
        sa.Column("positives", sa.Integer(), nullable=False),
        sa.Column("stars_sum", sa.Integer(), nullable=False),
        sa.Column("stars_n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id"),
    )
    create_indexes("explanations", "day", "experiment_id")

    op.create_table(
        "finetune_jobs",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "models",
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("serving_base_url", sa.String(length=500), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("cost_per_1k_tokens_usd", sa.Float(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_id"),
    )
    create_outbox()

    create_processed_messages()
    op.create_table(
        "votes",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("rating", sa.SmallInteger(), nullable=False),
        sa.Column("stars", sa.SmallInteger(), nullable=True),
        sa.Column("has_comment", sa.Boolean(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("signal", sa.String(length=8), nullable=False),
        sa.Column("ticker", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("feedback_id"),
    )
    create_indexes("votes", "explanation_id", "submitted_at")


def downgrade() -> None:
    drop_indexes("votes", "submitted_at", "explanation_id")

    op.drop_table("votes")
    op.drop_table("processed_messages")
    drop_outbox()
    op.drop_table("models")
    op.drop_table("meta")
    op.drop_table("finetune_jobs")
    drop_indexes("explanations", "experiment_id", "day")

    op.drop_table("explanations")
    op.drop_table("experiments")
    op.drop_table("erased_votes")
    drop_indexes("champion_changes", "changed_at")

    op.drop_table("champion_changes")
    drop_indexes("alerts", "created_at")

    op.drop_table("alerts")
