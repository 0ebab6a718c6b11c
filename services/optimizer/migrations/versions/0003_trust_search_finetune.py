"""session binding, session units, fallbacks and withdrawn models: tables only, kept as data in 0003_trust_search_finetune.json

Create Date: 2026-12-01 23:51:43.674728
"""

from shared.migration_tables import snapshot_revision

revision = "0003"
down_revision = "0002"
upgrade, downgrade = snapshot_revision(__file__)
