"""The router service's app: `create_app()` and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.router import api, handlers
from services.router.budget import SpendLedger
from services.router.config import RouterSettings, get_settings
from services.router.providers import ProviderSet
from services.router.store import RoutingCache, Store, outbox
from shared.outbox import BatchedRelay
from shared.ratelimit import RateLimiter
from shared.web import service_app, start_service


def create_app(settings: RouterSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = start_service(app, settings, Store)
        handlers.ensure_seeded(store.uow(), settings.resolved_default_model())
        app.state.routing = RoutingCache(store)
        app.state.providers = ProviderSet(settings)
        app.state.limiter = RateLimiter.per_client_and_session(
            settings,
            "explanations",
            settings.explanations_per_client,
            settings.explanations_per_session,
            metrics=app.state.metrics,
        )
        app.state.budget = SpendLedger(
            settings.redis_url,
            settings.daily_budget_usd,
            from_store=lambda since: handlers.cost_since(store.uow(), since),
        )
        app.state.relay = BatchedRelay(store.factory, outbox, after_batch=lambda _: app.state.budget.settle())
        yield
        app.state.relay.close()  # what is queued is published (or left in the outbox) before the store closes
        app.state.providers.close()
        app.state.limiter.close()
        app.state.budget.close()
        store.dispose()

    app = service_app(settings, lifespan, api.router)
    settings.require_session_hash_key()  # refuse to start without the secret that keys sessions
    app.state.router_metrics = api.RouterMetrics.register(app.state.metrics)
    return app
