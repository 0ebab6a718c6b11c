"""Rate limits on the public write routes, per client (IP) and per session, shared by every replica of a
service through Redis, in fixed windows (a window starts at its first hit; limits are parsed by the `limits`
library): one script call counts every scope of a request (sync routes) or of a group of requests (async).

A door is one route's limits: e.g. "votes" with {"client": "1200/minute", "session": "120/minute"}. Over a
limit the route answers 429 JSON with `Retry-After` (seconds until the window resets). Limits are written as
the `limits` library reads them ("600/minute", "10/hour"); an empty string means no limit for that scope.

When Redis does not answer within `timeout_s`, a check lets the request through (fail open: the explanation
route must keep answering while the broker is away; the daily budget still protects money, and the vote
route cannot queue anything without Redis anyway) and counts it in `http_refused_total`'s neighbour
`rate_limit_errors_total`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Self

from fastapi import HTTPException
from limits import RateLimitItem, parse

from shared.settings import ServiceSettings

log = logging.getLogger(__name__)

#: The Redis keys of the counters start with this. A session's counter names its key until the window ends (an
#: erasure leaves it to expire): the erasure checks read such keys apart.
COUNTER_PREFIX = "ratelimit:"


def check_rate(value: str) -> str:
    """A settings validator: "" (no limit) or a rate the `limits` library can parse."""
    if value.strip():
        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a rate limit such as '600/minute' or '10/hour': {exc}") from None
    return value.strip()


def _rules(limits_by_scope: Mapping[str, str], enabled: bool) -> dict[str, RateLimitItem]:
    if not enabled:
        return {}
    return {scope: parse(rate) for scope, rate in limits_by_scope.items() if rate and rate.strip()}


def _describe(item: RateLimitItem) -> str:
    per = f"{item.multiples} {item.GRANULARITY.name}s" if item.multiples > 1 else item.GRANULARITY.name
    return f"{item.amount} per {per}"


class _Door:
    """One route's limits on one Redis; the subclasses count with one script call per request (sync) or per
    group of requests (async)."""

    def __init__(
        self,
        redis_url: str,
        service: str,
        door: str,
        limits_by_scope: Mapping[str, str],
        *,
        enabled: bool = True,
        metrics: Any = None,
        timeout_s: float = 0.3,
    ) -> None:
        self.service = service
        self.door = door
        self.rules = _rules(limits_by_scope, enabled)
        self.metrics = metrics
        self._connect(redis_url, timeout_s)

    @classmethod
    def per_client_and_session(
        cls, settings: ServiceSettings, door: str, client: str, session: str, *, metrics: Any
    ) -> Self:
        """A door of the service `settings` are of, limited per client and per session (`client`, `session`:
        limits such as "10/minute"), counted on the service's Redis, off where the settings turn limits off."""
        return cls(
            settings.redis_url,
            settings.service,
            door,
            {"client": client, "session": session},
            enabled=settings.rate_limits_enabled,
            metrics=metrics,
        )

    def _connect(self, redis_url: str, timeout_s: float) -> None:
        raise NotImplementedError

    def _too_many(self, scope: str, item: RateLimitItem, reset_at: float) -> HTTPException:
        retry_after = max(1, math.ceil(reset_at - time.time()))
        if self.metrics is not None:
            self.metrics.refused.labels(self.service, self.door, f"rate_limit_{scope}").inc()
        return HTTPException(
            429,
            {
                "message": f"too many {self.door} from this {scope}: at most {_describe(item)}; retry in {retry_after} s",
                "retry_after_s": retry_after,
            },
            headers={"Retry-After": str(retry_after)},
        )

    def _key(self, scope: str, item: RateLimitItem, identity: str) -> str:
        return f"{COUNTER_PREFIX}{self.service}:{self.door}:{scope}:{item.amount}/{item.get_expiry()}:{identity}"

    def _wanted(self, who: Mapping[str, str | None]) -> list[tuple[str, RateLimitItem, str]]:
        """(scope, its limit, its counter's key) for each scope of `who` that has a limit and an identity."""
        return [
            (scope, item, self._key(scope, item, identity))
            for scope, identity in who.items()
            if identity and (item := self.rules.get(scope)) is not None
        ]

    def _refuse_over(self, wanted: list[tuple[str, RateLimitItem, str]], counts: list[tuple[int, int]]) -> None:
        """429 for the first scope whose count (after this hit) is over its limit."""
        for (scope, item, _), (count, ttl) in zip(wanted, counts, strict=True):
            if count > item.amount:
                raise self._too_many(scope, item, time.time() + max(ttl, 0))

    def _storage_failed(self, exc: Exception) -> None:
        log.warning("rate limit check for %s failed (%s); letting the request through", self.door, type(exc).__name__)
        if self.metrics is not None:
            self.metrics.rate_limit_errors.labels(self.service, self.door).inc()


def _pairs(answer: bytes | str) -> list[tuple[int, int]]:
    """The script's answer as (count, seconds to reset) per key."""
    numbers = [int(n) for n in answer.split()]
    return list(zip(numbers[0::2], numbers[1::2], strict=True))


# One fixed-window hit per key: KEYS = the counters, ARGV = each counter's window in seconds. Returns, per
# key, the count after this hit and the seconds until its window resets, as one string of numbers separated
# by spaces: a reply of one string costs the client one read where a list costs one per element (the
# pure-Python reply parser made a list of four numbers per vote the largest cost of a rate-limit check).
_HIT_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  local ttl = redis.call('TTL', key)
  if n == 1 or ttl < 0 then
    redis.call('EXPIRE', key, ARGV[i])
    ttl = tonumber(ARGV[i])
  end
  out[#out + 1] = n
  out[#out + 1] = ttl
end
return table.concat(out, ' ')
"""


class RateLimiter(_Door):
    """For sync routes (they run in the threadpool): a request's scopes are counted in one round trip, one call
    of the same script (every scope counted, also when another refuses the request)."""

    def _connect(self, redis_url: str, timeout_s: float) -> None:
        import redis

        self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_HIT_LUA)

    def check(self, **who: str | None) -> None:
        """Count one request against each scope's limit (`client="1.2.3.4", session="<key>"`); 429 if over."""
        wanted = self._wanted(who)
        if not wanted:
            return
        try:
            answer = self._script(keys=[k for _, _, k in wanted], args=[i.get_expiry() for _, i, _ in wanted])
        except Exception as exc:
            self._storage_failed(exc)
            return
        self._refuse_over(wanted, _pairs(answer))

    def close(self) -> None:
        self._redis.close()


_Counts = list[tuple[int, int]] | None  # per scope: (count, seconds to reset); None when Redis failed


class AsyncRateLimiter(_Door):
    """For async routes (the vote route), with group commit: the checks of every request that arrives while
    one round trip is in flight go to Redis together in the next one, a single script call that counts each
    request against each of its scopes (the same script and fixed windows as `RateLimiter`). Under load that is one round trip for many requests instead of one per
    scope per request, and CPU is what limits the vote route. Every scope of a request is counted, also when
    another of its scopes refuses it."""

    def _connect(self, redis_url: str, timeout_s: float) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_HIT_LUA)
        self._pending: list[tuple[list[tuple[str, RateLimitItem, str]], asyncio.Future[_Counts]]] = []
        self._flushing = False

    async def check(self, **who: str | None) -> None:
        """Count one request against each scope's limit (`client=..., session=...`); 429 if over any."""
        wanted = self._wanted(who)
        if not wanted:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Counts] = loop.create_future()
        self._pending.append((wanted, future))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(lambda: asyncio.ensure_future(self._flush()))
        counts = await future
        if counts is not None:  # None: Redis did not answer; fail open (counted in rate_limit_errors_total)
            self._refuse_over(wanted, counts)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                keys = [key for wanted, _ in batch for _, _, key in wanted]
                windows = [item.get_expiry() for wanted, _ in batch for _, item, _ in wanted]
                pairs: list[tuple[int, int]] | None
                try:
                    pairs = _pairs(await self._script(keys=keys, args=windows))
                except Exception as exc:
                    self._storage_failed(exc)
                    pairs = None
                at = 0
                for wanted, future in batch:
                    counts = None if pairs is None else pairs[at : at + len(wanted)]
                    at += len(wanted)
                    if not future.done():  # a request whose client went away
                        future.set_result(counts)
        finally:
            self._flushing = False

    async def aclose(self) -> None:
        await self._redis.aclose()
