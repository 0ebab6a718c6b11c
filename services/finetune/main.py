"""The finetune service's app: `create_app()` and its lifespan. The OpenAI-compatible endpoint that serves
registered models is mounted at /api/finetune/v1 (see serving_mount.py). With an external serving engine
(FINETUNE_SERVING_BASE_URL, e.g. vLLM), the lifespan keeps it serving every registered adapter: at start and every
FINETUNE_SERVING_SYNC_INTERVAL_S, so an engine that restarted (and forgot its runtime adapters) gets them back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.finetune import api, jobs
from services.finetune.config import FinetuneSettings, get_settings
from services.finetune.serving_mount import PREFIX, ServingMount
from services.finetune.store import Store
from shared.web import service_app, start_service

log = logging.getLogger(__name__)


async def keep_engine_in_sync(store: Store, settings: FinetuneSettings) -> None:
    """Load registered adapters into the serving engine now and after every interval (errors are logged: the
    engine may be starting or restarting; the next round tries again)."""
    failing = False
    while True:
        try:
            result = await asyncio.to_thread(jobs.sync_serving, store, settings)
            if failing:
                log.info("serving engine %s is back", settings.serving_base_url)
            failing = bool(result.get("failed"))
        except Exception as exc:
            if not failing:
                log.warning("serving engine %s not reachable: %s", settings.serving_base_url, exc)
            failing = True
        await asyncio.sleep(settings.serving_sync_interval_s)


def create_app(settings: FinetuneSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = start_service(app, settings, Store)
        sync = None
        if settings.serving_base_url:
            sync = asyncio.create_task(keep_engine_in_sync(store, settings))
        yield
        if sync is not None:
            sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sync
        store.dispose()

    def health() -> dict[str, Any]:
        return {"serving_base_url": settings.public_serving_url}

    app = service_app(settings, lifespan, api.router, health=health)
    app.mount(PREFIX, ServingMount(lambda: app.state.store, settings))
    return app
