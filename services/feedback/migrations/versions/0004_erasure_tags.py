"""erasure records keep a one-way tag of the session key, not the key; published erasure events keep no key

Create Date: 2026-12-02 00:25:00

Data only, no schema change. The tag is computed here as shared.privacy.erasure_tag computes it today (frozen
in this file, as a migration must be). Outbox rows that still name an erased key (its votes, its erasure event)
are emptied; those not yet published are dropped, as shared.outbox.forget_session does for new erasures.
"""

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"

ERASED_PAYLOAD = json.dumps({"erased": True})


def _tag(session_key: str) -> str:
    return hashlib.sha256(b"erased-session:" + session_key.encode()).hexdigest()


def upgrade() -> None:
    conn = op.get_bind()
    for table in ("erasures", "erasure_tombstones"):
        keys = [r[0] for r in conn.execute(sa.text(f"SELECT session_key FROM {table}"))]
        for key in keys:
            conn.execute(
                sa.text(
                    "UPDATE outbox SET payload = :erased, published_at = COALESCE(published_at, CURRENT_TIMESTAMP) "
                    "WHERE event_type IN ('feedback.recorded', 'feedback.erased') AND CAST(payload AS TEXT) LIKE :like"
                ),
                {"erased": ERASED_PAYLOAD, "like": f"%{key}%"},
            )
            conn.execute(
                sa.text(f"UPDATE {table} SET session_key = :tag WHERE session_key = :key"),
                {"tag": _tag(key), "key": key},
            )
    conn.execute(
        sa.text(
            "UPDATE outbox SET payload = :erased WHERE event_type = 'feedback.erased' AND published_at IS NOT NULL"
        ),
        {"erased": ERASED_PAYLOAD},
    )


def downgrade() -> None:
    pass  # a one-way digest cannot be undone
