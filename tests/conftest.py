"""Fixtures: a private redis-server on a free port, the whole system as `make run` starts it, and store URLs on
SQLite and (when TEST_POSTGRES_URL is set) PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.redis_server import RedisServer, free_port
from gateway.run import Stack
from tests.support import (
    POSTGRES_ENV,
    ContainerRedis,
    PgSchemas,
    backends,
    docker_answers,
    redis_container,
    resolve_postgres,
    skip_without_postgres,
    stop_containers,
)


def pytest_configure(config: pytest.Config) -> None:
    """Find PostgreSQL before collection decides which store variants skip."""
    try:
        resolve_postgres()
    except RuntimeError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_containers()


# Timings shrunk for tests: a killed worker's message comes back within seconds; experiments decide in
# seconds, not days. Everything else is the production configuration.
FAST_ENV = {
    "BROKER_VISIBILITY_TIMEOUT": "4",
    "OUTBOX_RELAY_INTERVAL_S": "2",
    "OPTIMIZER_DECISION_INTERVAL_S": "2",
    "OPTIMIZER_FEEDBACK_RATE_GRACE_S": "2",  # votes still on their way stay out of the feedback rate
    "FINETUNE_WATCHDOG_INTERVAL_S": "2",
    "DASHBOARD_ANOMALY_INTERVAL_S": "5",
    "FEEDBACK_JOURNAL_SWEEP_INTERVAL_S": "2",
    "FEEDBACK_JOURNAL_GRACE_S": "10",
    "LOG_LEVEL": "INFO",
    "ADMIN_TOKEN": "test-admin-token",
    "SESSION_HASH_KEY": "test-session-key",
    # Every test client is one address (127.0.0.1), as a load generator is: the per-client limits are raised so
    # that many simulated users fit; the per-session limits keep their defaults (tests/e2e/test_doors.py).
    "ROUTER_EXPLANATIONS_PER_CLIENT": "100000/minute",
    "FEEDBACK_VOTES_PER_CLIENT": "100000/minute",
    "FEEDBACK_ERASURES_PER_CLIENT": "10000/hour",
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | ContainerRedis]:
    """A Redis for the tests that need only its URL: a container (testcontainers) where a Docker engine answers,
    else a local redis-server on a free port. Tests that stop, freeze or restart Redis start their own
    `RedisServer`."""
    if docker_answers():
        with redis_container() as container:
            yield container
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def start_stack(data_dir: Path, **env: str) -> Stack:
    """The whole system with its own redis-server (a developer's REDIS_URL is never inherited), unless the
    caller passes REDIS_URL itself."""
    overrides = {**FAST_ENV, "REDIS_URL": "", **env}
    return Stack(data_dir=data_dir, port=free_port(), env_overrides=overrides).start()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole system, shared by the end-to-end tests of one run (start-up takes seconds)."""
    s = start_stack(tmp_path_factory.mktemp("system"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {FAST_ENV['ADMIN_TOKEN']}"}


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[PgSchemas]:
    schemas = PgSchemas(os.environ[POSTGRES_ENV])
    try:
        yield schemas
    finally:
        schemas.dispose()


@pytest.fixture(params=backends())
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """`store_url(service)`: a database URL with empty tables for that service's store. Every test that uses it
    runs twice: on a new SQLite file, and on the service's own PostgreSQL schema (skipped unless
    TEST_POSTGRES_URL is set or a local server answers)."""
    if request.param == "sqlite":
        return lambda service: f"sqlite:///{tmp_path / f'{service}.db'}"
    skip_without_postgres()
    schemas: PgSchemas = request.getfixturevalue("pg_schemas")
    urls: dict[str, str] = {}  # emptied once per test: a second call (a reopened store) sees the same rows

    def url(service: str) -> str:
        if service not in urls:
            urls[service] = schemas.fresh(service)
        return urls[service]

    return url
