"""Fixtures of the end-to-end tests that run experiments: a system of the test module's own (its experiments
change the champion, which other end-to-end tests must not see), deciding every second, with no automatic
experiment in the way."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gateway.run import Stack
from tests.conftest import start_stack


@pytest.fixture(scope="module")
def system(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    name = request.module.__name__.rpartition(".")[2]
    s = start_stack(tmp_path_factory.mktemp(name), OPTIMIZER_DECISION_INTERVAL_S="1", OPTIMIZER_AUTO_EXPERIMENT="false")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def http(system: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url, timeout=30) as client:
        yield client
