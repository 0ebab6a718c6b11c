"""session binding, session units, fallbacks and withdrawn models

Create Date: 2026-12-01 23:51:48.184298
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("explanations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fallback_used", sa.Boolean(), nullable=False, server_default=sa.false()))

    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("status_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("status_reason")

    with op.batch_alter_table("explanations", schema=None) as batch_op:
        batch_op.drop_column("fallback_used")
