"""The HTTP surface every service shares: JSON errors with the right status, `/healthz`, `/metrics`,
a body-size limit, the browser doors (JSON bodies only, allowed origins), the admin bearer-token dependency, and
the app every service's `create_app()` builds (`service_app`) and starts (`start_service`)."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.db import SqlStore
from shared.settings import ServiceSettings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024

StoreT = TypeVar("StoreT", bound=SqlStore[Any])


def from_state(name: str) -> Any:
    """A FastAPI dependency on what the app's lifespan put in `app.state.<name>` (its store, bus, settings),
    for a readable alias: `StoreDep = Annotated[Store, from_state("store")]`."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    dependency.__name__ = f"get_{name}"
    return Depends(dependency)


class DirectRoute(APIRoute):
    """A route for a hot path: declared and documented (OpenAPI) like any other, but its endpoint is an async
    function called with the `Request` alone that returns its own `Response`. FastAPI's per-request machinery
    (dependency solving, query, header and cookie parsing, response serialisation) is skipped; the endpoint
    reads its path parameters (`path_uuid`) and body itself, and what it raises is answered by the app's
    exception handlers (the same 4xx JSON). Its path parameters are declared in `openapi_extra`, as the
    signature does not name them. Use: `router.add_api_route(path, endpoint, route_class_override=DirectRoute,
    ...)`. In an app made by `service_app`, `DirectLane` serves it before the router is reached."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            response: Response = await endpoint(request)
            return response

        return handler

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request this route matched (its path parameters in `scope`): the endpoint's response, or
        the answer of the app's handler for what it raised (re-raised where the app has none: a 500)."""
        request = Request(scope, receive, send)
        try:
            response: Response = await self.endpoint(request)
        except Exception as exc:
            handler = _exception_handler(scope["app"], exc)
            if handler is None:
                raise
            if is_async_callable(handler):
                response = await handler(request, exc)
            else:  # as Starlette runs a plain `def` handler
                response = await run_in_threadpool(handler, request, exc)
        await response(scope, receive, send)


def _exception_handler(app: Any, exc: Exception) -> Any:
    """The handler Starlette's exception middleware would pick for `exc`: by status code for an HTTP
    exception, then by the nearest class."""
    handlers = app.exception_handlers
    if isinstance(exc, StarletteHTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


class DirectLane:
    """The innermost middleware of a service app: a request that a `DirectRoute` of the app matches (method and
    path) is served by that route here, and never reaches Starlette's exception middleware, FastAPI's exit
    stacks, the scan of the route table or the included router's own matching (on the feedback intake, as much
    work as the endpoint). Every other request goes on to the router. The doors and the request metrics are
    outer middlewares, so they see every request either way; `check_direct_routes` makes sure no other route
    of the app could have answered a request the lane takes."""

    def __init__(self, app: ASGIApp, routes: list[DirectRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    await route.serve(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def check_direct_routes(direct: list[DirectRoute], routes: list[Any]) -> None:
    """Raises if another of the app's `routes` shares a method with a direct route on a path both could match
    (the lane would take the request first, where the router might have chosen the other): such an app is
    refused when it is built, not found out by a client."""
    for d in direct:
        for other in routes:
            if other is d or not isinstance(other, APIRoute) or not (d.methods or set()) & (other.methods or set()):
                continue
            if d.path_regex.match(other.path_format) or other.path_regex.match(d.path_format):
                raise ValueError(f"direct route {sorted(d.methods or ())} {d.path} overlaps {other.path}")


#: What a direct route may answer whatever it does: it reads a JSON body (`BrowserDoors`, `declared_body`).
JSON_BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    415: {"description": "the body is not JSON"},
    422: {"description": "the request is not valid"},
}


def add_direct_route(
    router: APIRouter,
    path: str,
    endpoint: Callable[[Request], Coroutine[Any, Any, Response]],
    *,
    body: type[BaseModel],
    status_code: int,
    responses: dict[int | str, dict[str, Any]],
    uuid_path_parameters: tuple[str, ...] = (),
) -> None:
    """Declare `POST path` as a `DirectRoute`, documented as a declared route would be: its JSON `body` model,
    its UUID path parameters, and `responses` (the success status's model among them) besides the
    `JSON_BODY_RESPONSES`."""
    extra: dict[str, Any] = {
        "requestBody": {"required": True, "content": {"application/json": {"schema": body.model_json_schema()}}}
    }
    if uuid_path_parameters:
        extra = {"parameters": [uuid_path_parameter(name) for name in uuid_path_parameters], **extra}
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        route_class_override=DirectRoute,
        status_code=status_code,
        response_model=None,
        responses=JSON_BODY_RESPONSES | responses,
        openapi_extra=extra,
    )


BodyT = TypeVar("BodyT", bound=BaseModel)


async def declared_body(request: Request, model: type[BodyT]) -> BodyT:
    """The request's JSON body as `model`, validated as FastAPI validates a declared body parameter (the JSON
    parsed first, then the model in Python mode), with the same 422s: a missing body, JSON that does not parse,
    a field that does not validate."""
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        data = json.loads(raw)
    except ValueError as exc:
        error = {"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**error, "ctx": {"error": str(exc)}}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


_UUID = TypeAdapter(uuid.UUID)


def path_uuid(request: Request, name: str) -> uuid.UUID:
    """The path parameter `name` as a UUID; a malformed one is the 422 FastAPI gives (`path.<name>`)."""
    try:
        return _UUID.validate_python(request.path_params[name])
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("path", name)} for error in exc.errors(include_url=False)]
        ) from None


def uuid_path_parameter(name: str) -> dict[str, Any]:
    """The OpenAPI declaration of a UUID path parameter, as FastAPI writes it for `name: uuid.UUID`."""
    title = name.replace("_", " ").title()
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid", "title": title},
    }


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, **extra}}


def _describe_validation(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            field, msg = "body", "the request body is not valid JSON"
        problems.append({"field": field, "message": msg, "type": err.get("type")})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid request"
    return summary, problems


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        summary, problems = _describe_validation(exc)
        return JSONResponse(status_code=422, content=error_body(422, summary, problems=problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        extra: dict[str, Any] = exc.detail if isinstance(exc.detail, dict) else {}
        if "message" in extra:
            detail = str(extra.pop("message"))
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(exc.status_code, detail, **extra),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The route's template, not the path: a path can carry a raw session id (DELETE .../sessions/{id}).
        route = getattr(request.scope.get("route"), "path", "unmatched route")
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, route, exc_info=exc)
        return JSONResponse(status_code=500, content=error_body(500, "internal error; it has been logged"))


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before reading them into memory."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers") or () if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send_json(send, 413, error_body(413, f"request body is larger than {self.limit} bytes"))
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await send_json(send, 413, error_body(413, f"request body is larger than {self.limit} bytes"))


class _TooLarge(Exception):
    pass


async def send_json(send: Send, status: int, body: dict) -> None:
    """Answer a request from ASGI middleware or a mounted ASGI app: `body` as JSON with `status`."""
    import json

    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class Metrics:
    """Per-service Prometheus registry with request counters and latency histograms."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total", "HTTP requests", ["service", "method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            ["service", "method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

        # Requests turned away at a door (wrong origin, not JSON, over a rate limit, backlog, wrong session ...).
        self.refused = Counter(
            "http_refused_total", "Requests refused at a door", ["service", "door", "reason"], registry=self.registry
        )
        self.rate_limit_errors = Counter(
            "rate_limit_errors_total",
            "Rate-limit checks that could not reach Redis (the request was let through)",
            ["service", "door"],
            registry=self.registry,
        )

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Histogram:
        return Histogram(name, doc, list(labels), registry=self.registry, **kw)


HEALTH_TIMEOUT_S = 1.0


def check_store(store: Any) -> str:
    """ "ok" when the store's database answers a read; else what failed. SQLite: a new connection to the file
    (read-write, never creating it), so a file that was removed or broken is seen even while pooled
    connections still hold the old one open."""
    engine = getattr(store, "engine", None)
    if engine is None:
        return "not open"
    try:
        url = engine.url
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            import sqlite3

            conn = sqlite3.connect(f"file:{url.database}?mode=rw", uri=True, timeout=HEALTH_TIMEOUT_S)
            try:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    return "down: the database file has no tables"
            finally:
                conn.close()
        else:
            from sqlalchemy import text

            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:
        return f"down: {type(exc).__name__}: {str(exc)[:200]}"


def check_broker(bus: Any) -> str:
    if bus is None or not hasattr(bus, "ping"):
        return "not open"
    try:
        return "ok" if bus.ping() else "down: no PONG"
    except Exception as exc:
        return f"down: {type(exc).__name__}: {str(exc)[:200]}"


def dependency_checks(app: Any) -> dict[str, str]:
    """The store and the broker of a service app, checked side by side (a frozen broker and a broken store
    together still answer within about a second)."""
    from concurrent.futures import ThreadPoolExecutor

    state = app.state
    with ThreadPoolExecutor(max_workers=2) as pool:
        store = pool.submit(check_store, getattr(state, "store", None))
        broker = pool.submit(check_broker, getattr(state, "bus", None))
        return {"store": store.result(), "broker": broker.result()}


class _StoreCollector:
    """A Prometheus collector over what the app's store holds, read at each scrape; `describe` is empty, so
    registering it reads nothing."""

    def __init__(self, app: Any, service: str) -> None:
        self.app = app
        self.service = service

    def describe(self) -> list[Any]:
        return []


class _DeadLetterGauge(_StoreCollector):
    """`dead_letters_waiting{service, reason}`: messages waiting in this service's dead-letter store."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        store = getattr(self.app.state, "store", None)
        dead = getattr(store, "dead_letters", None)
        if dead is None:
            return
        try:
            counts = dead.counts()
        except Exception:
            log.warning("could not count dead letters for /metrics")
            return
        g = GaugeMetricFamily(
            "dead_letters_waiting", "Messages waiting in the dead-letter store", labels=["service", "reason"]
        )
        for reason, n in counts.items():
            g.add_metric([self.service, reason], float(n))
        yield g


class _CheckpointCounter(_StoreCollector):
    """`sqlite_wal_checkpoints_total{service, outcome}`: the background WAL checkpoints of this process's store
    (`shared.db.BackgroundCheckpoints`): made, kept busy by another process's, failed (each failure is logged;
    while they fail, commits checkpoint past the WAL bound themselves)."""

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        checkpoints = getattr(getattr(self.app.state, "store", None), "checkpoints", None)
        if checkpoints is None:
            return
        c = CounterMetricFamily(
            "sqlite_wal_checkpoints",
            "Background WAL checkpoints of this process's store",
            labels=["service", "outcome"],
        )
        c.add_metric([self.service, "done"], float(checkpoints.runs - checkpoints.busy))
        c.add_metric([self.service, "busy"], float(checkpoints.busy))
        c.add_metric([self.service, "failed"], float(checkpoints.failures))
        yield c


class _Observe:
    """Request count and latency per route (pure ASGI: no per-request task or body copy)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            key = (scope["method"], route, status[0])
            children = self._children.get(key)
            if children is None:  # label lookups are slow; keep the labelled children per route
                m = self.metrics
                children = (
                    m.requests.labels(m.service, scope["method"], route, str(status[0])),
                    m.latency.labels(m.service, scope["method"], route),
                )
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - start)


_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _same_origin(origin: str, host: str) -> bool:
    """The page's own origin: what the browser connected to (the Host header) is the origin's host[:port]."""
    _, sep, rest = origin.partition("://")
    return bool(sep) and bool(host) and rest.lower() == host.lower()


class BrowserDoors:
    """Two doors on every state-changing request, before any route runs:

    - **Origin**: a browser names the page that makes a cross-site request in `Origin`; a POST, PUT, PATCH or
      DELETE from a page of another origin is refused (403) unless that origin is in ALLOWED_ORIGINS. The
      page's own origin is always allowed; requests without `Origin` (curl, servers, SDKs) are not browsers'
      cross-site requests and pass.
    - **Content type**: a body must be JSON (`application/json` or `application/*+json`), else 415. This shuts
      the "simple request" forms (text/plain, form posts) that any web page can make a visitor's browser send
      without a CORS preflight. A request with no body (e.g. a DELETE, a bodiless admin POST) passes.

    Settings are read from the app (`app.state.settings.allowed_origin_list()`) on each request."""

    def __init__(self, app: ASGIApp, service: str, metrics: Metrics) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k: v for k, v in scope.get("headers") or ()}
        origin = headers.get(b"origin", b"").decode("latin-1").strip().rstrip("/")
        if origin and not _same_origin(origin, headers.get(b"host", b"").decode("latin-1")):
            settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
            allowed = settings.allowed_origin_list() if settings is not None else []
            if origin not in allowed and "*" not in allowed:
                self.metrics.refused.labels(self.service, "origin", "origin_not_allowed").inc()
                await send_json(
                    send,
                    403,
                    error_body(
                        403, f"requests from origin {origin[:100]} are not allowed (ALLOWED_ORIGINS lists the others)"
                    ),
                )
                return
        if scope["method"] in _BODY_METHODS:
            content_type = headers.get(b"content-type")
            length = headers.get(b"content-length")
            has_body = b"transfer-encoding" in headers or (length is not None and length.strip() not in (b"", b"0"))
            if (content_type is not None or has_body) and not _is_json((content_type or b"").decode("latin-1")):
                self.metrics.refused.labels(self.service, "content_type", "not_json").inc()
                shown = (content_type or b"none").decode("latin-1")[:60]
                await send_json(
                    send,
                    415,
                    error_body(415, f"the request body must be JSON (Content-Type: application/json), not {shown}"),
                )
                return
        await self.app(scope, receive, send)


def install_common(
    app: FastAPI,
    service: str,
    *,
    health: Callable[[], dict[str, Any]] | None = None,
    body_limit: int = MAX_BODY_BYTES,
) -> Metrics:
    """Error handlers, `/healthz`, `/metrics` and request metrics for one service app."""
    install_error_handlers(app)
    metrics = Metrics(service)
    app.state.metrics = metrics

    app.add_middleware(BrowserDoors, service=service, metrics=metrics)
    settings = getattr(app.state, "settings", None)
    origins = settings.allowed_origin_list() if settings is not None else []
    if origins:  # cross-origin frontends need CORS answers (preflight) as well as being let through
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Content-Type", "Authorization"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    app.add_middleware(_Observe, metrics=metrics)
    app.add_middleware(BodyLimit, limit=body_limit)

    @app.get("/healthz", tags=["operations"])
    def healthz(request: Request) -> Response:
        """200 when this service's store and the broker answer; 503 naming what is down, within about a second
        (each check has its own short timeout)."""
        checks = dependency_checks(request.app)
        detail = health() if health else {}
        down = {name: state for name, state in checks.items() if state != "ok"}
        body = {"status": "down" if down else "ok", "service": service, "checks": checks, **detail}
        if down:
            log.warning("health: %s down (%s)", service, ", ".join(f"{k}: {v}" for k, v in down.items()))
        return JSONResponse(body, status_code=503 if down else 200)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/dead-letters", tags=["operations"])
    def dead_letters(
        request: Request, _: AdminDep, limit: int = Query(100, ge=1, le=1000), include_replayed: bool = False
    ) -> dict[str, Any]:
        """Admin: the messages this service could not handle, newest first, with the error and the payload
        (`python -m shared.deadletter replay <service>` sends them again)."""
        from shared.deadletter import public_view

        store = getattr(request.app.state, "store", None)
        if store is None or getattr(store, "dead_letters", None) is None:
            raise HTTPException(503, f"{service} has no store open yet")
        rows = store.dead_letters.list(limit=limit, include_replayed=include_replayed)
        return {"service": service, "waiting": store.dead_letters.counts(), "items": [public_view(r) for r in rows]}

    metrics.registry.register(_DeadLetterGauge(app, service))
    metrics.registry.register(_CheckpointCounter(app, service))
    return metrics


def service_app(
    settings: ServiceSettings,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    router: APIRouter,
    *,
    health: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The app of the service `settings` are of: it refuses to be made without the admin token (its admin routes, the dead-letter list
    among them, could not be protected), keeps its settings in `app.state.settings` (read by the admin check
    and, in `install_common`, for the allowed origins), has the common surface (`install_common`; the metrics
    in `app.state.metrics`) and the service's routes."""
    settings.require_admin_token()
    app = FastAPI(title=settings.service, lifespan=_store_closed_if_start_fails(lifespan))
    app.state.settings = settings
    direct = [r for r in router.routes if isinstance(r, DirectRoute)]
    if direct:  # added first, so it is the innermost middleware: the doors and metrics stay outside it
        app.add_middleware(DirectLane, routes=direct)
    install_common(app, settings.service, health=health)
    app.include_router(router)
    check_direct_routes(direct, [*app.routes, *router.routes])
    return app


def _store_closed_if_start_fails(
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """`lifespan`, with the store `start_service` opened disposed of (its checkpoint thread stopped, its
    connections closed) when the start-up fails after it; a lifespan that started closes its store itself."""

    @asynccontextmanager
    async def guarded(app: FastAPI) -> AsyncIterator[None]:
        started = False
        try:
            async with lifespan(app):
                started = True
                yield
        except BaseException:
            store = getattr(app.state, "store", None)
            if not started and store is not None:
                store.dispose()
            raise

    return guarded


def start_service(app: FastAPI, settings: ServiceSettings, make_store: Callable[[str], StoreT]) -> StoreT:
    """What every service's lifespan does first: its logging configured, its store opened (`app.state.store`,
    which `/healthz` checks and the routes use; its WAL checkpointed on a thread of its own) and its bus
    (`app.state.bus`: the Celery app it publishes with and whose broker `/healthz` checks). Returns the store."""
    from shared.bus import api_bus
    from shared.logging import configure_logging

    configure_logging(settings.service, settings.log_level)
    store = make_store(settings.db_url)
    store.checkpoint_in_background()  # no request waits for a WAL checkpoint's disk flush
    app.state.store = store
    app.state.bus = api_bus(settings.service, settings)
    return store


#: Declares the admin token in the OpenAPI documents (each service's and the gateway's). The check itself is
#: `require_admin`'s own: `auto_error=False` leaves every answer to it.
admin_token_scheme = HTTPBearer(auto_error=False, scheme_name="adminToken", description="the ADMIN_TOKEN")


async def require_admin(
    request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_token_scheme)] = None
) -> None:
    """Let a request through only with `Authorization: Bearer <admin token>`; the token is the one in the
    app's settings (`app.state.settings.require_admin_token()`). `async` because it only reads the request
    and app state: a sync dependency would take a threadpool hop on every admin request for nothing. A
    service started without a token answers 503 (admin routes disabled), never 500 and never data."""
    header = request.headers.get("authorization", "")
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() != "bearer" or not supplied.strip():
        raise HTTPException(
            status_code=401,
            detail="admin route: send Authorization: Bearer <admin token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        expected = request.app.state.settings.require_admin_token()
    except RuntimeError:
        log.error("admin route called but ADMIN_TOKEN is not set")
        raise HTTPException(status_code=503, detail="admin routes are disabled: ADMIN_TOKEN is not set") from None
    if not hmac.compare_digest(supplied.strip().encode(), expected.encode()):
        raise HTTPException(status_code=401, detail="admin token is not valid", headers={"WWW-Authenticate": "Bearer"})


AdminDep = Annotated[None, Depends(require_admin)]
