"""dead letters: the table as shared.migration_tables.create_dead_letters makes it (created 2026-12-01)."""

from shared.migration_tables import create_dead_letters, drop_dead_letters

revision = "0002"
down_revision = "0001"
upgrade = create_dead_letters
downgrade = drop_dead_letters
