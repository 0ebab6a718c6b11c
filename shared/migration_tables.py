"""Operations that several services' migration revisions share: the plumbing tables every store has (outbox,
processed messages, dead letters), Alembic's batch form of creating and dropping per-column indexes, and the
baseline revisions' schema snapshots (`create_snapshot`, `drop_snapshot`).

FROZEN HISTORY. Each function here is part of the revisions that call it (named in its docstring) and creates
what those revisions created when they were written. Never change one: a store migrated before the change and
one migrated after would differ, and no revision would say so. When a shared table changes, the current code
(`shared/outbox.py`, `shared/db.py`, `shared/deadletter.py`) changes, and each service gets a new revision
(`python -m shared.migrations revision <service> -m "..."`) with the operations spelt out in it.

These run inside a revision (`alembic.op` is bound to the migration in progress).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op


def create_indexes(table: str, *columns: str) -> None:
    """A non-unique index `ix_<table>_<column>` on each column, in the given order (Alembic's batch form)."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.create_index(batch_op.f(f"ix_{table}_{column}"), [column], unique=False)


def drop_indexes(table: str, *columns: str) -> None:
    """Drop the indexes `create_indexes(table, *columns)` made, in the given order."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.drop_index(batch_op.f(f"ix_{table}_{column}"))


def create_outbox() -> None:
    """The outbox as every service's revision 0001 created it (and the dashboard's 0003 downgrade restores)."""
    op.create_table(
        "outbox",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("event_id"),
    )
    create_indexes("outbox", "published_at")


def drop_outbox() -> None:
    """Every service's revision 0001 downgrade, and the dashboard's 0003 upgrade."""
    drop_indexes("outbox", "published_at")
    op.drop_table("outbox")


def create_processed_messages() -> None:
    """The handled message ids (idempotent handlers) as every service's revision 0001 created them."""
    op.create_table(
        "processed_messages",
        sa.Column("message_id", sa.String(length=36), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )


def create_dead_letters() -> None:
    """The dead letters as every service's revision 0002 created them."""
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=100), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    create_indexes("dead_letters", "message_id", "replayed_at")


def drop_dead_letters() -> None:
    """Every service's revision 0002 downgrade."""
    drop_indexes("dead_letters", "replayed_at", "message_id")
    op.drop_table("dead_letters")


# ---- schema snapshots --------------------------------------------------------------------------------------------
#
# Each service's revision 0001 is the schema `create_all` made before there were migrations. It is never run on a
# store that existed then (such a store is stamped at 0001, its tables are already there); it runs when a test
# builds a store as the previous release left it, or on a downgrade to nothing and back. It is a snapshot, so it
# is kept as data beside the revision (`versions/0001_baseline.json`); so is a later revision that only adds new
# tables (its JSON file named like it). The file is a list of steps in the order they run:
#
#   {"shared": "outbox"}                     one of the shared tables above, as revision 0001 created it
#   {"table": "t", "columns": [[name, type, flags], ...], "primary_key": [...], "unique": [[...]], "indexes": [...]}
#
# A type is String(n), Text, Integer, SmallInteger, Float, Boolean, JSON or DateTime (always with time zone);
# flags are "null", "not null" or "not null autoincrement". An index is `ix_<table>_<column>`, non-unique.
# The downgrade undoes the steps in reverse order.

#: The shared tables a snapshot may name: how each is created and dropped.
_SHARED: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
    "outbox": (create_outbox, drop_outbox),
    "processed_messages": (create_processed_messages, lambda: op.drop_table("processed_messages")),
}
_TYPES: dict[str, Any] = {
    "Text": sa.Text,
    "Integer": sa.Integer,
    "SmallInteger": sa.SmallInteger,
    "Float": sa.Float,
    "Boolean": sa.Boolean,
    "JSON": sa.JSON,
    "DateTime": lambda: sa.DateTime(timezone=True),
}


def _type(spec: str) -> Any:
    if m := re.fullmatch(r"String\((\d+)\)", spec):
        return sa.String(length=int(m.group(1)))
    if spec not in _TYPES:
        raise ValueError(f"schema snapshot: unknown column type {spec!r}")
    return _TYPES[spec]()


def _column(name: str, kind: str, flags: str) -> sa.Column[Any]:
    if flags == "not null autoincrement":
        return sa.Column(name, _type(kind), nullable=False, autoincrement=True)
    if flags not in ("null", "not null"):
        raise ValueError(f"schema snapshot: unknown column flags {flags!r} of {name!r}")
    return sa.Column(name, _type(kind), nullable=flags == "null")


def _shared(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
    if name not in _SHARED:
        raise ValueError(f"schema snapshot: unknown shared table {name!r}")
    return _SHARED[name]


def snapshot_steps(path: Path) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = json.loads(path.read_text())
    return steps


def create_snapshot(path: Path) -> None:
    """Create the tables the snapshot at `path` lists, in its order."""
    for step in snapshot_steps(path):
        if "shared" in step:
            _shared(step["shared"])[0]()
            continue
        columns = [_column(*column) for column in step["columns"]]
        constraints: list[sa.Constraint] = [sa.PrimaryKeyConstraint(*step["primary_key"])]
        constraints += [sa.UniqueConstraint(*names) for names in step.get("unique", [])]
        op.create_table(step["table"], *columns, *constraints)
        if step.get("indexes"):
            create_indexes(step["table"], *step["indexes"])


def drop_snapshot(path: Path) -> None:
    """Drop what `create_snapshot(path)` created, in reverse order."""
    for step in reversed(snapshot_steps(path)):
        if "shared" in step:
            _shared(step["shared"])[1]()
        else:
            if step.get("indexes"):
                drop_indexes(step["table"], *reversed(step["indexes"]))
            op.drop_table(step["table"])


def snapshot_revision(revision_file: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """`upgrade` and `downgrade` of a revision that is a snapshot: the steps in the JSON file named like the
    revision's own file (`0001_baseline.py` -> `0001_baseline.json`)."""
    path = Path(revision_file).with_suffix(".json")
    return (lambda: create_snapshot(path)), (lambda: drop_snapshot(path))
