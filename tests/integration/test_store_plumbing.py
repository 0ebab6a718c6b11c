"""The shared store plumbing on real SQLite files: a read held open never blocks a write; the outbox relay
dead-letters what it cannot read and goes on; store files are private from the moment they exist."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, text

from services.router.store import Store as RouterStore
from services.router.store import outbox as router_outbox
from shared.contracts import FeedbackErased, utcnow
from shared.outbox import relay
from tests.fakes.bus import FakeBus
from tests.support import stage_raw


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RouterStore:
    monkeypatch.setenv("SQLITE_BUSY_TIMEOUT_MS", "300")  # a blocked writer fails fast instead of waiting 10 s
    return RouterStore(f"sqlite:///{tmp_path / 'data' / 'router.db'}")


def _write(store: RouterStore, n: int) -> None:
    with store.uow() as uow:
        uow.repo.mark_seen(f"msg-{n}")
        uow.commit()


def test_a_read_held_open_does_not_block_a_write(store: RouterStore) -> None:
    _write(store, 0)
    with store.reader() as reader:
        reader.session.execute(text("SELECT count(*) FROM processed_messages")).scalar()  # the read has begun
        # another connection writes and commits while the read is open: were it blocked, it would wait out the
        # 300 ms busy timeout and raise "database is locked" (the read stays open for the whole write)
        _write(store, 1)
        # and the open read still sees its own snapshot
        assert reader.session.execute(text("SELECT count(*) FROM processed_messages")).scalar() == 1
    with store.reader() as reader:
        assert reader.session.execute(text("SELECT count(*) FROM processed_messages")).scalar() == 2


def test_writes_queue_on_the_lock_instead_of_failing(store: RouterStore) -> None:
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            for i in range(20):
                _write(store, base + i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with store.reader() as reader:
        assert reader.session.execute(text("SELECT count(*) FROM processed_messages")).scalar() == 80


def test_store_files_and_their_folder_are_private_when_created(tmp_path: Path, store: RouterStore) -> None:
    _write(store, 0)
    folder = tmp_path / "data"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():  # the store, and SQLite's -wal and -shm beside it
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    old = os.umask(0)  # even with a permissive umask
    try:
        other = RouterStore(f"sqlite:///{tmp_path / 'open' / 'router.db'}")
        assert stat.S_IMODE((tmp_path / "open" / "router.db").stat().st_mode) == 0o600
        other.dispose()
    finally:
        os.umask(old)


def test_the_relay_dead_letters_what_it_cannot_read_and_publishes_the_rest(store: RouterStore) -> None:
    good = FeedbackErased(session_key="k", feedback_ids=[], explanation_ids=[], erased_at=utcnow())
    for i in range(600):  # more unreadable rows than one relay batch: they must not stop it
        stage_raw(store.factory, router_outbox, f"bad-{i:04d}", "no.such.event", {"x": i})
    stage_raw(
        store.factory, router_outbox, "bad-version", "feedback.erased", {**good.to_payload(), "schema_version": 9}
    )
    stage_raw(store.factory, router_outbox, str(good.message_id), good.type, good.to_payload())
    bus = FakeBus()
    published = 0
    for _ in range(3):
        published += relay(store.factory, router_outbox, bus)
    assert published == 1 and [e.message_id for e in bus.events] == [good.message_id]
    with store.reader() as reader:
        pending = reader.session.execute(
            select(router_outbox.c.event_id).where(router_outbox.c.published_at.is_(None))
        ).all()
    assert pending == []
    dead = store.dead_letters.list(limit=1000)
    assert len(dead) == 601
    assert {d["task"] for d in dead} == {"outbox:no.such.event", "outbox:feedback.erased"}
    version = next(d for d in dead if d["message_id"] == "bad-version")
    assert version["reason"] == "unreadable" and "unknown schema version 9" in version["error"]
    assert store.dead_letters.counts() == {"unreadable": 601}


def test_a_row_by_key_is_a_dict_of_its_columns_and_none_when_absent(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from shared.db import make_engine, row_of, value_of

    table = sa.Table("t", sa.MetaData(), sa.Column("k", sa.String(8), primary_key=True), sa.Column("v", sa.Integer))
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    table.metadata.create_all(engine)
    with sa.orm.Session(engine) as s, s.begin():
        s.execute(table.insert(), [{"k": "a", "v": 1}, {"k": "b", "v": 2}])
        assert row_of(s, table, "k", "b") == {"k": "b", "v": 2}
        assert row_of(s, table, "k", "c") is None
        assert value_of(s, table, "k", "v", "a") == 1 and value_of(s, table, "k", "v", "c") is None
    engine.dispose()
