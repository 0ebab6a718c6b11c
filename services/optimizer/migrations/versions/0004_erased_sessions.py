"""erased sessions by tag, with the anonymous unit their exposures were given: tables only, kept as data in 0004_erased_sessions.json

Create Date: 2026-12-02 00:25:00
"""

from shared.migration_tables import snapshot_revision

revision = "0004"
down_revision = "0003"
upgrade, downgrade = snapshot_revision(__file__)
