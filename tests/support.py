"""Test helpers shared by the unit, integration and end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, cast

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Table, create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from starlette.datastructures import State
from starlette.testclient import httpx as _testclient_httpx

from bench.traces import found_in_redis, found_in_sqlite  # noqa: F401  (for the erasure tests)
from gateway.run import ROOT, process_env, worker_command
from shared.contracts import ExplanationCreated, FeedbackRecorded, utcnow
from shared.web import AdminDep, install_error_handlers

if TYPE_CHECKING:
    from services.router.store import ExplanationRow

T = TypeVar("T")
S = TypeVar("S", bound="Disposable")


class Disposable(Protocol):
    def dispose(self) -> None: ...


def disposed_after(store: S) -> Iterator[S]:
    """For a store fixture (`yield from`): the store for the test, its engine disposed of after it."""
    try:
        yield store
    finally:
        store.dispose()


def wait_for(
    check: Callable[[], T | Literal[False] | None],
    timeout_s: float = 20.0,
    interval_s: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after the timeout. The value returned is
    never None nor False, so `wait_for(lambda: row_or_none())` is typed as the row."""
    deadline = time.monotonic() + timeout_s
    last: T | Literal[False] | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")


class ServedApp:
    """An ASGI app served by uvicorn on 127.0.0.1:`port` in a daemon thread, for what needs a real port (a
    fake provider, a service's app followed over HTTP): `start()` returns once it answers (within `timeout_s`),
    `stop()` lets it finish; also a context manager. `config`: more `uvicorn.Config` options."""

    def __init__(self, app: Any, port: int, *, name: str = "app", timeout_s: float = 10.0, **config: Any) -> None:
        self.app, self.port, self.name, self.timeout_s, self.config = app, port, name, timeout_s, config
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float | None = None) -> Self:
        import uvicorn

        server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", **self.config)
        )
        thread = threading.Thread(target=server.run, name=self.name, daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"{self.name} did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServesApp:
    """`start`, `stop` and `with` for a fake server whose app is served by its `ServedApp` (`self._served`)."""

    _served: ServedApp

    def start(self, timeout_s: float | None = None) -> Self:
        self._served.start(timeout_s)
        return self

    def stop(self) -> None:
        self._served.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- database backends for the store tests -------------------------------------------------------------------

#: Where the PostgreSQL store tests run (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test). Unset: the local
#: server at LOCAL_POSTGRES_URL when one answers there, else the PostgreSQL variants skip.
POSTGRES_ENV = "TEST_POSTGRES_URL"
#: Set (to 1) where a PostgreSQL server is expected (CI, when one answers): the run fails instead of skipping.
POSTGRES_REQUIRED_ENV = "TEST_POSTGRES_REQUIRED"
LOCAL_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _answers(url: str) -> bool:
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 2}, poolclass=NullPool)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@lru_cache(maxsize=1)
def docker_answers() -> bool:
    """Whether a Docker engine answers here (testcontainers needs one): `GET /_ping` on DOCKER_HOST (a unix or
    tcp address; the default socket otherwise). `TEST_CONTAINERS=0` says no without asking. A machine with only
    the Docker client (this project's development machine, CI) answers no."""
    if os.environ.get("TEST_CONTAINERS", "1") == "0":
        return False
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").rpartition(":")
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port))
        else:
            return False
        with conn:
            conn.settimeout(3)
            conn.connect(address)
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in conn.recv(64)
    except (OSError, ValueError):
        return False


#: Containers this run started (testcontainers), stopped when the run ends (`stop_containers`).
_CONTAINERS: list = []


def postgres_container_url() -> str:
    """A throwaway PostgreSQL in Docker (testcontainers) for this run; its URL in the form the stores take."""
    from testcontainers.community.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver="psycopg").start()
    _CONTAINERS.append(container)
    return container.get_connection_url()


@dataclass(frozen=True)
class ContainerRedis:
    """A throwaway Redis in Docker (testcontainers), standing where a local `RedisServer` would: tests read
    only its `url`."""

    url: str


@contextmanager
def redis_container() -> Iterator[ContainerRedis]:
    from testcontainers.community.redis import RedisContainer

    with RedisContainer("redis:7-alpine") as container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
        yield ContainerRedis(url=f"redis://{host}:{port}/0")


def stop_containers() -> None:
    while _CONTAINERS:
        _CONTAINERS.pop().stop()


def resolve_postgres() -> str | None:
    """The PostgreSQL URL the store tests use this run: TEST_POSTGRES_URL, else a local server that answers,
    else a container (testcontainers) where a Docker engine answers. Sets TEST_POSTGRES_URL for the rest of the
    run (and the processes it starts). With TEST_POSTGRES_REQUIRED set, a URL that does not answer (or none at
    all) is an error, not a skip."""
    url = os.environ.get(POSTGRES_ENV) or (LOCAL_POSTGRES_URL if _answers(LOCAL_POSTGRES_URL) else None)
    if not url and docker_answers():
        url = postgres_container_url()
    if url:
        os.environ[POSTGRES_ENV] = url
    if os.environ.get(POSTGRES_REQUIRED_ENV) and not (url and _answers(url)):
        raise RuntimeError(
            f"{POSTGRES_REQUIRED_ENV} is set but no PostgreSQL answers at {url or LOCAL_POSTGRES_URL}: "
            "the PostgreSQL variants of the store tests cannot run"
        )
    return url


def skip_without_postgres() -> None:
    """Skip the calling PostgreSQL variant when no server was found (decided at run time, after
    `resolve_postgres`, not when the parameters are built at import)."""
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} not set and no local PostgreSQL answers")


def backends() -> list:
    """Parameters for a fixture that runs a store test on SQLite, and on PostgreSQL when TEST_POSTGRES_URL is set
    (`resolve_postgres` sets it from a local server at collection)."""
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgres",
            id="postgres",
            marks=[pytest.mark.postgres],
        ),
    ]


def pg_schema_url(url: str, schema: str, *settings: str) -> str:
    """`url` with every connection's search_path set to `schema`: each service's tables in their own schema, as
    they would be in their own database. `settings` ("name=value") are set on every connection too."""
    sep = "&" if "?" in url else "?"
    options = "%20".join(f"-c{s.replace('=', '%3D')}" for s in (f"search_path={schema}", *settings))
    return f"{url}{sep}options={options}"


_TABLES = text("SELECT tablename FROM pg_tables WHERE schemaname = :s")
_SEQUENCES = text("SELECT sequencename FROM pg_sequences WHERE schemaname = :s")
_FOREIGN_KEYS = text(
    "SELECT 1 FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
    " WHERE c.contype = 'f' AND n.nspname = :s"
)


class PgSchemas:
    """One PostgreSQL schema per service for a test run, created on first use and dropped at the end. Every
    later use empties the tables the schema holds: each test starts from empty tables without paying for
    CREATE TABLE again."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=1)  # one connection, kept for the whole run
        # Schemas are per test process (so two runs at once, or pytest-xdist workers, never share tables) and
        # dropped when the run ends.
        self.suffix = str(os.getpid())
        self.ready: set[str] = set()

    def fresh(self, service: str) -> str:
        """The URL of `service`'s schema, with no rows in any of its tables."""
        schema = f"test_{service}_{self.suffix}"
        with self.engine.begin() as conn:
            if schema not in self.ready:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
                self.ready.add(schema)
            else:
                self._empty(conn, schema)
        # A commit need not wait for the disk here (the tests commit thousands of small transactions); what a
        # transaction sees is unchanged.
        return pg_schema_url(self.url, schema, "synchronous_commit=off")

    @staticmethod
    def _empty(conn: Connection, schema: str) -> None:
        """DELETE every row and restart every sequence (ids start at 1, as in a new SQLite file). DELETE, not
        TRUNCATE: on tables this small it is several times faster. TRUNCATE ... CASCADE only where a foreign key
        would make the order of the DELETEs matter."""
        # The migration version tables keep their row: the schema is still at its revision, only the data goes.
        tables = [
            f'"{schema}"."{t}"' for t in conn.execute(_TABLES, {"s": schema}).scalars() if not t.startswith("alembic")
        ]
        sequences = [f'"{schema}"."{q}"' for q in conn.execute(_SEQUENCES, {"s": schema}).scalars()]
        if not tables:
            return
        if conn.execute(_FOREIGN_KEYS, {"s": schema}).first() is not None:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
            return
        statements = [f"DELETE FROM {t}" for t in tables] + [f"ALTER SEQUENCE {q} RESTART" for q in sequences]
        conn.exec_driver_sql("; ".join(statements))

    def dispose(self) -> None:
        with self.engine.begin() as conn:
            for schema in self.ready:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        self.engine.dispose()


def worker_env(redis_url: str, data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment a service's worker (or server) starts with in a test: `gateway.run.process_env` with the
    tests' secrets."""
    return process_env(redis_url, data_dir, admin_token="t", session_hash_key="k", **overrides)


@contextmanager
def celery_worker(
    service: str, env: Mapping[str, str], log_path: Path, *, loglevel: str = "WARNING"
) -> Iterator[subprocess.Popen]:
    """One service's real Celery worker (the command `make run` uses), stopped on exit; its log's tail is
    printed, so a failing test shows what the worker said."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            worker_command(service, loglevel=loglevel), env=dict(env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"{service} worker log:", log_path.read_text(errors="replace")[-3000:])


def explanation_created(
    explanation_id: uuid.UUID | None = None, session_key: str | None = "s" * 64, **fields: object
) -> ExplanationCreated:
    """An `ExplanationCreated` as the router publishes it (offline model, no experiment); `fields` override."""
    values: dict[str, object] = {
        "explanation_id": explanation_id or uuid.uuid4(),
        "request_key": "rk",
        "ticker": "IBM",
        "signal": "HOLD",
        "prompt_name": "explain_signal",
        "prompt_version": "v1.0",
        "model": "offline/template-v1",
        "provider": "offline",
        "prompt_text": "p",
        "text": "t",
        "tokens_in": 1,
        "tokens_out": 1,
        "cost_usd": 0.0,
        "latency_ms": 1.0,
        "created_at": datetime.now(UTC),
        "session_key": session_key,
    }
    return ExplanationCreated.model_validate(values | fields)


#: What a vote carries from the explanation it is on (the feedback service copies it from its replica).
_COPIED_TO_VOTES = {"prompt_name", "prompt_version", "model", "signal", "ticker", "experiment_id", "arm_id"}


def feedback_recorded(explanation: ExplanationCreated, rating: int = 1, **fields: object) -> FeedbackRecorded:
    """A `FeedbackRecorded` as the feedback service publishes it for a vote on `explanation`, from the session
    it was served to (else "s" * 64), submitted now; `fields` override (session_key, submitted_at, stars ...)."""
    values: dict[str, object] = {
        "feedback_id": uuid.uuid4(),
        "explanation_id": explanation.explanation_id,
        "session_key": explanation.session_key or "s" * 64,
        "rating": rating,
        "submitted_at": datetime.now(UTC),
        **explanation.model_dump(include=_COPIED_TO_VOTES),
    }
    return FeedbackRecorded.model_validate(values | fields)


def stage_raw(
    factory: sessionmaker[Session], outbox: Table, event_id: str, event_type: str, payload: object, age_s: float = 0.0
) -> None:
    """An outbox row written as it is given, `age_s` seconds old, past `shared.outbox.stage`: rows the relay cannot
    read (an unknown type, a payload that is no event), or events staged in a chosen order."""
    with factory() as session, session.begin():
        session.execute(
            outbox.insert().values(
                event_id=event_id,
                event_type=event_type,
                payload=payload,
                created_at=utcnow() - timedelta(seconds=age_s),
            )
        )


def store_in_router(data_dir: Path, event: ExplanationCreated) -> None:
    """The router's row of this explanation in `data_dir/router.db`, with its event never published: what the
    router holds when the event was lost on its way to a consumer."""
    from services.router.store import Store

    store = Store(f"sqlite:///{data_dir / 'router.db'}")
    row = event.model_dump(exclude={"message_id", "occurred_at", "schema_version"})
    with store.uow() as uow:
        uow.repo.add_explanation(
            cast(
                "ExplanationRow",
                row | {"explanation_id": str(event.explanation_id), "context": {}, "requested_model": event.model},
            )
        )
        uow.commit()
    store.dispose()


def admin_app(token: str | None, path: str) -> FastAPI:
    """An app with one admin route at `path` (answers {"data": "secret"}) behind `shared.web.AdminDep`, its
    settings holding `token` (None: no admin token configured)."""
    app = FastAPI()
    install_error_handlers(app)

    def require_admin_token() -> str:
        if not token:
            raise RuntimeError("ADMIN_TOKEN is not set")
        return token

    app.state.settings = SimpleNamespace(require_admin_token=require_admin_token)

    @app.get(path)
    async def secret(_: AdminDep) -> dict[str, str]:
        return {"data": "secret"}

    return app


#: What a TestClient request returns: starlette's client is built on httpx2 where installed, else on httpx.
ClientResponse = _testclient_httpx.Response


def app_state(client: TestClient) -> State:
    """The state (settings, store, bus) of the FastAPI app behind `client`, which types its app as any ASGI app."""
    return cast(FastAPI, client.app).state
