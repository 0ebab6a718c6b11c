"""baseline: the schema create_all made before migrations

Create Date: 2026-12-01 23:13:49.960762
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_tables import create_indexes, create_outbox, create_processed_messages, drop_indexes, drop_outbox

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "arms",
        sa.Column("experiment_id", sa.String(length=64), nullable=False),
        sa.Column("arm_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("is_control", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "arm_id"),
    )
    op.create_table(
        "champion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "experiments",
        sa.Column("experiment_id", sa.String(length=64), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("allocation", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("weights_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("concluded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision", sa.String(length=64), nullable=True),
        sa.Column("winner_arm_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("experiment_id"),
    )
    op.create_table(
        "explanations",
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("request_key", sa.String(length=64), nullable=False),
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.Column("ticker", sa.String(length=12), nullable=False),
        sa.Column("signal", sa.String(length=8), nullable=False),
        sa.Column("context", sa.JSON(), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=False),
        sa.Column("requested_model", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=True),
        sa.Column("arm_id", sa.String(length=64), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=False),
        sa.Column("tokens_out", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("fallback_used", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id"),
    )
    create_indexes("explanations", "created_at", "request_key", "session_key")

    op.create_table(
        "models",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("base_model", sa.String(length=200), nullable=False),
        sa.Column("serving_base_url", sa.String(length=500), nullable=True),
        sa.Column("cost_per_1k_tokens_usd", sa.Float(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    create_outbox()

    create_processed_messages()


def downgrade() -> None:
    op.drop_table("processed_messages")
    drop_outbox()
    op.drop_table("models")
    drop_indexes("explanations", "session_key", "request_key", "created_at")

    op.drop_table("explanations")
    op.drop_table("experiments")
    op.drop_table("champion")
    op.drop_table("arms")
