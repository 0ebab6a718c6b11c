"""The daily provider budget's ledger: today's spend, shared by every router replica through Redis.

One key per UTC day (`router:spend:<day>`, INCRBYFLOAT, expires after two days). A request's cost is added
after its response, with its event's batch (`shared.outbox.BatchedRelay`), not on the request path. Requests
running at the same moment may each pass the check before the others add their cost, so a budget can be
overshot by the cost of the requests in flight or in the relay's batch when it runs out (a few cents at most),
never by more; a process killed before its batch left leaves those costs out of the ledger (they are in the
explanations' rows). When Redis does not answer within `timeout_s`, the spend is summed from the router's own
store instead (slower, same figure)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from services.router import domain
from shared.clock import utcnow
from shared.contracts import Event, ExplanationCreated

log = logging.getLogger(__name__)

KEY_TTL_S = 2 * 86_400


class SpendLedger:
    def __init__(
        self,
        redis_url: str,
        limit_usd: float | None,
        *,
        from_store: Callable[[datetime], float],
        timeout_s: float = 0.5,
    ) -> None:
        import redis

        self.limit_usd = limit_usd
        self.from_store = from_store
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    @staticmethod
    def _key(now: datetime) -> str:
        return f"router:spend:{domain.budget_day(now)}"

    def spent(self, now: datetime | None = None) -> float:
        now = now or utcnow()
        try:
            raw = self._redis.get(self._key(now))
            return float(raw) if raw is not None else 0.0
        except Exception as exc:  # Redis away: the store has the same figure, summed
            log.warning("spend ledger unavailable (%s); summing today's cost from the store", type(exc).__name__)
            day_start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            return self.from_store(day_start)

    def add(self, cost_usd: float, now: datetime | None = None) -> None:
        if cost_usd <= 0:
            return
        key = self._key(now or utcnow())
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.incrbyfloat(key, cost_usd)
            pipe.expire(key, KEY_TTL_S)
            pipe.execute()
        except Exception as exc:  # the explanation row holds the cost: the store fallback still sees it
            log.warning("could not add %.6f USD to the spend ledger (%s)", cost_usd, type(exc).__name__)

    def add_costs(self, events: Sequence[Event]) -> None:
        """Add what the explanations of a batch of events cost (the relay calls it after publishing them)."""
        self.add(sum(e.cost_usd for e in events if isinstance(e, ExplanationCreated)))

    def close(self) -> None:
        self._redis.close()
