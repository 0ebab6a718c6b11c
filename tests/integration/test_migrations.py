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

from shared.bus import SERVICES
from shared.db import make_engine
from shared.migrations import BASELINE, _config, current_revision, schema_drift, version_table


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


@pytest.mark.parametrize("service", SERVICES)
def test_a_previous_release_store_is_upgraded_and_keeps_every_row(service: str, tmp_path: Path) -> None:
    path = tmp_path / f"{service}.db"
    before = _previous_release_store(service, path)
    assert before and all(len(r) == 2 for _, r in before.values())
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
