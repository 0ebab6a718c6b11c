"""HTTP entry points of the dashboard: the web page, the admin stats, their export and live stream.
Routes only translate: parameters in, a handler call, a response out."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.dashboard import handlers
from services.dashboard.config import DashboardSettings
from services.dashboard.store import Store
from shared.web import AdminDep

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter()


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings_dep(request: Request) -> DashboardSettings:
    return request.app.state.settings


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[DashboardSettings, Depends(get_settings_dep)]
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


@router.get("/api/admin/llm-learning")
def llm_learning(_: AdminDep, store: StoreDep, settings: SettingsDep, days: DaysQuery = None) -> dict[str, Any]:
    """Every figure of the dashboard over the last `days` days (default 30)."""
    return handlers.stats(store.uow(), window(days, settings), read_policy(settings))


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
    rows = handlers.export_rows(store.uow(), table, d, read_policy(settings))
    filename = f"llm-learning-{table}-{d}d.{format}"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if format == "json":
        return JSONResponse(jsonable_encoder({"table": table, "days": d, "rows": rows}), headers=headers)
    return Response(_csv(rows), media_type="text/csv; charset=utf-8", headers=headers)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


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
            revision = await run_in_threadpool(handlers.revision, store.uow())
            if revision != last_revision:
                snapshot = await run_in_threadpool(handlers.stats, store.uow(), d, policy)
                last_revision = revision
                yield f"id: {revision}\nevent: snapshot\ndata: {json.dumps(jsonable_encoder(snapshot))}\n\n"
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
