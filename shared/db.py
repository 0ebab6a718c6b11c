"""Database plumbing: one engine per service store. SQLite by default (WAL, busy timeout), any SQLAlchemy URL
otherwise; the same table code runs on PostgreSQL.

Transactions: a unit of work (`store.uow()`) takes SQLite's write lock when it begins (`BEGIN IMMEDIATE`), so
two writers queue on the busy timeout instead of one failing when its read tries to upgrade; a read
(`store.reader()`, `store.read_factory`) begins deferred and takes no lock at all, so in WAL mode a read held
open (an export, the live stream, a scrape) never blocks a worker's write, and a write never blocks a read.
A store file is created readable by its owner only (0600); its folder 0700.

Checkpoints: SQLite copies the WAL back into the database (with a disk flush) in whichever commit takes the WAL
past 1,000 pages. An API process moves that work onto a thread of its own (`SqlStore.checkpoint_in_background`,
called by `shared.web.start_service`), so no request waits for a flush; workers keep SQLite's own checkpoints.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from sqlalchemy.types import TypeEngine

    from shared.contracts import Event, Message
    from shared.outbox import JustCommitted

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000
#: An execution option: a connection with it begins a deferred (read) transaction instead of an immediate one.
READ_ONLY = "selflearn_read"


def busy_timeout_ms() -> int:
    """How long a SQLite writer waits for the lock (`SQLITE_BUSY_TIMEOUT_MS`, default 10 s) before "database is
    locked" (then the task is retried with backoff)."""
    return int(os.environ.get("SQLITE_BUSY_TIMEOUT_MS", SQLITE_BUSY_TIMEOUT_MS))


def create_private_file(path: Path) -> None:
    """Create `path` (and its folder) readable by the owner only, unless it exists: with the mode given at
    creation (`os.open`), so there is no moment when it is readable by others."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def make_engine(url: str, *, echo: bool = False) -> sa.Engine:
    if url.startswith("sqlite"):
        path = sa.make_url(url).database  # None or "" for an in-memory store ("sqlite://")
        if path and path != ":memory:" and not path.startswith("file:"):
            create_private_file(Path(path))  # SQLite gives its -wal and -shm files the same mode
        timeout_ms = busy_timeout_ms()
        engine = sa.create_engine(
            url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": timeout_ms / 1000},
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: object) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={timeout_ms}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # Deleted and overwritten rows are zeroed in the file, not left in free pages: an erased session's
            # data is not recoverable from a copy of the store (the WAL keeps old frames until a checkpoint).
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # A write takes the lock at BEGIN: two writers then queue on the busy timeout instead of failing
            # with "database is locked" when a read transaction tries to upgrade. A read takes none.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        # pysqlite's own transaction handling must be off for the BEGIN above to take effect.
        @sa.event.listens_for(engine, "connect", insert=True)
        def _no_pysqlite_begin(dbapi_conn: Any, _record: object) -> None:
            dbapi_conn.isolation_level = None

        return engine
    return sa.create_engine(url, echo=echo, pool_pre_ping=True)


def make_session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def rowcount(result: sa.Result[Any]) -> int:
    """How many rows an INSERT, UPDATE or DELETE matched. `Session.execute` is typed as returning a `Result`;
    for those statements it is a `CursorResult`, which has the count."""
    return int(cast(sa.CursorResult[Any], result).rowcount or 0)


RepoT = TypeVar("RepoT")
T = TypeVar("T")
R = TypeVar("R")


class UnitOfWork(Generic[RepoT]):
    """One transaction over one service's store, with that service's repository as `repo`. Events added
    with `add_events` are staged in the outbox in the same transaction and published after the commit (a store
    without an outbox, one whose service publishes nothing, refuses them).
    Leaving the block without `commit()` rolls back."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        make_repo: Callable[[Session], RepoT],
        outbox: sa.Table | None,
        just_committed: JustCommitted | None = None,
    ) -> None:
        self.factory = factory
        self.make_repo = make_repo
        self.outbox = outbox
        self.just_committed = just_committed  # told the events staged, once they are committed
        self.committed = False
        self.staged: list[Event] = []

    def __enter__(self) -> Self:
        self.session = self.factory()
        self.repo: RepoT = self.make_repo(self.session)
        self.committed = False
        self.staged = []
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.session.rollback()
        self.session.close()

    def add_events(self, *events: Event) -> None:
        self.staged += stage_events(self.session, self.outbox, events)

    def add_new_events(self, *events: Event) -> None:
        """`add_events` for events made in this transaction with fresh ids (no lookup of staged ids first)."""
        self.staged += stage_events(self.session, self.outbox, events, new=True)

    def commit(self) -> None:
        self.session.commit()
        self.committed = True
        if self.just_committed is not None and self.staged:
            self.just_committed.add(self.staged)
        self.staged = []


def stage_events(
    session: Session, outbox: sa.Table | None, events: Sequence[Event], *, new: bool = False
) -> list[Event]:
    """Stage events in the outbox (`shared.outbox.stage`); returns those added."""
    from shared.outbox import stage

    if outbox is None:
        raise RuntimeError("this store has no outbox: its service publishes no events")
    return stage(session, outbox, list(events), new=new)


class SavepointUnitOfWork:
    """One message's share of a batch transaction (`run_in_one_transaction`): it looks like a `UnitOfWork` to a
    handler written for one message (`with uow: ... uow.commit()`). The batch gives each message a savepoint;
    `commit()` keeps the message's changes (committed with the batch); a block left without it, or with an
    exception, makes the batch roll back to the message's savepoint: what the handler would have done alone,
    without disturbing the other messages. A handler that opens a second block gets a nested savepoint for it."""

    def __init__(self, outer: UnitOfWork[Any]) -> None:
        self.outer = outer
        self.session = outer.session
        self.repo = outer.repo
        self.outbox = outer.outbox
        self.committed = False
        self.discarded = False  # a block ended without commit: the message's savepoint is rolled back
        self.staged: list[Event] = []  # what the message staged: the batch's once its savepoint is kept
        self._blocks = 0
        self._nested: Any = None
        self._staged_before = 0

    def __enter__(self) -> Self:
        self._blocks += 1
        self.committed = False
        self._nested = self.session.begin_nested() if self._blocks > 1 else None
        self._staged_before = len(self.staged)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed:
            return
        if self._nested is not None:
            if self._nested.is_active:
                self._nested.rollback()
            del self.staged[self._staged_before :]
        else:
            self.discarded = True

    def add_events(self, *events: Event) -> None:
        self.staged += stage_events(self.session, self.outbox, events)

    def add_new_events(self, *events: Event) -> None:
        """`add_events` for events made in this transaction with fresh ids (no lookup of staged ids first)."""
        self.staged += stage_events(self.session, self.outbox, events, new=True)

    def commit(self) -> None:
        if self._nested is not None:
            self._nested.commit()
        self.committed = True


def handle_once(uow: Any, message_id: object, apply: Callable[[Any], R], *, duplicate: Any = "duplicate") -> Any:
    """Handle a message at most once per store: in one unit of work, a message id already seen returns
    `duplicate` (the queue delivers at least once: a redelivery is acknowledged and ignored); otherwise it is
    marked seen, `apply(uow)` runs, and the unit of work commits with both. Returns what `apply` returned.
    If `apply` raises, nothing is committed, the mark included, so the retry handles the message again."""
    with uow:
        if uow.repo.seen(message_id):
            return duplicate
        uow.repo.mark_seen(message_id)
        result = apply(uow)
        uow.commit()
    return result


def first_of_each(items: Sequence[T], key: Callable[[T], str], known: set[str]) -> tuple[list[bool], list[T]]:
    """In a batch, the items whose key is new: neither in `known` (what the store has) nor taken by an earlier
    item of the batch. Returns a flag per item, in order, and the new items; `known` gains their keys."""
    flags: list[bool] = []
    new: list[T] = []
    for item in items:
        k = key(item)
        flags.append(k not in known)
        if k not in known:
            known.add(k)
            new.append(item)
    return flags, new


def handle_many_once(
    uow: Any, messages: Sequence[T], apply: Callable[[Any, list[T]], list[R]], *, duplicate: Any = "duplicate"
) -> list[Any]:
    """`handle_once` for a batch, set-based: in one unit of work, one query finds which message ids were
    already handled (a message repeated within the batch is a duplicate after its first), the others are
    marked seen in one statement, and `apply(uow, fresh messages in order)` returns their outcomes. Returns,
    in the batch's order, each message's outcome or `duplicate`. If `apply` raises, nothing is committed."""
    with uow:
        seen = uow.repo.seen_many([m.message_id for m in messages])  # type: ignore[attr-defined]
        is_fresh, fresh = first_of_each(messages, lambda m: str(m.message_id), seen)  # type: ignore[attr-defined]
        uow.repo.mark_seen_many([m.message_id for m in fresh])  # type: ignore[attr-defined]
        outcomes = iter(apply(uow, fresh) if fresh else [])
        results = [next(outcomes) if f else duplicate for f in is_fresh]
        uow.commit()
    return results


def run_batch(
    uow: UnitOfWork[Any],
    items: Sequence[T],
    many: Callable[[list[T], Any], list[R]],
    each: Callable[[T, Any], R],
) -> list[tuple[bool, R | Exception]]:
    """Digest a batch in one transaction with the set-based handler `many(items, uow)` (a few statements for
    the whole batch; it returns one outcome per item, in order). If it raises, its work is rolled back (to a
    savepoint: the lock is kept) and the batch is run again message by message with `each`, each in its own
    savepoint (`run_in_one_transaction`): a bad message is then rolled back alone and the others commit, as
    they would have without the set-based path. Returns what `run_in_one_transaction` returns."""
    if not items:
        return []
    try:
        with uow:
            uow.session.connection()  # BEGIN (IMMEDIATE on SQLite): wait for the lock once
            whole = uow.session.begin_nested()
            member = SavepointUnitOfWork(uow)
            results: list[tuple[bool, R | Exception]]
            try:
                outcomes = many(list(items), member)
                if member.discarded or len(outcomes) != len(items):
                    raise RuntimeError("the batch handler did not commit an outcome for every message")
            except Exception as exc:
                if whole.is_active:
                    whole.rollback()
                log.warning("a batch of %d fell back to one message at a time: %s", len(items), _describe(exc))
                results = _each_in_savepoint(uow, items, each)
            else:
                whole.commit()
                uow.staged += member.staged
                results = [(True, outcome) for outcome in outcomes]
            uow.commit()
    except Exception as exc:
        return [(False, exc)] * len(items)
    return results


def _describe(exc: Exception) -> str:
    from shared.deadletter import describe_error

    return describe_error(exc)


def run_in_one_transaction(
    uow: UnitOfWork[Any], items: Sequence[T], handle: Callable[[T, Any], R]
) -> list[tuple[bool, R | Exception]]:
    """Run a one-message handler `handle(item, uow)` for every item, all in one transaction (one commit, one
    lock), each item in its own savepoint. Returns, in order, (True, what the handler returned) or (False, the
    exception it raised): a failing item is rolled back alone and the others still commit. If the transaction
    cannot begin or commit, every item gets that error (nothing of the batch was stored)."""
    if not items:
        return []
    try:
        with uow:
            uow.session.connection()  # BEGIN (IMMEDIATE on SQLite): wait for the lock once, not per item
            results = _each_in_savepoint(uow, items, handle)
            uow.commit()
    except Exception as exc:
        return [(False, exc)] * len(items)
    return results


def _each_in_savepoint(
    uow: UnitOfWork[Any], items: Sequence[T], handle: Callable[[T, Any], R]
) -> list[tuple[bool, R | Exception]]:
    results: list[tuple[bool, R | Exception]] = []
    for item in items:
        own = uow.session.begin_nested()  # everything this item writes, whatever the handler does
        member = SavepointUnitOfWork(uow)
        try:
            outcome = handle(item, member)
        except Exception as exc:
            own.rollback()
            results.append((False, exc))
        else:
            if member.discarded:
                own.rollback()
            else:
                own.commit()
                uow.staged += member.staged
            results.append((True, outcome))
    return results


def _service_of(make_repo: Callable[..., object]) -> str | None:
    """The service a repository belongs to, from its module (`services.<name>.store`)."""
    parts = getattr(make_repo, "__module__", "").split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "services" else None


def fetch_one_raw(engine: sa.Engine, sql: str) -> tuple[Any, ...] | None:
    """The first row of one constant statement on a pooled DB-API connection: no SQLAlchemy transaction,
    compilation or result machinery (about a tenth of the cost through a SQLAlchemy connection)."""
    conn = engine.raw_connection()
    try:
        cursor = conn.cursor()
        cursor.execute(sql)
        row = cursor.fetchone()
        cursor.close()
    finally:
        conn.close()  # back to the pool, which ends what the statement began
    return tuple(row) if row is not None else None


def is_sqlite_file(engine: sa.Engine) -> bool:
    url = engine.url
    return url.get_backend_name() == "sqlite" and bool(url.database) and url.database != ":memory:"


class BackgroundCheckpoints:
    """The WAL checkpoints of one SQLite engine, made on a thread of their own rather than by the commits.

    Every `interval_s` the thread runs a PASSIVE checkpoint: it copies what the WAL holds into the database and
    flushes it, without blocking a reader or a writer (writers append to the WAL meanwhile). The engine's
    connections (those it opens from now on: the pool is emptied) checkpoint in a commit only past
    `WAL_BOUND_PAGES` (`PRAGMA wal_autocheckpoint`, SQLite's default is 1,000): under steady writes the WAL is
    never wholly copied at the moment a writer starts, which is when SQLite starts it again from its beginning,
    so the bound is what starts it again then; with the thread's copies done, the commit that crosses it has
    little left to copy. The file is cut back to the bound's size when the WAL starts again
    (`PRAGMA journal_size_limit`). As with SQLite's own checkpoints, a read transaction held open (an export,
    the live stream) stops every checkpoint at its snapshot, and the WAL grows past the bound until it ends.
    Other processes' connections to the file keep SQLite's defaults. A checkpoint that fails is logged and made
    again at the next tick; one that another process's checkpoint kept busy is simply made again."""

    INTERVAL_S = 0.25
    WAL_BOUND_PAGES = 4_000  # about 16 MB of WAL with 4 KiB pages

    def __init__(self, engine: sa.Engine, *, interval_s: float = INTERVAL_S) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.runs = 0  # checkpoints the thread made (busy or not)
        self.busy = 0  # of them, those another connection's checkpoint kept from running
        self.failures = 0
        sa.event.listen(engine, "connect", _commits_checkpoint_only_past_the_bound)
        engine.dispose()  # the connections opened before (the migration's) have SQLite's default
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoints", daemon=True)
        self._thread.start()

    def checkpoint(self) -> tuple[int, int, int]:
        """One PASSIVE checkpoint now: (busy, frames in the WAL, frames checkpointed), as SQLite returns them."""
        row = fetch_one_raw(self.engine, "PRAGMA wal_checkpoint(PASSIVE)")
        if row is None:
            raise RuntimeError("PRAGMA wal_checkpoint returned no row (is the store in WAL mode?)")
        busy, log_frames, done = (int(v) for v in row)
        return busy, log_frames, done

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                busy, _, _ = self.checkpoint()
                self.runs += 1
                self.busy += busy
            except Exception:
                self.failures += 1
                log.warning("a background WAL checkpoint failed (made again in %.2f s)", self.interval_s, exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.checkpoint()
        except Exception:
            log.warning("the last WAL checkpoint failed; the next process to open the store makes it", exc_info=True)
        sa.event.remove(self.engine, "connect", _commits_checkpoint_only_past_the_bound)


def _commits_checkpoint_only_past_the_bound(dbapi_conn: Any, _record: object) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute(f"PRAGMA wal_autocheckpoint={BackgroundCheckpoints.WAL_BOUND_PAGES}")
    cursor.execute(f"PRAGMA journal_size_limit={BackgroundCheckpoints.WAL_BOUND_PAGES * 4096}")
    cursor.close()


class SqlStore(Generic[RepoT]):
    """Engine and session factories for one service's database URL. On first use it brings the schema up to
    date (`shared.migrations.migrate`: Alembic, the service's own version table; a repository outside
    `services/` just gets `create_all`) and runs `seed`, if given. A service's API process and its worker
    start together: when the other one holds the lock too long, the attempt is simply made again.

    Every store has a dead-letter table (`dead_letters`: see `shared.deadletter`)."""

    def __init__(
        self,
        url: str,
        metadata: sa.MetaData,
        make_repo: Callable[[Session], RepoT],
        outbox: sa.Table | None,
        *,
        seed: Callable[[Session], None] | None = None,
        service: str | None = None,
    ) -> None:
        from shared.deadletter import DeadLetters, dead_letter_table
        from shared.migrations import has_migrations, migrate
        from shared.outbox import JustCommitted

        self.engine = make_engine(url)
        self.factory = make_session_factory(self.engine)
        self.read_factory = make_session_factory(self.engine.execution_options(**{READ_ONLY: True}))
        self.make_repo = make_repo
        self.outbox = outbox
        self.just_committed = JustCommitted()  # what a worker publishes from memory (`relay_committed`)
        self.service = service or _service_of(make_repo)
        self.dead_letters = DeadLetters(self.factory, dead_letter_table(metadata))
        self.checkpoints: BackgroundCheckpoints | None = None
        for attempt in range(3):
            try:
                if self.service is not None and has_migrations(self.service):
                    migrate(self.engine, metadata, self.service)
                else:
                    metadata.create_all(self.engine)
                if seed is not None:
                    with self.factory() as session, session.begin():
                        seed(session)
                break
            except (OperationalError, IntegrityError):
                if attempt == 2:
                    raise

    def checkpoint_in_background(self, interval_s: float = BackgroundCheckpoints.INTERVAL_S) -> None:
        """Checkpoint this store's WAL on a thread of its own rather than in the commits (`BackgroundCheckpoints`;
        a SQLite file only, nothing to do elsewhere). For a process whose requests write: with SQLite's
        automatic checkpoints, about one in 50 of the router's explanation writes copied the WAL back and flushed
        the file, which set the write's p99."""
        if self.checkpoints is None and is_sqlite_file(self.engine):
            self.checkpoints = BackgroundCheckpoints(self.engine, interval_s=interval_s)

    def uow(self) -> UnitOfWork[RepoT]:
        """A write transaction (takes the write lock when it begins)."""
        return UnitOfWork(self.factory, self.make_repo, self.outbox, self.just_committed)

    def reader(self) -> UnitOfWork[RepoT]:
        """A read transaction: deferred, takes no lock, never blocks a writer (nor waits for one)."""
        return UnitOfWork(self.read_factory, self.make_repo, self.outbox)

    def dispose(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()  # a last checkpoint, then the thread ends
            self.checkpoints = None
        self.engine.dispose()


#: The column type of each field the contracts carry between services (`shared.contracts`), and whether a message
#: may leave it out (None): one type and width per field, for the service that makes it and those that keep a copy
#: (`contract_columns`). A store whose column was made otherwise (a router's `ticker` of 12 characters, a fine-tuned
#: model's `base_model` as text) declares that column itself: a schema is changed only by a migration.
CONTRACT_COLUMNS: Mapping[str, tuple[TypeEngine[Any], bool]] = {
    "explanation_id": (sa.String(36), False),
    "feedback_id": (sa.String(36), False),
    "session_key": (sa.String(64), False),  # keyed hash of the session, never the raw id
    "ticker": (sa.String(32), False),
    "signal": (sa.String(8), False),
    "prompt_name": (sa.String(100), False),
    "prompt_version": (sa.String(50), False),
    "model": (sa.String(200), False),
    "experiment_id": (sa.String(64), True),
    "arm_id": (sa.String(64), True),
    "prompt_text": (sa.Text(), False),
    "text": (sa.Text(), False),
    "tokens_in": (sa.Integer(), False),
    "tokens_out": (sa.Integer(), False),
    "cost_usd": (sa.Float(), False),
    "latency_ms": (sa.Float(), False),
    "fallback_used": (sa.Boolean(), False),
    "created_at": (sa.DateTime(timezone=True), False),
    "rating": (sa.SmallInteger(), False),
    "stars": (sa.SmallInteger(), True),
    "has_comment": (sa.Boolean(), False),
    "submitted_at": (sa.DateTime(timezone=True), False),
    # a prompt version (`PromptTemplate`), a champion's and an experiment's (`ChampionChanged`, `ExperimentStarted`,
    # `ArmSpec`, `ExperimentConcluded`)
    "template": (sa.Text(), False),
    "previous_version": (sa.String(50), True),
    "allocation": (sa.String(16), False),
    "weight": (sa.Float(), False),
    "is_control": (sa.Boolean(), False),
    "winner_arm_id": (sa.String(64), True),
    # a model and its training (`ModelRegistered`, `FineTuneProgress`)
    "model_id": (sa.String(64), False),
    "base_model": (sa.String(200), False),
    "serving_base_url": (sa.String(500), True),
    "metrics": (sa.JSON(), False),
    "cost_per_1k_tokens_usd": (sa.Float(), False),
    "job_id": (sa.String(64), False),
    "progress": (sa.Float(), False),
    "detail": (sa.Text(), False),
}


def contract_columns(*names: str, **options: Any) -> list[sa.Column[Any]]:
    """New columns (a column belongs to one table) for these contract fields, typed as `CONTRACT_COLUMNS` says,
    in this order, each with `options` (`primary_key=True`, `index=True`, `default=...`; a key is not null)."""
    columns: list[sa.Column[Any]] = []
    for name in names:
        type_, nullable = CONTRACT_COLUMNS[name]
        implied = {} if options.get("primary_key") else {"nullable": nullable}
        columns.append(sa.Column(name, type_.copy(), **(implied | options)))
    return columns


def copied_fields(table: sa.Table, message: type[Message]) -> tuple[str, ...]:
    """The columns of `table` that keep a field of `message` (the same name), in the table's order: the fields a
    replica row copies from each such message (`message.row(*fields)`), named once, by the table."""
    return tuple(c.name for c in table.columns if c.name in message.model_fields)


def erasure_columns() -> list[sa.Column[Any]]:
    """The key and time of a record of an erased session: `session_key` holds `shared.privacy.erasure_tag` of the
    session's key (64 hex digits, a one-way digest: never the key itself), `erased_at` when it was erased."""
    return [
        sa.Column("session_key", sa.String(64), primary_key=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
    ]


def processed_table(metadata: sa.MetaData) -> sa.Table:
    """The ids of the messages a service has handled: every handler checks it first, because the queue
    delivers at least once."""
    return sa.Table(
        "processed_messages",
        metadata,
        sa.Column("message_id", sa.String(36), primary_key=True),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False),
    )


def erased_votes_table(metadata: sa.MetaData) -> sa.Table:
    """The ids of votes erased at their session's request (GDPR), with when, in a service that keeps votes
    from `FeedbackRecorded`: the queue does not keep order, so a vote cast before the erasure that arrives
    after it must be recognised and dropped (`shared.votes.erased_before`), not brought back."""
    return sa.Table(
        "erased_votes",
        metadata,
        *contract_columns("feedback_id", primary_key=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
    )


class MessageLog:
    """The base of a service's repository: `self.s` is the session it is made with, `processed` its
    `processed_table` (idempotency: the message ids its handlers have applied), `outbox` its outbox table (None:
    the service publishes nothing)."""

    processed: sa.Table
    outbox: sa.Table | None = None

    def __init__(self, session: Session) -> None:
        self.s = session

    def seen(self, message_id: object) -> bool:
        table = self.processed
        return (
            self.s.execute(sa.select(table.c.message_id).where(table.c.message_id == str(message_id))).first()
            is not None
        )

    def mark_seen(self, message_id: object) -> None:
        from shared.contracts import utcnow

        self.s.execute(self.processed.insert().values(message_id=str(message_id), handled_at=utcnow()))

    def seen_many(self, message_ids: Iterable[object]) -> set[str]:
        """Which of these message ids were handled already (one query per `IN_CHUNK` ids)."""
        return existing_keys(self.s, self.processed, "message_id", (str(m) for m in message_ids))

    def mark_seen_many(self, message_ids: Iterable[object]) -> None:
        from shared.contracts import utcnow

        now = utcnow()
        rows = [{"message_id": str(m), "handled_at": now} for m in message_ids]
        if rows:
            self.s.execute(self.processed.insert(), rows)

    def forget_session_messages(self, session_key: str) -> None:
        """An erased session's key out of the messages this store keeps, in this transaction: the events of its
        outbox (`shared.outbox.forget_session`) and its dead letters (`shared.deadletter.forget_session`)."""
        from shared.deadletter import dead_letter_table
        from shared.deadletter import forget_session as forget_dead_letters
        from shared.outbox import forget_session

        if self.outbox is not None:
            forget_session(self.s, self.outbox, [session_key])
        forget_dead_letters(self.s, dead_letter_table(self.processed.metadata), [session_key])


#: How many values one `IN (...)` of `select_in` binds at most (SQLite allows 32766 bound values per statement
#: since 3.32, 999 before).
IN_CHUNK = 900


def select_in(s: Session, query: sa.Select[Any], column: Any, values: Sequence[Any]) -> list[Any]:
    """The rows of `query` whose `column` is one of `values`, in as few statements as `IN_CHUNK` allows. A
    query of one column gives its values, of several its rows."""
    out: list[Any] = []
    single = len(query.selected_columns) == 1
    for k in range(0, len(values), IN_CHUNK):
        result = s.execute(query.where(column.in_(values[k : k + IN_CHUNK])))
        out.extend(result.scalars() if single else result.all())
    return out


def explanations_voted_but_unknown(
    s: Session, votes: sa.Table, known: sa.Table, since: datetime, until: datetime, limit: int = 500
) -> list[uuid.UUID]:
    """Explanations with votes (`votes`, submitted between `since` and `until`) that have no row in `known`:
    their `ExplanationCreated` never reached this store (the service asks the router for it again)."""
    present = sa.select(known.c.explanation_id).where(known.c.explanation_id == votes.c.explanation_id)
    q = (
        sa.select(votes.c.explanation_id)
        .where(votes.c.submitted_at >= since, votes.c.submitted_at <= until, ~present.exists())
        .distinct()
        .limit(limit)
    )
    return [uuid.UUID(r) for r in s.execute(q).scalars()]


def write_rows(
    s: Session,
    table: sa.Table,
    key: str,
    new: Sequence[tuple[dict[str, Any], int]],
    replacing: Sequence[tuple[dict[str, Any], int]],
    *,
    counter: str | None = None,
) -> None:
    """Write a batch's rows (`shared.votes.NewestInBatch.writes`): `new` inserted, `replacing` updated by the
    column `key`, one executemany each. Each row comes with how many times the batch wrote it; a `counter`
    column counts the writes (set to that number on insert, increased by it on update)."""
    if new:
        s.execute(table.insert(), [row | ({counter: n} if counter else {}) for row, n in new])
    if replacing:
        columns = [c for c in replacing[0][0] if c != key]
        values: dict[str, Any] = {c: sa.bindparam(f"v_{c}") for c in columns}
        if counter:
            values[counter] = table.c[counter] + sa.bindparam("v_times")
        stmt = table.update().where(table.c[key] == sa.bindparam("k_key")).values(values)
        s.execute(
            stmt,
            [
                {"k_key": row[key]} | ({"v_times": n} if counter else {}) | {f"v_{c}": row[c] for c in columns}
                for row, n in replacing
            ],
        )


def existing_keys(s: Session, table: sa.Table, key: str, keys: Iterable[str]) -> set[str]:
    """Which of `keys` are the `key` column of a row of `table` (one query per `IN_CHUNK`)."""
    return set(select_in(s, sa.select(table.c[key]), table.c[key], sorted(set(keys))))


def values_by_key(s: Session, table: sa.Table, key: str, column: str, keys: Iterable[str]) -> dict[str, Any]:
    """`column` of the rows of `table` whose `key` column is one of `keys`, by key (one query per `IN_CHUNK`)."""
    q = sa.select(table.c[key], table.c[column])
    return dict(select_in(s, q, table.c[key], sorted(set(keys))))


def row_of(s: Session, table: sa.Table, key: str, value: Any) -> dict[str, Any] | None:
    """The row of `table` whose `key` column is `value`, as a dict of its columns, or None where there is none."""
    row = s.execute(sa.select(table).where(table.c[key] == value)).mappings().first()
    return None if row is None else dict(row)


def value_of(s: Session, table: sa.Table, key: str, column: str, value: Any) -> Any:
    """`column` of the row of `table` whose `key` column is `value`, or None where there is no such row
    (`values_by_key` for one key)."""
    row = s.execute(sa.select(table.c[column]).where(table.c[key] == value)).first()
    return None if row is None else row[0]


def insert_new(s: Session, table: sa.Table, key: str, values: Mapping[str, Any]) -> bool:
    """Insert `values` unless `table` has a row with their `key` already (an event delivered again): True when
    inserted."""
    if value_of(s, table, key, key, values[key]) is not None:
        return False
    s.execute(table.insert().values(**values))
    return True


def upsert(s: Session, table: sa.Table, key: str, values: Mapping[str, Any], *, exists: bool | None = None) -> None:
    """`values` as the row of `table` with their `key`: that row updated where it exists, else inserted.
    `exists`: whether it does, where the caller knows (else it is looked up)."""
    if exists is None:
        exists = value_of(s, table, key, key, values[key]) is not None
    if exists:
        s.execute(table.update().where(table.c[key] == values[key]).values(**values))
    else:
        s.execute(table.insert().values(**values))
