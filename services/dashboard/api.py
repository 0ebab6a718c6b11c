"""HTTP entry points of the dashboard: the web page, the admin stats, their export and live stream.
Routes only translate: parameters in, a handler call, a response out."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.dashboard import handlers
from services.dashboard.config import DashboardSettings
from services.dashboard.store import Store
from shared.web import AdminDep, from_state

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger(__name__)

router = APIRouter()


StoreDep = Annotated[Store, from_state("store")]
SettingsDep = Annotated[DashboardSettings, from_state("settings")]
DaysQuery = Annotated[int | None, Query(description="window: the last N days, today included")]


def read_policy(settings: DashboardSettings) -> handlers.ReadPolicy:
    return handlers.ReadPolicy(
        ticker_min_votes=settings.ticker_min_votes,
        ticker_top_n=settings.ticker_top_n,
        heatmap_max_tickers=settings.heatmap_max_tickers,
    )


def window(days: int | None, settings: DashboardSettings) -> int:
    if days is None:
        return settings.default_days
    if not 1 <= days <= settings.max_days:
        raise HTTPException(422, f"days must be between 1 and {settings.max_days}")
    return days


# ---------------------------------------------------------------------------------------------------------
# The web page
# ---------------------------------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------------------
# Admin reads
# ---------------------------------------------------------------------------------------------------------


def snapshot(request: Request, store: Store, days: int, settings: DashboardSettings) -> dict[str, Any]:
    """The figures from the app's snapshot cache (computed again only when the read model changed)."""
    cache: handlers.SnapshotCache = request.app.state.snapshots
    return cache.get(store.reader, days, read_policy(settings))


@router.get("/api/admin/llm-learning")
def llm_learning(
    _: AdminDep, request: Request, store: StoreDep, settings: SettingsDep, days: DaysQuery = None
) -> dict[str, Any]:
    """Every figure of the dashboard over the last `days` days (default 30), and `queues`: how far behind each
    service's consumers are (messages waiting, age of the oldest), read from the broker now."""
    return {**snapshot(request, store, window(days, settings), settings), "queues": queue_lags(request)}


def queue_lags(request: Request) -> list[dict[str, Any]] | None:
    """Per queue depth and oldest-message age; None when the broker does not answer (the figures still show)."""
    try:
        return request.app.state.bus.queue_lags()
    except Exception as exc:
        log.warning("could not read the queue lag (%s)", type(exc).__name__)
        return None


@router.get("/api/admin/llm-learning/metrics")
def learning_metrics(_: AdminDep, request: Request) -> Response:
    """Admin: the dashboard's figures as Prometheus gauges (the public `/metrics` carries operational series
    only). Prometheus scrapes it with the admin token as a bearer credential."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.learning_registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/admin/llm-learning/export")
def export(
    _: AdminDep,
    store: StoreDep,
    settings: SettingsDep,
    format: Literal["csv", "json"] = "csv",
    table: Annotated[str, Query(description=", ".join(handlers.EXPORT_TABLES))] = "daily",
    days: DaysQuery = None,
) -> Response:
    """One dashboard table as a CSV or JSON download."""
    if table not in handlers.EXPORT_TABLES:
        raise HTTPException(422, f"table must be one of: {', '.join(handlers.EXPORT_TABLES)}")
    d = window(days, settings)
    filename = f"llm-learning-{table}-{d}d.{format}"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if table == "explanations":  # the one long table: streamed in pages, each its own short read
        pages = handlers.explanation_pages(store.reader, d)
        if format == "json":
            return StreamingResponse(_json_pages(pages, table, d), media_type="application/json", headers=headers)
        return StreamingResponse(_csv_pages(pages), media_type="text/csv; charset=utf-8", headers=headers)
    rows = handlers.export_rows(store.reader(), table, d, read_policy(settings))
    if format == "json":
        return JSONResponse(jsonable_encoder({"table": table, "days": d, "rows": rows}), headers=headers)
    return Response("".join(_csv_pages(iter([rows]))), media_type="text/csv; charset=utf-8", headers=headers)


#: A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: text that a spreadsheet would run as a formula gets a leading apostrophe, so it
    shows as the text it is (OWASP's advice); numbers stay numbers (a negative number is not text)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _csv_pages(pages: Any) -> Any:
    """CSV text, page by page: the header from the first row, every cell through `csv_cell`; CRLF line ends
    (RFC 4180), so a cell holding a CR or LF is quoted."""
    writer = None
    buf = io.StringIO()
    for rows in pages:
        for row in rows:
            if writer is None:
                writer = csv.DictWriter(buf, fieldnames=list(row), extrasaction="ignore", lineterminator="\r\n")
                writer.writeheader()
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()


def _json_pages(pages: Any, table: str, days: int) -> Any:
    yield json.dumps({"table": table, "days": days})[:-1] + ', "rows": ['
    first = True
    for rows in pages:
        for row in rows:
            yield ("" if first else ",") + json.dumps(jsonable_encoder(row))
            first = False
    yield "]}"


@router.get("/api/admin/llm-learning/stream")
async def stream(
    _: AdminDep,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    days: DaysQuery = None,
    max_events: Annotated[int | None, Query(ge=1, description="stop after this many snapshots")] = None,
) -> StreamingResponse:
    """Server-sent events: a `snapshot` event with every figure whenever the read model changes, a comment
    line as a heartbeat in between; it ends when the client leaves. Database reads run in the thread pool,
    so the event loop never blocks."""
    d = window(days, settings)
    policy = read_policy(settings)

    async def events() -> AsyncIterator[str]:
        request.app.state.open_streams = getattr(request.app.state, "open_streams", 0) + 1
        try:
            async for chunk in _stream_body():
                yield chunk
        finally:
            request.app.state.open_streams -= 1

    async def _stream_body() -> AsyncIterator[str]:
        yield f"retry: {int(max(1.0, settings.stream_poll_s) * 3000)}\n\n"
        last_revision: int | None = None
        sent = 0
        last_write = time.monotonic()
        while not await request.is_disconnected():
            revision = await run_in_threadpool(handlers.revision, store.reader())
            if revision != last_revision:
                snap = await run_in_threadpool(request.app.state.snapshots.get, store.reader, d, policy)
                last_revision = revision
                yield f"id: {revision}\nevent: snapshot\ndata: {json.dumps(jsonable_encoder(snap))}\n\n"
                sent += 1
                last_write = time.monotonic()
                if max_events is not None and sent >= max_events:
                    return
            elif time.monotonic() - last_write >= settings.stream_heartbeat_s:
                yield ": heartbeat\n\n"
                last_write = time.monotonic()
            await asyncio.sleep(settings.stream_poll_s)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
