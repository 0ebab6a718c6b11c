"""The feedback service's app: `create_app()` and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from prometheus_client.core import CounterMetricFamily

from services.feedback import api, handlers
from services.feedback.config import FeedbackSettings, get_settings
from services.feedback.intake import GroupCommitSender, IntakeJournal
from services.feedback.store import Store
from shared.ratelimit import AsyncRateLimiter, RateLimiter
from shared.web import service_app, start_service


class DroppedVotes:
    """Prometheus: votes the worker dropped when it released them from quarantine, by reason (read from the
    store's counts at scrape time: one small table)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "feedback_votes_dropped", "Votes dropped by the worker (never stored), by reason", labels=["reason"]
        )
        store = getattr(self.app.state, "store", None)
        if store is not None:
            for reason, count in handlers.dropped_counts(store.uow()).items():
                family.add_metric([reason], count)
        yield family


def create_app(settings: FeedbackSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = start_service(app, settings, Store)
        journal = IntakeJournal(settings.redis_url, "feedback")
        app.state.sender = GroupCommitSender(app.state.bus.app, journal=journal)
        app.state.known_ids = api.KnownIds()
        app.state.http = httpx.AsyncClient()
        app.state.backlog = api.Backlog(settings.redis_url, "feedback", journal.hash_key)
        app.state.vote_limiter = AsyncRateLimiter.per_client_and_session(
            settings, "votes", settings.votes_per_client, settings.votes_per_session, metrics=app.state.metrics
        )
        app.state.erasure_limiter = RateLimiter.per_client_and_session(
            settings, "erasures", settings.erasures_per_client, settings.erasures_per_session, metrics=app.state.metrics
        )
        yield
        await app.state.backlog.aclose()
        await app.state.http.aclose()
        await app.state.sender.aclose()
        await app.state.vote_limiter.aclose()
        store.dispose()

    app = service_app(settings, lifespan, api.router)
    app.state.session_secrets = settings.session_hash_secrets()  # refuse to start without the secrets
    app.state.metrics.registry.register(DroppedVotes(app))
    return app
