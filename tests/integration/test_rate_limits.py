"""The vote route's rate limiter (shared/ratelimit.AsyncRateLimiter) against a real redis-server: the checks of
concurrent requests share one round trip, each scope counts, over a limit is a 429 with Retry-After, and a
Redis that does not answer lets requests through and is counted."""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import pytest
from fastapi import HTTPException
from redis.commands.core import AsyncScript

from gateway.redis_server import free_port
from shared.ratelimit import AsyncRateLimiter


class _Counter:
    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], int] = {}

    def labels(self, *labels: str) -> _Counter:
        self._at = labels
        return self

    def inc(self) -> None:
        self.values[self._at] = self.values.get(self._at, 0) + 1


class _Metrics:
    def __init__(self) -> None:
        self.refused = _Counter()
        self.rate_limit_errors = _Counter()


def _limiter(url: str, metrics: _Metrics | None = None, **rules: str) -> AsyncRateLimiter:
    return AsyncRateLimiter(url, "feedback", f"votes-{uuid.uuid4().hex[:8]}", rules, metrics=metrics)


def _outcomes(results: list[BaseException | None]) -> list[int]:
    return [r.status_code if isinstance(r, HTTPException) else 202 for r in results]


def test_concurrent_checks_share_round_trips_and_each_scope_counts(redis_server) -> None:
    metrics = _Metrics()

    limiter_door = ""

    async def run() -> tuple[list[BaseException | None], int]:
        nonlocal limiter_door
        limiter = _limiter(redis_server.url, metrics, client="35/minute", session="3/minute")
        limiter_door = limiter.door
        calls = 0
        script = limiter._script

        async def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return await script(*args, **kwargs)

        limiter._script = cast(AsyncScript, counted)
        try:
            # 40 requests from one client at once: sessions s0..s9, four requests each
            results = await asyncio.gather(
                *(limiter.check(client="1.2.3.4", session=f"s{i % 10}") for i in range(40)), return_exceptions=True
            )
        finally:
            await limiter.aclose()
        return list(results), calls

    results, calls = asyncio.run(run())
    outcomes = _outcomes(results)
    assert calls < 40  # many requests per round trip
    # the fourth request of each session is over the session limit (requests 30-39), and requests 35-39 are
    # also over the client limit: both scopes were counted for every request
    assert outcomes == [202] * 30 + [429] * 10
    per_session = {f"s{i}": [o for j, o in enumerate(outcomes) if j % 10 == i] for i in range(10)}
    assert all(v.count(202) <= 3 for v in per_session.values())
    refused = [r for r in results if isinstance(r, HTTPException)]
    assert all(r.status_code == 429 and r.headers is not None and int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all("retry in" in r.detail["message"] for r in refused)  # type: ignore[index]
    assert metrics.refused.values == {
        ("feedback", limiter_door, "rate_limit_client"): 5,
        ("feedback", limiter_door, "rate_limit_session"): 5,
    }


def test_a_window_resets_and_counts_again(redis_server) -> None:
    import redis

    async def run() -> list[int]:
        limiter = _limiter(redis_server.url, session="2/minute")
        try:
            first = [await _try(limiter.check(session="s")) for _ in range(3)]
            for key in redis.Redis.from_url(redis_server.url).scan_iter(f"ratelimit:feedback:{limiter.door}:*"):
                redis.Redis.from_url(redis_server.url).delete(key)  # the window ends
            return first + [await _try(limiter.check(session="s"))]
        finally:
            await limiter.aclose()

    assert asyncio.run(run()) == [202, 202, 429, 202]


async def _try(check: object) -> int:
    try:
        await check  # type: ignore[misc]
    except HTTPException as exc:
        return exc.status_code
    return 202


def test_redis_not_answering_lets_requests_through_and_counts_it() -> None:
    metrics = _Metrics()

    async def run() -> list[int]:
        limiter = _limiter(f"redis://127.0.0.1:{free_port()}/0", metrics, session="1/minute")
        try:
            return [await _try(limiter.check(session="s")) for _ in range(3)]
        finally:
            await limiter.aclose()

    assert asyncio.run(run()) == [202, 202, 202]
    assert sum(metrics.rate_limit_errors.values.values()) == 3


@pytest.mark.parametrize("who", [{}, {"client": None}, {"session": ""}, {"unknown_scope": "x"}])
def test_no_identity_or_no_rule_counts_nothing(redis_server, who: dict[str, str | None]) -> None:
    async def run() -> int:
        limiter = _limiter(redis_server.url, client="1/minute")
        try:
            return max([await _try(limiter.check(**who)) for _ in range(3)])
        finally:
            await limiter.aclose()

    assert asyncio.run(run()) == 202
