"""baseline: the schema create_all made before migrations

Create Date: 2026-12-01 23:13:53.066482
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
        sa.Column("position", sa.SmallInteger(), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("initial_weight", sa.Float(), nullable=False),
        sa.Column("is_control", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id", "arm_id"),
    )
    op.create_table(
        "champions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=True),
        sa.Column("previous_version", sa.String(length=50), nullable=True),
        sa.Column("previous_model", sa.String(length=200), nullable=True),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    create_indexes("champions", "name")

    op.create_table(
        "erased_votes",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("feedback_id"),
    )
    op.create_table(
        "experiments",
        sa.Column("experiment_id", sa.String(length=64), nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("allocation", sa.String(length=16), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("min_duration_s", sa.Float(), nullable=False),
        sa.Column("min_feedback_per_arm", sa.Integer(), nullable=False),
        sa.Column("max_feedback_per_arm", sa.Integer(), nullable=False),
        sa.Column("target_lift", sa.Float(), nullable=False),
        sa.Column("min_lift_to_ship", sa.Float(), nullable=False),
        sa.Column("max_cost_ratio", sa.Float(), nullable=True),
        sa.Column("max_latency_ratio", sa.Float(), nullable=True),
        sa.Column("min_feedback_rate_ratio", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("note", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("weights", sa.JSON(), nullable=False),
        sa.Column("allocation_history", sa.JSON(), nullable=False),
        sa.Column("reweighted_at_feedback", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=24), nullable=True),
        sa.Column("winner_arm_id", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=2000), nullable=False),
        sa.Column("last_status", sa.String(length=24), nullable=True),
        sa.Column("last_reason", sa.String(length=2000), nullable=True),
        sa.Column("last_decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("promoted_champion_id", sa.Integer(), nullable=True),
        sa.Column("rolled_back", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("experiment_id"),
    )
    create_indexes("experiments", "prompt_name", "status")

    op.create_table(
        "exposures",
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=True),
        sa.Column("arm_id", sa.String(length=64), nullable=True),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("prompt_version", sa.String(length=50), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("fallback_used", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id"),
    )
    create_indexes("exposures", "experiment_id")

    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prompt_name", sa.String(length=100), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("parent_version", sa.String(length=50), nullable=False),
        sa.Column("requested", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.JSON(), nullable=False),
        sa.Column("rejected", sa.JSON(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("tokens_in", sa.Integer(), nullable=False),
        sa.Column("tokens_out", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    create_indexes("generations", "prompt_name")

    create_outbox()

    create_processed_messages()
    op.create_table(
        "prompt_versions",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("version", sa.String(length=50), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("parent_version", sa.String(length=50), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", "version"),
    )
    op.create_table(
        "votes",
        sa.Column("feedback_id", sa.String(length=36), nullable=False),
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=True),
        sa.Column("arm_id", sa.String(length=64), nullable=True),
        sa.Column("rating", sa.SmallInteger(), nullable=False),
        sa.Column("stars", sa.SmallInteger(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("feedback_id"),
    )
    create_indexes("votes", "experiment_id", "explanation_id")


def downgrade() -> None:
    drop_indexes("votes", "explanation_id", "experiment_id")

    op.drop_table("votes")
    op.drop_table("prompt_versions")
    op.drop_table("processed_messages")
    drop_outbox()
    drop_indexes("generations", "prompt_name")

    op.drop_table("generations")
    drop_indexes("exposures", "experiment_id")

    op.drop_table("exposures")
    drop_indexes("experiments", "status", "prompt_name")

    op.drop_table("experiments")
    op.drop_table("erased_votes")
    drop_indexes("champions", "name")

    op.drop_table("champions")
    op.drop_table("arms")
