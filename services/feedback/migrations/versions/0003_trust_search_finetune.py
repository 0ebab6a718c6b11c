"""session binding, session units, fallbacks and withdrawn models

Create Date: 2026-12-01 23:51:37.454550
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_tables import create_indexes, drop_indexes

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "dropped_votes",
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("reason"),
    )
    op.create_table(
        "erasure_tombstones",
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_key"),
    )
    create_indexes("erasure_tombstones", "expires_at")

    op.create_table(
        "served_to",
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("session_key", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id"),
    )
    create_indexes("served_to", "session_key")


def downgrade() -> None:
    drop_indexes("served_to", "session_key")

    op.drop_table("served_to")
    drop_indexes("erasure_tombstones", "expires_at")

    op.drop_table("erasure_tombstones")
    op.drop_table("dropped_votes")
