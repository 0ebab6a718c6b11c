"""WAL checkpoints on a thread of their own (`shared.db.BackgroundCheckpoints`), for the processes whose requests
write: with SQLite's automatic checkpoints, the commit that takes the WAL past 1,000 pages copies it into the
database and flushes it, and the request that made it waits. Real SQLite files, real threads."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import Column, Integer, MetaData, Table, Text
from sqlalchemy.orm import Session

from gateway.redis_server import RedisServer
from services.router.config import RouterSettings
from shared.db import BackgroundCheckpoints, SqlStore
from shared.web import service_app, start_service
from tests.support import wait_for

metadata = MetaData()
notes = Table("notes", metadata, Column("id", Integer, primary_key=True), Column("body", Text, nullable=False))

PAGE = 4096


class Repo:
    def __init__(self, session: Session) -> None:
        self.s = session


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[SqlStore[Repo]]]:
    opened: list[SqlStore[Repo]] = []
    yield opened
    for store in opened:
        store.dispose()


def open_store(path: Path, opened: list[SqlStore[Repo]]) -> SqlStore[Repo]:
    store = SqlStore(f"sqlite:///{path}", metadata, Repo, None)
    opened.append(store)
    return store


def write(store: SqlStore[Repo], pages: int) -> None:
    """About `pages` pages of new rows, a page a transaction."""
    for _ in range(pages):
        with store.uow() as uow:
            uow.session.execute(notes.insert(), {"body": "x" * (PAGE - 200)})
            uow.commit()


def wal_frames(path: Path) -> int:
    """The frames the WAL holds now (its size; a checkpoint does not shrink it, a restart writes from its start)."""
    wal = Path(f"{path}-wal")
    return max(0, (wal.stat().st_size - 32) // (PAGE + 24)) if wal.exists() else 0


def test_commits_leave_the_checkpoints_to_the_thread(tmp_path: Path, stores: list[SqlStore[Repo]]) -> None:
    plain = open_store(tmp_path / "plain.db", stores)
    background = open_store(tmp_path / "background.db", stores)
    background.checkpoint_in_background(interval_s=3600)  # the thread waits: only commits could checkpoint
    assert background.checkpoints is not None
    with background.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == BackgroundCheckpoints.WAL_BOUND_PAGES
    write(plain, 900)  # 2-3 frames a transaction (the row's page, the header page ...): below the bound in all
    write(background, 900)
    # SQLite's own checkpoint ran in a commit past 1,000 frames, and the WAL started again from its beginning;
    # with the thread in charge, no commit below the bound checkpointed, so the WAL kept every frame
    assert wal_frames(tmp_path / "plain.db") < 1100
    busy, log_frames, done = background.checkpoints.checkpoint()
    assert (
        1800 < log_frames < BackgroundCheckpoints.WAL_BOUND_PAGES
        and wal_frames(tmp_path / "background.db") >= log_frames
    )
    assert busy == 0 and done == log_frames  # everything copied by one checkpoint of the thread's kind


def test_the_thread_checkpoints_what_the_commits_wrote(tmp_path: Path, stores: list[SqlStore[Repo]]) -> None:
    path = tmp_path / "store.db"
    store = open_store(path, stores)
    store.checkpoint_in_background(interval_s=0.05)
    assert store.checkpoints is not None
    write(store, 300)
    runs = store.checkpoints.runs
    wait_for(lambda: store.checkpoints is not None and store.checkpoints.runs >= runs + 2, timeout_s=10)
    # the database file alone (the WAL ignored) holds every row: the thread copied them
    with sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone()[0] == 300
    thread = store.checkpoints._thread
    store.dispose()
    assert not thread.is_alive() and store.checkpoints is None


def test_a_failed_checkpoint_is_made_again_at_the_next_tick(tmp_path: Path, stores: list[SqlStore[Repo]]) -> None:
    store = open_store(tmp_path / "store.db", stores)
    store.checkpoint_in_background(interval_s=0.02)
    checkpoints = store.checkpoints
    assert checkpoints is not None
    real = checkpoints.checkpoint
    failing = [2]

    def flaky() -> tuple[int, int, int]:
        if failing[0]:
            failing[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real()

    checkpoints.checkpoint = flaky  # type: ignore[method-assign]
    runs = checkpoints.runs
    wait_for(lambda: checkpoints.runs > runs and checkpoints.failures == 2, timeout_s=10)
    assert checkpoints._thread.is_alive()


def test_a_store_that_is_not_a_sqlite_file_has_none(
    tmp_path: Path, stores: list[SqlStore[Repo]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqlStore("sqlite://", metadata, Repo, None)
    stores.append(store)
    store.checkpoint_in_background()
    assert store.checkpoints is None
    assert list(tmp_path.iterdir()) == []  # an in-memory store creates no file (once it made one named "sqlite:")


def test_a_start_up_that_fails_after_the_store_opened_closes_it(tmp_path: Path, redis_server: RedisServer) -> None:
    opened: list[SqlStore[Repo]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened.append(start_service(app, settings, lambda url: open_store(tmp_path / "store.db", [])))
        raise RuntimeError("the provider settings are wrong")
        yield

    settings = RouterSettings(
        data_dir=tmp_path, redis_url=redis_server.url, admin_token=SecretStr("t"), session_hash_key=SecretStr("k")
    )
    with (
        pytest.raises(RuntimeError, match="provider settings"),
        TestClient(service_app(settings, lifespan, APIRouter())),
    ):
        pass
    (store,) = opened
    assert store.checkpoints is None  # disposed: its thread stopped
