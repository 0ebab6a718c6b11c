"""The test fixtures' Docker path (testcontainers): where a Docker engine answers, the session Redis and (when no
PostgreSQL is configured or local) the PostgreSQL of the store tests are throwaway containers. Where none answers
(this project's development machine and CI have only the Docker client) these tests skip and the fixtures use
the local binaries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.support import docker_answers, postgres_container_url, redis_container, stop_containers

needs_docker = pytest.mark.skipif(not docker_answers(), reason="no Docker engine answers here (only a client)")


@pytest.fixture
def asked_again() -> Iterator[None]:
    """`docker_answers` asks afresh in this test (its answer is cached for the run), and the run's answer is asked
    again after it."""
    docker_answers.cache_clear()
    yield
    docker_answers.cache_clear()


@pytest.mark.usefixtures("asked_again")
def test_containers_can_be_switched_off_without_asking_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CONTAINERS", "0")
    assert docker_answers() is False


@pytest.mark.usefixtures("asked_again")
def test_an_address_where_nothing_answers_is_no_docker(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    assert docker_answers() is False


@needs_docker
@pytest.mark.slow
def test_redis_container_answers_at_its_url() -> None:
    with redis_container() as container:
        client = redis.Redis.from_url(container.url)
        assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
        client.close()


@needs_docker
@pytest.mark.slow
def test_postgres_container_takes_a_store_url() -> None:
    url = postgres_container_url()
    try:
        engine = create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar_one() == 1
        engine.dispose()
    finally:
        stop_containers()


@pytest.mark.usefixtures("asked_again")
def test_an_engine_that_answers_its_ping_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A stand-in for the engine's socket that answers `GET /_ping` as Docker does."""
    import socket
    import threading

    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            assert conn.recv(1024).startswith(b"GET /_ping ")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")

    thread = threading.Thread(target=answer)
    thread.start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    try:
        assert docker_answers() is True
    finally:
        thread.join(timeout=5)
        server.close()
