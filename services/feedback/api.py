"""HTTP entry points of the feedback service. Routes translate a request into a command or a handler call."""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from services.feedback import handlers
from services.feedback.config import FeedbackSettings
from services.feedback.store import Store, outbox
from shared.bus import CeleryBus
from shared.outbox import relay_after_commit
from shared.privacy import session_key
from shared.web import AdminDep

log = logging.getLogger(__name__)
router = APIRouter()


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rating: Literal[1, -1] = Field(description="1 for thumbs up, -1 for thumbs down")
    stars: int | None = Field(default=None, ge=1, le=5)
    comment: str | None = Field(default=None, max_length=2000)
    session_id: str = Field(
        min_length=1, max_length=200, description="anonymous session id; stored only as a keyed hash"
    )

    @field_validator("rating", mode="before")
    @classmethod
    def _rating_is_an_integer(cls, value: Any) -> Any:
        # Literal[1, -1] compares by equality, so JSON `true` (== 1) and `-1.0` would pass as votes.
        if type(value) is not int:
            raise ValueError("rating must be the integer 1 (thumbs up) or -1 (thumbs down)")
        return value


class FeedbackAccepted(BaseModel):
    received: bool = True
    feedback_id: uuid.UUID


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_bus(request: Request) -> CeleryBus:
    return request.app.state.bus


async def get_settings_dep(request: Request) -> FeedbackSettings:
    return request.app.state.settings


StoreDep = Annotated[Store, Depends(get_store)]
BusDep = Annotated[CeleryBus, Depends(get_bus)]
SettingsDep = Annotated[FeedbackSettings, Depends(get_settings_dep)]


class KnownIds:
    """Explanation ids this process has already found in the replica (they never become unknown again),
    so the hot path skips the database for them."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[uuid.UUID, None] = OrderedDict()

    def __contains__(self, eid: uuid.UUID) -> bool:
        if eid in self._ids:
            self._ids.move_to_end(eid)
            return True
        return False

    def add(self, eid: uuid.UUID) -> None:
        self._ids[eid] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


async def _router_knows(request: Request, settings: FeedbackSettings, explanation_id: uuid.UUID) -> bool | None:
    """Ask the router's public contract whether it issued this id: True, False, or None when it can't say."""
    client: httpx.AsyncClient = request.app.state.http
    try:
        r = await client.get(
            f"{settings.gateway_url}/api/explanations/{explanation_id}", timeout=settings.router_check_timeout_s
        )
    except httpx.HTTPError:
        return None
    if r.status_code == 200:
        return True
    if r.status_code == 404:
        return False
    return None


async def _check_issued(request: Request, store: Store, settings: FeedbackSettings, explanation_id: uuid.UUID) -> None:
    known: KnownIds = request.app.state.known_ids
    if explanation_id in known:
        return
    if await run_in_threadpool(handlers.known_explanation, store.uow(), explanation_id):
        known.add(explanation_id)
        return
    if settings.verify_unknown_with_router and await _router_knows(request, settings, explanation_id) is False:
        raise HTTPException(404, f"explanation {explanation_id} was never issued")
    # Not in the replica yet and the router could not say: accept; the worker quarantines it until the
    # explanation's event arrives, and it is never counted if it does not.


@router.post(
    "/api/feedback/{explanation_id}",
    status_code=202,
    response_model=None,
    responses={202: {"model": FeedbackAccepted, "description": "durably queued"}},
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}}}
    },
)
async def submit_feedback(explanation_id: uuid.UUID, request: Request) -> JSONResponse:
    """Accept a vote: 202 once it is durably on the queue (group-committed to Redis); a worker stores it.

    The hot path of the system, so it reads the body and its dependencies directly rather than through
    FastAPI's parameter machinery; a bad body still gets the same 422 as every other route."""
    try:
        body = FeedbackIn.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    state = request.app.state
    settings: FeedbackSettings = state.settings
    if body.comment is not None and len(body.comment) > settings.max_comment_chars:
        raise HTTPException(422, f"comment is longer than {settings.max_comment_chars} characters")
    await _check_issued(request, state.store, settings, explanation_id)
    key = session_key(body.session_id, state.session_secret)
    cmd = handlers.new_vote(explanation_id, key, body.rating, body.stars, body.comment)
    try:
        await state.sender.send(cmd)
    except Exception as exc:  # the broker is down: say so, and do not pretend it was received
        log.error("could not queue feedback: %s", type(exc).__name__)
        raise HTTPException(503, "feedback could not be queued right now; please retry") from exc
    # A plain JSONResponse: the body is two known fields, no need to validate it on the hot path.
    return JSONResponse({"received": True, "feedback_id": str(cmd.feedback_id)}, status_code=202)


@router.delete("/api/feedback/sessions/{session_id}")
def erase_session(session_id: str, store: StoreDep, bus: BusDep, settings: SettingsDep) -> dict[str, Any]:
    """Erase every vote and comment of a session (GDPR right to erasure)."""
    if not session_id or len(session_id) > settings.max_session_id_chars:
        raise HTTPException(422, f"session id must be 1 to {settings.max_session_id_chars} characters")
    event = handlers.erase_session(session_key(session_id, settings.require_session_hash_key()), store.uow())
    relay_after_commit(store.factory, outbox, bus)
    return {"erased": True, "votes_erased": len(event.feedback_ids)}


@router.get("/api/feedback/quarantine")
def list_quarantine(_: AdminDep, store: StoreDep) -> dict[str, Any]:
    """Votes on ids the system has not issued: kept aside, never counted."""
    handlers.audit_read(store.uow(), "quarantine")
    with store.uow() as uow:
        return {"items": uow.repo.list_quarantine()}


@router.get("/api/feedback/audit")
def audit_log(_: AdminDep, store: StoreDep) -> dict[str, Any]:
    handlers.audit_read(store.uow(), "audit")
    with store.uow() as uow:
        return {"items": uow.repo.audit_log()}
