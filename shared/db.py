"""Database plumbing: one engine per service store. SQLite by default (WAL, busy timeout), any SQLAlchemy URL
otherwise; the same table code runs on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Self, TypeVar

from sqlalchemy import Engine, MetaData, Table, create_engine, event
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from shared.contracts import Event

SQLITE_BUSY_TIMEOUT_MS = 10_000


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(conn):  # type: ignore[no-untyped-def]
            # Take the write lock at BEGIN: two writers then queue on the busy timeout instead of failing
            # with "database is locked" when a read transaction tries to upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        # pysqlite's own transaction handling must be off for the BEGIN above to take effect.
        @event.listens_for(engine, "connect", insert=True)
        def _no_pysqlite_begin(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


RepoT = TypeVar("RepoT")


class UnitOfWork(Generic[RepoT]):
    """One transaction over one service's store, with that service's repository as `repo`. Events added
    with `add_events` are staged in the outbox in the same transaction and published after the commit.
    Leaving the block without `commit()` rolls back."""

    def __init__(self, factory: sessionmaker[Session], make_repo: Callable[[Session], RepoT], outbox: Table) -> None:
        self.factory = factory
        self.make_repo = make_repo
        self.outbox = outbox
        self.committed = False

    def __enter__(self) -> Self:
        self.session = self.factory()
        self.repo: RepoT = self.make_repo(self.session)
        self.committed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.session.rollback()
        self.session.close()

    def add_events(self, *events: Event) -> None:
        from shared.outbox import stage

        stage(self.session, self.outbox, list(events))

    def commit(self) -> None:
        self.session.commit()
        self.committed = True


class SqlStore(Generic[RepoT]):
    """Engine and session factory for one service's database URL; creates its tables on first use (and runs
    `seed`, if given, in the same step). A service's API process and its worker start together: when the
    other one creates the tables first, the attempt is simply made again."""

    def __init__(
        self,
        url: str,
        metadata: MetaData,
        make_repo: Callable[[Session], RepoT],
        outbox: Table,
        *,
        seed: Callable[[Session], None] | None = None,
    ) -> None:
        self.engine = make_engine(url)
        self.factory = make_session_factory(self.engine)
        self.make_repo = make_repo
        self.outbox = outbox
        for attempt in range(3):
            try:
                metadata.create_all(self.engine)
                if seed is not None:
                    with self.factory() as session, session.begin():
                        seed(session)
                break
            except (OperationalError, IntegrityError):
                if attempt == 2:
                    raise

    def uow(self) -> UnitOfWork[RepoT]:
        return UnitOfWork(self.factory, self.make_repo, self.outbox)

    def dispose(self) -> None:
        self.engine.dispose()


def processed_table(metadata: MetaData) -> Table:
    """The ids of the messages a service has handled: every handler checks it first, because the queue
    delivers at least once."""
    from sqlalchemy import Column, DateTime, String

    return Table(
        "processed_messages",
        metadata,
        Column("message_id", String(36), primary_key=True),
        Column("handled_at", DateTime(timezone=True), nullable=False),
    )


class MessageLog:
    """Idempotency for a repository: `self.s` is its session, `processed` its `processed_table`."""

    s: Session
    processed: Table

    def seen(self, message_id: object) -> bool:
        from sqlalchemy import select

        table = self.processed
        return (
            self.s.execute(select(table.c.message_id).where(table.c.message_id == str(message_id))).first() is not None
        )

    def mark_seen(self, message_id: object) -> None:
        from shared.contracts import utcnow

        self.s.execute(self.processed.insert().values(message_id=str(message_id), handled_at=utcnow()))
