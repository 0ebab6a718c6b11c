"""erased sessions are kept by a one-way tag of the session key, not the key

Create Date: 2026-12-02 00:25:00

Data only, no schema change. The tag is computed as shared.privacy.erasure_tag computes it today (frozen here).
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def _tag(session_key: str) -> str:
    return hashlib.sha256(b"erased-session:" + session_key.encode()).hexdigest()


def upgrade() -> None:
    conn = op.get_bind()
    keys = [r[0] for r in conn.execute(sa.text("SELECT session_key FROM erased_sessions"))]
    for key in keys:
        conn.execute(
            sa.text("UPDATE erased_sessions SET session_key = :tag WHERE session_key = :key"),
            {"tag": _tag(key), "key": key},
        )


def downgrade() -> None:
    pass  # a one-way digest cannot be undone
