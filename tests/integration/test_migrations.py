"""Schema migrations per service: a store made by the previous release (`create_all`, no version table),
filled, is upgraded on start-up and keeps every row; a new store is created at the newest schema and
stamped; every service's newest revision matches its current tables."""

from __future__ import annotations

import importlib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, MetaData, String, Text, select

from shared.contracts import SERVICES
from shared.db import make_engine
from shared.migrations import BASELINE, _config, current_revision, schema_drift, script_location, version_table
from shared.privacy import erasure_tag


def _value(column: Any, n: int) -> Any:
    t = column.type
    if isinstance(t, Boolean):
        return True
    if isinstance(t, Integer):
        return n
    if isinstance(t, Float):
        return n + 0.5
    if isinstance(t, DateTime):
        return datetime(2026, 1, 1, 12, 0, n % 60, tzinfo=UTC)
    if isinstance(t, JSON):
        return {"n": n}
    if isinstance(t, String | Text):
        length = getattr(t, "length", None) or 40
        return f"v{n}-{column.name}"[:length]
    raise AssertionError(f"no sample value for {column.table.name}.{column.name} ({t})")


def _previous_release_store(service: str, path: Path) -> dict[str, tuple[list[str], list[tuple]]]:
    """A store as the release before migrations left it: the baseline schema, no version table, two rows in
    every table. Returns each table's columns and rows."""
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_config(service, conn, MetaData()), BASELINE)
        conn.exec_driver_sql(f"DROP TABLE {version_table(service)}")
    old = MetaData()
    old.reflect(engine)
    rows: dict[str, tuple[list[str], list[tuple]]] = {}
    with engine.begin() as conn:
        for table in old.sorted_tables:
            values = [{c.name: _value(c, n) for c in table.columns} for n in (1, 2)]
            conn.execute(table.insert(), values)
    with engine.connect() as conn:
        for table in old.sorted_tables:
            rows[table.name] = (
                [c.name for c in table.columns],
                sorted(tuple(r) for r in conn.execute(select(table)).all()),
            )
    engine.dispose()
    return rows


#: Tables a revision deliberately drops: (service, table). The dashboard's outbox (revision 0003): it
#: publishes nothing, so the table was always empty.
DROPPED = {("dashboard", "outbox")}

#: Values a revision deliberately rewrites: (service, table, column) -> what the value becomes.
#: Erasure records keep a one-way tag of the session key instead of the key (revision 0004).
TRANSFORMS = {
    ("feedback", "erasures", "session_key"): erasure_tag,
    ("finetune", "erased_sessions", "session_key"): erasure_tag,
}


def _transformed(service: str, name: str, columns: list[str], rows: list[tuple]) -> list[tuple]:
    for (svc, table, column), change in TRANSFORMS.items():
        if (svc, table) == (service, name):
            i = columns.index(column)
            rows = [(*r[:i], change(r[i]), *r[i + 1 :]) for r in rows]
    return rows


def test_erasure_records_are_rewritten_as_tags_and_outbox_rows_naming_them_are_emptied(tmp_path: Path) -> None:
    from services.feedback.store import Store, erasures, outbox

    path = tmp_path / "feedback.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_config("feedback", conn, MetaData()), "0003")
        key = "a" * 64
        conn.execute(erasures.insert().values(session_key=key, erased_at=datetime(2026, 1, 1, tzinfo=UTC)))
        for n, (kind, published) in enumerate(
            [("feedback.recorded", None), ("feedback.erased", datetime(2026, 1, 1, tzinfo=UTC))]
        ):
            conn.execute(
                outbox.insert().values(
                    event_id=f"e{n}",
                    event_type=kind,
                    payload={"session_key": key},
                    created_at=datetime(2026, 1, 1, tzinfo=UTC),
                    published_at=published,
                )
            )
    engine.dispose()
    store = Store(f"sqlite:///{path}")
    try:
        with store.engine.connect() as conn:
            assert [r.session_key for r in conn.execute(select(erasures))] == [erasure_tag(key)]
            rows = conn.execute(select(outbox)).all()
        assert [r.payload for r in rows] == [{"erased": True}] * 2
        assert all(r.published_at is not None for r in rows)  # the unpublished vote is never sent
    finally:
        store.dispose()


@pytest.mark.parametrize("service", SERVICES)
def test_a_previous_release_store_is_upgraded_and_keeps_every_row(service: str, tmp_path: Path) -> None:
    path = tmp_path / f"{service}.db"
    before = _previous_release_store(service, path)
    assert before and all(len(r) == 2 for _, r in before.values())
    before = {name: rows for name, rows in before.items() if (service, name) not in DROPPED}
    store_module = importlib.import_module(f"services.{service}.store")
    store = store_module.Store(f"sqlite:///{path}")  # what every process does at start-up
    try:
        with store.engine.connect() as conn:
            assert current_revision(conn, service) is not None and current_revision(conn, service) != BASELINE
        after = MetaData()
        after.reflect(store.engine, only=list(before))
        with store.engine.connect() as conn:
            for name, (columns, rows) in before.items():
                # The columns the rows had then (a later revision may add columns, with their defaults).
                table = after.tables[name]
                now = sorted(tuple(r) for r in conn.execute(select(*(table.c[c] for c in columns))).all())
                rows = _transformed(service, name, columns, rows)
                assert [r for r in rows if r not in now] == [], f"{service}.{name} lost rows"
        assert store.dead_letters.list() == []  # the table a revision added is there, empty
        drift = schema_drift(store.engine, store_module.metadata)
        assert drift == [], (
            f"{service}: the newest migration revision does not match the tables in the code; add one with "
            f'`python -m shared.migrations revision {service} -m "..."`: {drift}'
        )
    finally:
        store.dispose()
    reopened = store_module.Store(f"sqlite:///{path}")  # a second start changes nothing
    reopened.dispose()


@pytest.mark.parametrize("service", SERVICES)
def test_a_new_store_is_created_at_the_newest_revision_with_its_own_version_table(service: str, tmp_path: Path) -> None:
    store_module = importlib.import_module(f"services.{service}.store")
    store = store_module.Store(f"sqlite:///{tmp_path / 'new.db'}")
    store.dispose()
    conn = sqlite3.connect(tmp_path / "new.db")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    [(version,)] = conn.execute(f"SELECT version_num FROM {version_table(service)}").fetchall()
    conn.close()
    assert "alembic_version" not in tables and version_table(service) in tables
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    with engine.connect() as c:
        assert version == current_revision(c, service)
    assert schema_drift(engine, store_module.metadata) == []
    engine.dispose()


@pytest.mark.parametrize("service", SERVICES)
def test_the_baseline_snapshot_is_created_and_dropped_whole(service: str, tmp_path: Path) -> None:
    """Revision 0001 is a snapshot kept as data: upgrading to it creates every table it lists (with its
    indexes), and downgrading from it leaves only the version table."""
    from shared.migration_tables import snapshot_steps

    steps = snapshot_steps(script_location(service) / "versions" / "0001_baseline.json")
    engine = make_engine(f"sqlite:///{tmp_path / 'base.db'}")
    with engine.begin() as conn:
        command.upgrade(_config(service, conn, MetaData()), BASELINE)
    made = MetaData()
    made.reflect(engine)
    listed = {s.get("table") or s["shared"] for s in steps}
    assert set(made.tables) - {version_table(service)} == listed
    for step in steps:
        if "table" in step:
            table = made.tables[step["table"]]
            assert [c.name for c in table.columns] == [c[0] for c in step["columns"]]
            assert [c.nullable for c in table.columns] == [c[2] == "null" for c in step["columns"]]
            assert sorted(str(i.name) for i in table.indexes) == sorted(
                f"ix_{table.name}_{c}" for c in step.get("indexes", [])
            )
    with engine.begin() as conn:
        command.downgrade(_config(service, conn, MetaData()), "base")
    left = MetaData()
    left.reflect(engine)
    assert set(left.tables) == {version_table(service)}
    engine.dispose()


@pytest.mark.parametrize(
    ("step", "refusal"),
    [
        (
            '{"table": "t", "columns": [["a", "Varchar(5)", "null"]], "primary_key": ["a"]}',
            "column type 'Varchar\\(5\\)'",
        ),
        ('{"table": "t", "columns": [["a", "Text", "nullable"]], "primary_key": ["a"]}', "column flags 'nullable'"),
        ('{"shared": "dead_letter"}', "shared table 'dead_letter'"),
    ],
)
def test_a_snapshot_step_it_does_not_know_is_refused_by_name(step: str, refusal: str, tmp_path: Path) -> None:
    from shared.migration_tables import create_snapshot, drop_snapshot

    path = tmp_path / "bad.json"
    path.write_text(f"[{step}]")
    for run in (create_snapshot, drop_snapshot) if "shared" in step else (create_snapshot,):
        with pytest.raises(ValueError, match=f"^schema snapshot: unknown {refusal}"):
            run(path)
