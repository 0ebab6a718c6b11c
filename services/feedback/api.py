"""HTTP entry points of the feedback service. Routes translate a request into a command or a handler call."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from services.feedback import domain, handlers
from services.feedback.config import FeedbackSettings
from services.feedback.store import Store, outbox
from shared.bus import CeleryBus, queue_for
from shared.outbox import relay_after_commit
from shared.privacy import session_keys
from shared.text import check_text
from shared.web import AdminDep, add_direct_route, from_state, path_uuid

log = logging.getLogger(__name__)
router = APIRouter()


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rating: Literal[1, -1] = Field(description="1 for thumbs up, -1 for thumbs down")
    stars: int | None = Field(default=None, ge=1, le=5)
    comment: str | None = Field(default=None, max_length=2000)
    session_id: str = Field(
        min_length=1,
        max_length=200,
        description="the anonymous session id the explanation was requested with (only that session's vote "
        "counts); stored only as a keyed hash",
    )

    @field_validator("session_id", "comment")
    @classmethod
    def _text(cls, value: str | None, info: Any) -> str | None:
        return value if value is None else check_text(value, info.field_name)

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


StoreDep = Annotated[Store, from_state("store")]
BusDep = Annotated[CeleryBus, from_state("bus")]
SettingsDep = Annotated[FeedbackSettings, from_state("settings")]


class KnownIds:
    """Explanations this process has already found in the replica, with the session each was served to (they
    never change), so the hot path skips the database for them; the others are read from the replica with
    group commit (`lookup`)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[uuid.UUID, str | None] = OrderedDict()
        self._wanted: dict[uuid.UUID, list[asyncio.Future[tuple[bool, str | None]]]] = {}
        self._reader: asyncio.Task[None] | None = None  # the read in flight; held so it is not collected

    async def lookup(self, explanation_id: uuid.UUID, store: Store) -> tuple[bool, str | None]:
        """(known, the served session's key), from memory or else from the replica. The ids asked for while
        one read is in flight are read together in the next one: one thread hop, one connection and one
        query for many votes (in real traffic most votes are the first on their explanation, so most of them
        read). A read that fails fails every vote waiting on it."""
        known = self.get(explanation_id)
        if known[0]:
            return known
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, str | None]] = loop.create_future()
        self._wanted.setdefault(explanation_id, []).append(future)
        if self._reader is None:  # starts on the loop's next turn: the votes of this turn join its first read
            self._reader = loop.create_task(self._read(store))
        return await future

    async def _read(self, store: Store) -> None:
        try:
            while self._wanted:
                batch, self._wanted = self._wanted, {}
                try:
                    served = await run_in_threadpool(handlers.served_sessions, store.reader(), list(batch))
                except Exception as exc:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for eid, futures in batch.items():
                    if eid in served:
                        self.add(eid, served[eid])
                    answer = (eid in served, served.get(eid))
                    for future in futures:
                        if not future.done():  # a request whose client went away
                            future.set_result(answer)
        finally:
            self._reader = None

    def get(self, eid: uuid.UUID) -> tuple[bool, str | None]:
        """(known, the served session's key)."""
        if eid in self._ids:
            self._ids.move_to_end(eid)
            return True, self._ids[eid]
        return False, None

    def __contains__(self, eid: uuid.UUID) -> bool:
        return self.get(eid)[0]

    def forget(self, eids: list[uuid.UUID]) -> None:
        """Drop explanations whose session was erased: the next vote on them reads the replica again."""
        for eid in eids:
            self._ids.pop(eid, None)

    def add(self, eid: uuid.UUID, served_session_key: str | None = None) -> None:
        self._ids[eid] = served_session_key
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


class Backlog:
    """The feedback queue's backlog in Redis (the larger of the queue's length and the intake journal's, which
    holds every accepted vote not yet stored), read at most every `refresh_s` by one request at a time."""

    def __init__(self, redis_url: str, queue: str, journal_key: str, *, refresh_s: float = 0.5) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.queue = queue
        self.journal_key = journal_key
        self.refresh_s = refresh_s
        self.value = 0
        self._read_at = float("-inf")
        self._reading = False

    async def current(self) -> int:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s and not self._reading:
            self._reading = True
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.llen(self.queue)
                    pipe.hlen(self.journal_key)
                    queued, journalled = await pipe.execute()
                self.value = max(int(queued), int(journalled))
            except Exception as exc:  # queueing will fail too and say so (503)
                log.warning("could not read the feedback backlog (%s)", type(exc).__name__)
            finally:
                self._read_at = time.monotonic()
                self._reading = False
        return self.value

    async def aclose(self) -> None:
        await self._redis.aclose()


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


async def _check_served(
    request: Request, store: Store, settings: FeedbackSettings, explanation_id: uuid.UUID, voter_keys: list[str]
) -> str:
    """404 for an id never issued; 403 for a vote from a session the explanation was not served to. An id the
    replica has not learnt of yet is accepted: the worker quarantines the vote until the explanation's event
    arrives and applies the same session check then (a vote from another session is dropped, never stored).
    Returns the key the vote is stored under: the one the explanation was served to, which after a rotation of
    the secret may be an older version's (`voter_keys` holds the session's key under every version)."""
    known_ids: KnownIds = request.app.state.known_ids
    known, served = await known_ids.lookup(explanation_id, store)
    if known:
        voter_key = next(
            (k for k in voter_keys if served is not None and hmac.compare_digest(k.encode(), served.encode())),
            voter_keys[0],
        )
        refusal = domain.vote_refusal(served, voter_key)
        if refusal is not None:
            request.app.state.metrics.refused.labels("feedback", "votes", refusal).inc()
            raise HTTPException(403, domain.REFUSAL_MESSAGES[refusal])
        return voter_key
    if settings.verify_unknown_with_router and await _router_knows(request, settings, explanation_id) is False:
        raise HTTPException(404, f"explanation {explanation_id} was never issued")
    return voter_keys[0]


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


async def submit_feedback(request: Request) -> Response:
    """Accept a vote from the session the explanation was served to: 202 once it is durably on the queue
    (group-committed to Redis); a worker stores it.

    The hot path of the system, so it reads the body and its dependencies directly rather than through
    FastAPI's parameter machinery; a bad body still gets the same 422 as every other route. Doors, in order:
    JSON only (415) and allowed origins (403) before the route; the body (422); rate limits per client and
    session (429); the queue's backlog (503); the explanation was issued (404) and served to this session (403)."""
    explanation_id = path_uuid(request, "explanation_id")
    try:
        body = FeedbackIn.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    state = request.app.state
    settings: FeedbackSettings = state.settings
    if body.comment is not None and len(body.comment) > settings.max_comment_chars:
        raise HTTPException(422, f"comment is longer than {settings.max_comment_chars} characters")
    keys = session_keys(body.session_id, state.session_secrets)
    await state.vote_limiter.check(client=_client(request), session=keys[0])
    if settings.max_backlog and await state.backlog.current() > settings.max_backlog:
        state.metrics.refused.labels("feedback", "votes", "backlog").inc()
        raise HTTPException(
            503,
            f"feedback is backed up ({settings.max_backlog}+ votes waiting to be stored); retry in "
            f"{settings.backlog_retry_after_s} s",
            headers={"Retry-After": str(settings.backlog_retry_after_s)},
        )
    key = await _check_served(request, state.store, settings, explanation_id, keys)
    cmd = handlers.new_vote(explanation_id, key, body.rating, body.stars, body.comment)
    try:
        await state.sender.send(cmd)
    except Exception as exc:  # the broker is down: say so, and do not pretend it was received
        log.error("could not queue feedback: %s", type(exc).__name__)
        raise HTTPException(503, "feedback could not be queued right now; please retry") from exc
    # A plain JSONResponse: the body is two known fields, no need to validate it on the hot path.
    return JSONResponse({"received": True, "feedback_id": str(cmd.feedback_id)}, status_code=202)


# A DirectRoute: FastAPI's per-request parameter and response machinery is skipped (see shared.web), the
# documentation is the same as a declared route's.
add_direct_route(
    router,
    "/api/feedback/{explanation_id}",
    submit_feedback,
    body=FeedbackIn,
    status_code=202,
    uuid_path_parameters=("explanation_id",),
    responses={
        202: {"model": FeedbackAccepted, "description": "durably queued"},
        403: {"description": "the explanation was not served to this session, or a browser of another origin"},
        404: {"description": "the explanation id was never issued"},
        429: {"description": "too many votes from this client or session (Retry-After)"},
        503: {"description": "the feedback queue is backed up or the broker is down (Retry-After when backed up)"},
    },
)


@router.delete(
    "/api/feedback/sessions/{session_id}",
    responses={429: {"description": "too many erasures from this client or for this session (Retry-After)"}},
)
def erase_session(
    session_id: str, request: Request, store: StoreDep, bus: BusDep, settings: SettingsDep
) -> dict[str, Any]:
    """Erase every vote and comment of a session (GDPR right to erasure)."""
    if not session_id or len(session_id) > settings.max_session_id_chars:
        raise HTTPException(422, f"session id must be 1 to {settings.max_session_id_chars} characters")
    try:
        check_text(session_id, "session id")
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    keys = session_keys(session_id, settings.session_hash_secrets())
    state = request.app.state
    state.erasure_limiter.check(client=_client(request), session=keys[0])
    votes_erased = 0
    for key in keys:  # the session's key under every version of the secret: rotation orphans nothing
        event, staged = handlers.erase_session(key, store.uow(), tombstone_s=settings.erasure_tombstone_s)
        votes_erased += len(event.feedback_ids)
        state.known_ids.forget(event.explanation_ids)
        if staged:
            relay_after_commit(store.factory, outbox, bus)
        else:
            # Nothing of the session is kept here, so nothing permanent was written; the other services may still
            # hold something of it, so they are told now, and the client retries if they cannot be.
            try:
                bus.publish(event)
            except Exception as exc:
                log.error("could not publish an erasure: %s", type(exc).__name__)
                raise HTTPException(
                    503, "the erasure could not be sent to every service right now; please retry"
                ) from exc
    _forget_journalled(state, keys, event.erased_at)
    return {"erased": True, "votes_erased": votes_erased}


def _forget_journalled(state: Any, keys: list[str], erased_at: Any) -> None:
    """Votes of the session accepted but not stored yet leave the intake journal and the queue now (the worker
    would drop them anyway, as cast before the erasure). Best effort: if Redis cannot be reached, they are
    dropped by the worker and leave the journal then."""
    journal = getattr(getattr(state, "sender", None), "journal", None)
    if journal is None:
        return
    try:
        journal.forget_session(keys, erased_at, queue=queue_for("feedback.record"))
    except Exception as exc:
        log.warning("could not remove an erased session's votes from the intake journal (%s)", type(exc).__name__)


@router.get("/api/feedback/quarantine")
def list_quarantine(_: AdminDep, store: StoreDep) -> dict[str, Any]:
    """Votes on ids the system has not issued (yet): kept aside, never counted; and how many votes were
    dropped when released, by reason (e.g. from a session the explanation was not served to)."""
    handlers.audit_read(store.uow(), "quarantine")
    with store.uow() as uow:
        return {"items": uow.repo.list_quarantine(), "dropped": uow.repo.dropped_counts()}


@router.get("/api/feedback/audit")
def audit_log(_: AdminDep, store: StoreDep) -> dict[str, Any]:
    handlers.audit_read(store.uow(), "audit")
    with store.uow() as uow:
        return {"items": uow.repo.audit_log()}
