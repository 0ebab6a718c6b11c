"""The baseline: a bare FastAPI endpoint that does nothing, served the same way as the services."""

from __future__ import annotations

from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/bare/{item_id}", status_code=202)
    async def bare(item_id: str) -> dict:
        return {"received": True}

    return app
