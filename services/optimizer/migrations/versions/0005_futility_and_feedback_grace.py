"""the futility level and the feedback rate's grace period per experiment (null for the experiments before them:
futility on the decision's interval, the feedback rate over every session)

Create Date: 2026-12-03 07:32:54
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("futility_alpha", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("feedback_rate_grace_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_column("feedback_rate_grace_s")
        batch_op.drop_column("futility_alpha")
