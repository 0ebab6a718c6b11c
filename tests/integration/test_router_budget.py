"""The daily budget's ledger on a real Redis: a cost counts at once in the process that spent it, reaches the
shared key (what other replicas read) when settled, and is kept for the next settle while Redis is away; the
shared total is read at most every `refresh_s` and learnt at every settle."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from gateway.redis_server import RedisServer, free_port
from services.router.budget import SpendLedger
from services.router.domain import budget_day


def test_a_cost_counts_at_once_here_and_for_every_replica_once_settled(redis_server: RedisServer) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(url).flushdb()
    here = SpendLedger(url, 1.0, from_store=lambda since: 0.0, refresh_s=0)
    other = SpendLedger(url, 1.0, from_store=lambda since: 0.0, refresh_s=0)
    try:
        here.add(0.25)
        assert here.spent() == pytest.approx(0.25) and other.spent() == 0.0
        here.settle()
        assert here.spent() == pytest.approx(0.25) and other.spent() == pytest.approx(0.25)
        key = f"router:spend:{budget_day(datetime.now(UTC))}"
        assert float(redis.Redis.from_url(url).get(key) or 0) == pytest.approx(0.25)
        assert 0 < redis.Redis.from_url(url).ttl(key) <= 2 * 86_400
    finally:
        here.close()
        other.close()


def test_the_shared_total_is_read_at_most_every_refresh_and_learnt_at_every_settle(redis_server: RedisServer) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(url).flushdb()
    here = SpendLedger(url, 1.0, from_store=lambda since: 0.0, refresh_s=3600)
    other = SpendLedger(url, 1.0, from_store=lambda since: 0.0, refresh_s=3600)
    third = SpendLedger(url, 1.0, from_store=lambda since: 0.0, refresh_s=3600)
    try:
        assert here.spent() == 0.0 and other.spent() == 0.0  # read once, then held
        third.add(0.25)
        third.settle()
        assert other.spent() == 0.0  # another replica's settled cost: not seen before the refresh
        other.refresh_s = 0
        assert other.spent() == pytest.approx(0.25)  # the refresh reads it
        here.add(0.5)
        assert here.spent() == pytest.approx(0.5)  # its own cost at once, before any settle
        here.settle()  # the settle's answer is the new total, the third replica's cost included
        assert here.spent() == pytest.approx(0.75)
    finally:
        for ledger in (here, other, third):
            ledger.close()


def test_a_cost_that_cannot_be_settled_is_kept_for_the_next_settle(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port(), password="ledger-test")  # not started yet
    ledger = SpendLedger(server.url, 1.0, from_store=lambda since: 0.5, timeout_s=0.2)
    ledger.add(0.1)
    ledger.settle()  # Redis is not there: nothing lost
    assert ledger.spent() == 0.5  # the store's sum stands in while Redis is away
    with server:  # Redis is back, on the same address
        ledger.settle()
        key = f"router:spend:{budget_day(datetime.now(UTC))}"
        assert float(redis.Redis.from_url(server.url).get(key) or 0) == pytest.approx(0.1)
        assert ledger.spent() == pytest.approx(0.1)  # settled: counted once
    ledger.close()
