"""The finetune service's app: `create_app()` and its lifespan. The OpenAI-compatible endpoint that serves
registered models is mounted at /api/finetune/v1 (see serving_mount.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.finetune import api
from services.finetune.config import FinetuneSettings, get_settings
from services.finetune.serving_mount import PREFIX, ServingMount
from services.finetune.store import Store
from shared.bus import CeleryBus, declare_topology, make_celery
from shared.logging import configure_logging
from shared.web import install_common


def create_app(settings: FinetuneSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_admin_token()  # refuse to start without the secrets

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging("finetune", settings.log_level)
        app.state.store = Store(settings.db_url)
        celery = make_celery("finetune", settings)
        declare_topology(celery)
        app.state.bus = CeleryBus(celery)
        yield
        app.state.store.dispose()

    app = FastAPI(title="finetune", lifespan=lifespan)
    app.state.settings = settings

    def health() -> dict[str, Any]:
        return {"serving_base_url": settings.public_serving_url}

    install_common(app, "finetune", health=health)
    app.include_router(api.router)
    app.mount(PREFIX, ServingMount(lambda: app.state.store, settings))
    return app
