"""HTTP entry points of the feedback service. Routes translate a request into a command or a handler call."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from services.feedback import handlers
from services.feedback.config import FeedbackSettings
from services.feedback.store import Store, outbox
from shared.bus import CeleryBus
from shared.outbox import relay
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


class FeedbackAccepted(BaseModel):
    received: bool = True
    feedback_id: uuid.UUID


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_bus(request: Request) -> CeleryBus:
    return request.app.state.bus


def get_settings_dep(request: Request) -> FeedbackSettings:
    return request.app.state.settings


StoreDep = Annotated[Store, Depends(get_store)]
BusDep = Annotated[CeleryBus, Depends(get_bus)]
SettingsDep = Annotated[FeedbackSettings, Depends(get_settings_dep)]


def _router_knows(settings: FeedbackSettings, explanation_id: uuid.UUID) -> bool | None:
    """Ask the router's public contract whether it issued this id: True, False, or None when it can't say."""
    try:
        r = httpx.get(
            f"{settings.gateway_url}/api/explanations/{explanation_id}", timeout=settings.router_check_timeout_s
        )
    except httpx.HTTPError:
        return None
    if r.status_code == 200:
        return True
    if r.status_code == 404:
        return False
    return None


@router.post("/api/feedback/{explanation_id}", status_code=202, response_model=FeedbackAccepted)
def submit_feedback(
    explanation_id: uuid.UUID, body: FeedbackIn, store: StoreDep, bus: BusDep, settings: SettingsDep
) -> Any:
    """Accept a vote: 202 once it is durably on the queue; a worker stores it."""
    if body.comment is not None and len(body.comment) > settings.max_comment_chars:
        raise HTTPException(422, f"comment is longer than {settings.max_comment_chars} characters")
    unknown = not handlers.known_explanation(store.uow(), explanation_id)
    if unknown and settings.verify_unknown_with_router and _router_knows(settings, explanation_id) is False:
        raise HTTPException(404, f"explanation {explanation_id} was never issued")
    key = session_key(body.session_id, settings.require_session_hash_key())
    cmd = handlers.new_vote(explanation_id, key, body.rating, body.stars, body.comment)
    try:
        bus.send(cmd)
    except Exception as exc:  # the broker is down: say so, and do not pretend it was received
        log.error("could not queue feedback: %s", type(exc).__name__)
        raise HTTPException(503, "feedback could not be queued right now; please retry") from exc
    return FeedbackAccepted(feedback_id=cmd.feedback_id)


@router.delete("/api/feedback/sessions/{session_id}")
def erase_session(session_id: str, store: StoreDep, bus: BusDep, settings: SettingsDep) -> dict[str, Any]:
    """Erase every vote and comment of a session (GDPR right to erasure)."""
    if not session_id or len(session_id) > settings.max_session_id_chars:
        raise HTTPException(422, f"session id must be 1 to {settings.max_session_id_chars} characters")
    event = handlers.erase_session(session_key(session_id, settings.require_session_hash_key()), store.uow())
    relay(store.factory, outbox, bus)
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
