"""session binding, session units, fallbacks and withdrawn models

Create Date: 2026-12-01 23:51:43.674728
"""

import sqlalchemy as sa
from alembic import op

from shared.migration_tables import create_indexes, drop_indexes

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "exposure_units",
        sa.Column("explanation_id", sa.String(length=36), nullable=False),
        sa.Column("experiment_id", sa.String(length=64), nullable=True),
        sa.Column("session_key", sa.String(length=128), nullable=False),
        sa.Column("signal", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("explanation_id"),
    )
    create_indexes("exposure_units", "experiment_id")


def downgrade() -> None:
    drop_indexes("exposure_units", "experiment_id")

    op.drop_table("exposure_units")
