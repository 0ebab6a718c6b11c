"""The optimizer's app: `create_app()` and its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.optimizer import api, registry
from services.optimizer.config import OptimizerSettings, get_settings
from services.optimizer.generation import make_generator
from services.optimizer.store import Store, outbox
from shared.bus import api_bus
from shared.logging import configure_logging
from shared.outbox import relay
from shared.web import install_common

log = logging.getLogger(__name__)


def create_app(settings: OptimizerSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_admin_token()  # refuse to start without the secret

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging("optimizer", settings.log_level)
        store = Store(settings.db_url)
        app.state.store = store
        app.state.bus = api_bus("optimizer", settings)
        app.state.generator = make_generator(settings)
        registry.ensure_seeded(store.uow(), settings.seed_model())
        relay(store.factory, outbox, app.state.bus)
        yield
        store.dispose()

    app = FastAPI(title="optimizer", lifespan=lifespan)
    app.state.settings = settings
    install_common(app, "optimizer")
    app.include_router(api.router)
    return app
