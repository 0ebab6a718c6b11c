"""The feedback service's app: `create_app()` and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from services.feedback import api
from services.feedback.config import FeedbackSettings, get_settings
from services.feedback.store import Store
from shared.bus import CeleryBus, GroupCommitSender, IntakeJournal, declare_topology, make_celery
from shared.logging import configure_logging
from shared.web import install_common


def create_app(settings: FeedbackSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_admin_token()  # refuse to start without the secrets

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging("feedback", settings.log_level)
        app.state.store = Store(settings.db_url)
        celery = make_celery("feedback", settings)
        declare_topology(celery)
        app.state.bus = CeleryBus(celery)
        app.state.sender = GroupCommitSender(celery, journal=IntakeJournal(settings.redis_url, "feedback"))
        app.state.known_ids = api.KnownIds()
        app.state.http = httpx.AsyncClient()
        yield
        await app.state.http.aclose()
        await app.state.sender.aclose()
        app.state.store.dispose()

    app = FastAPI(title="feedback", lifespan=lifespan)
    app.state.settings = settings
    app.state.session_secret = settings.require_session_hash_key()
    install_common(app, "feedback")
    app.include_router(api.router)
    return app
