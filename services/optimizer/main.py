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
from shared.outbox import relay
from shared.web import service_app, start_service

log = logging.getLogger(__name__)


def create_app(settings: OptimizerSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = start_service(app, settings, Store)
        app.state.generator = make_generator(settings)
        registry.ensure_seeded(store.uow(), settings.seed_model())
        relay(store.factory, outbox, app.state.bus)
        yield
        store.dispose()

    return service_app(settings, lifespan, api.router)
