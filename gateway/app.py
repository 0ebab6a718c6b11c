"""The embedded gateway: one origin (one port) for every service's API, in one process.

This is what `make run` serves. Each service keeps its own FastAPI app, store and lifespan; the gateway
only dispatches by path prefix (see `routes.py`) and runs every service's lifespan. It is the one module
that knows all services, and it composes them without any of them knowing each other. In the production
shape (docker-compose) nginx does the same dispatch to separate containers.

Extra paths: `/healthz` (all services: their stores and the broker), `/services/{name}/healthz`,
`/services/{name}/metrics` and `/services/{name}/dead-letters` (admin) (one service's own), `/openapi.json` (one
document for every service's routes, see `openapi.py`) and `/docs` (Swagger UI over it).
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.openapi import merged_openapi
from gateway.routes import service_for
from shared.contracts import SERVICES

#: Paths the gateway answers itself; everything else goes to a service.
OWN_PATHS = ("/healthz", "/openapi.json", "/docs")


def load_service_apps(names: tuple[str, ...] | None = None) -> dict[str, FastAPI]:
    wanted = names or SERVICES
    apps: dict[str, FastAPI] = {}
    for name in wanted:
        module = importlib.import_module(f"services.{name}.main")
        apps[name] = module.create_app()
    return apps


class Gateway:
    def __init__(self, apps: Mapping[str, ASGIApp]) -> None:
        self.apps = apps
        self.own = self._own_app()
        self._openapi: dict[str, Any] | None = None

    def openapi(self) -> dict[str, Any]:
        if self._openapi is None:  # built once: the routes do not change while the process runs
            self._openapi = merged_openapi({k: v for k, v in self.apps.items() if isinstance(v, FastAPI)})
        return self._openapi

    def _own_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            async with AsyncExitStack() as stack:
                for app in self.apps.values():
                    ctx = getattr(getattr(app, "router", None), "lifespan_context", None)
                    if ctx is not None:
                        await stack.enter_async_context(ctx(app))
                yield

        own = FastAPI(title="gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @own.get("/healthz")
        async def healthz() -> Any:
            """Every service's own health, asked side by side (each answers within about a second)."""
            import asyncio

            transport = httpx.ASGITransport(app=self)

            async def ask(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
                try:
                    r = await client.get(f"/services/{name}/healthz")
                    body = r.json()
                    return body if isinstance(body, dict) else {"status": f"http {r.status_code}"}
                except Exception as exc:  # a broken service must not hide the others
                    return {"status": "error", "detail": str(exc)}

            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                answers = await asyncio.gather(*(ask(client, name) for name in self.apps))
            results = dict(zip(self.apps, answers, strict=True))
            ok = all(r.get("status") == "ok" for r in results.values())
            down = sorted(
                f"{name}.{check}" for name, r in results.items() for check, state in (r.get("checks") or {}).items()
                if state != "ok"
            )  # fmt: skip
            return JSONResponse(
                {"status": "ok" if ok else "degraded", "down": down, "services": results},
                status_code=200 if ok else 503,
            )

        @own.get("/openapi.json")
        async def openapi() -> Any:
            return JSONResponse(self.openapi())

        @own.get("/docs")
        async def docs() -> Any:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="Self-learning explanations: API")

        return own

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.own(scope, receive, send)
            return
        path: str = scope.get("path", "/")
        if path in OWN_PATHS:
            await self.own(scope, receive, send)
            return
        if path.startswith("/services/"):
            _, _, rest = path.partition("/services/")
            name, _, sub = rest.partition("/")
            app = self.apps.get(name)
            if app is not None and sub in ("healthz", "metrics", "dead-letters"):
                scope = {**scope, "path": "/" + sub, "raw_path": ("/" + sub).encode()}
                await app(scope, receive, send)
                return
        await self.apps[service_for(path)](scope, receive, send)


def create_app(names: tuple[str, ...] | None = None) -> Gateway:
    return Gateway(load_service_apps(names))
