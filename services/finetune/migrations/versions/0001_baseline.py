"""baseline: the schema create_all made before migrations, kept as data in 0001_baseline.json

Create Date: 2026-12-01 23:13:53.946738
"""

from shared.migration_tables import snapshot_revision

revision = "0001"
down_revision = None
upgrade, downgrade = snapshot_revision(__file__)
