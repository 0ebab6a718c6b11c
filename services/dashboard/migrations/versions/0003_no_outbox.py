"""no outbox: the dashboard publishes no events (it only reads the other services'), so its outbox, always
empty, is dropped

Create Date: 2026-12-02 01:49:04.563976
"""

from shared.migration_tables import create_outbox, drop_outbox

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    drop_outbox()


def downgrade() -> None:
    create_outbox()
