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
from shared.bus import api_bus
from shared.logging import configure_logging
from shared.outbox import BatchedRelay
from shared.ratelimit import RateLimiter
from shared.web import install_common


def create_app(settings: RouterSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_admin_token()  # refuse to start without the secrets
    settings.require_session_hash_key()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging("router", settings.log_level)
        store = Store(settings.db_url)
        handlers.ensure_seeded(store.uow(), settings.resolved_default_model())
        app.state.store = store
        app.state.routing = RoutingCache(store)
        app.state.providers = ProviderSet(settings)
        app.state.limiter = RateLimiter(
            settings.redis_url,
            "router",
            "explanations",
            {"client": settings.explanations_per_client, "session": settings.explanations_per_session},
            enabled=settings.rate_limits_enabled,
            metrics=metrics,
        )
        app.state.budget = SpendLedger(
            settings.redis_url,
            settings.daily_budget_usd,
            from_store=lambda since: handlers.cost_since(store.uow(), since),
        )
        app.state.bus = api_bus("router", settings)
        app.state.relay = BatchedRelay(store.factory, outbox, after_batch=lambda _: app.state.budget.settle())
        yield
        app.state.relay.close()  # what is queued is published (or left in the outbox) before the store closes
        app.state.providers.close()
        app.state.limiter.close()
        app.state.budget.close()
        store.dispose()

    app = FastAPI(title="router", lifespan=lifespan)
    app.state.settings = settings
    metrics = install_common(app, "router")
    app.state.router_metrics = api.RouterMetrics.register(metrics)
    app.include_router(api.router)
    return app
