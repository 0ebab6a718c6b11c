"""The daily provider budget's ledger: today's spend, shared by every router replica through Redis.

One key per UTC day (`router:spend:<day>`, INCRBYFLOAT, expires after two days). A request's cost counts at
once in its own process (the next request there sees it) and reaches the shared key after the response, with
its event's batch (`SpendLedger.settle`, called by the relay thread), not on the request path. Requests
running at the same moment may each pass the check before the others add their cost, and another replica
sees a cost only once it is settled, so a budget can be overshot by the cost of the requests in flight (a
few cents at most), never by more; a process killed before settling leaves those costs out of the ledger
(they are in the explanations' rows). The shared total is read at most every `refresh_s` (1 s) by a request,
and learnt at every settle (INCRBYFLOAT answers the new total, every replica's costs included), so a request
makes no round trip for it; another replica's costs reach this one's check within `refresh_s`, which adds
that second's spend of the other replicas to the possible overshoot. When Redis does not answer within
`timeout_s`, the spend is summed from the router's own store instead (slower, same figure)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from services.router import domain
from shared.clock import utcnow

log = logging.getLogger(__name__)

KEY_TTL_S = 2 * 86_400


class SpendLedger:
    """`add` counts a cost at once in this process (its own `spent` includes it) without a round trip; `settle`
    (the relay thread, after each batch) moves what was added to the shared key, keeping it if Redis is away."""

    def __init__(
        self,
        redis_url: str,
        limit_usd: float | None,
        *,
        from_store: Callable[[datetime], float],
        timeout_s: float = 0.5,
        refresh_s: float = 1.0,
    ) -> None:
        import redis

        self.limit_usd = limit_usd
        self.from_store = from_store
        self.refresh_s = refresh_s
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._lock = threading.Lock()
        self._unsettled = 0.0
        self._shared: tuple[str, float, float] | None = None  # (key, shared total, monotonic time it was learnt)

    @staticmethod
    def _key(now: datetime) -> str:
        return f"router:spend:{domain.budget_day(now)}"

    def _learnt(self, key: str, total: float) -> float:
        """Remember the shared total; returns this process's unsettled costs as of the same moment."""
        with self._lock:
            self._shared = (key, total, time.monotonic())
            return self._unsettled

    def spent(self, now: datetime | None = None) -> float:
        now = now or utcnow()
        key = self._key(now)
        with self._lock:  # the shared total and this process's unsettled costs as of one moment
            known, unsettled = self._shared, self._unsettled
        if known is not None and known[0] == key and time.monotonic() - known[2] < self.refresh_s:
            return known[1] + unsettled
        try:
            raw = self._redis.get(key)
            total = float(raw) if raw is not None else 0.0
            # Until settled, this process's own costs are counted here (once settled, possibly for a moment
            # twice: the budget is then refused early, never late).
            return total + self._learnt(key, total)
        except Exception as exc:  # Redis away: the store has the same figure, summed
            log.warning("spend ledger unavailable (%s); summing today's cost from the store", type(exc).__name__)
            day_start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            return self.from_store(day_start)

    def add(self, cost_usd: float) -> None:
        if cost_usd > 0:
            with self._lock:
                self._unsettled += cost_usd

    def settle(self, now: datetime | None = None) -> None:
        """Add what this process spent since the last call to the shared ledger (every replica sees it then)."""
        with self._lock:
            amount = self._unsettled
        if amount <= 0:
            return
        key = self._key(now or utcnow())
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.incrbyfloat(key, amount)
            pipe.expire(key, KEY_TTL_S)
            total, _ = pipe.execute()
        except Exception as exc:  # kept for the next settle; the explanation rows hold the costs in any case
            log.warning("could not add %.6f USD to the spend ledger (%s)", amount, type(exc).__name__)
            return
        with self._lock:
            self._unsettled -= amount
            self._shared = (key, float(total), time.monotonic())

    def close(self) -> None:
        self.settle()
        self._redis.close()
