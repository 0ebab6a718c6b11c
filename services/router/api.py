"""HTTP entry points of the router: the explanation API. Routes translate a request into a handler call."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from services.router import domain, handlers
from services.router.config import RouterSettings
from services.router.providers import AllProvidersFailed, NoProviderConfigured, ProviderSet
from services.router.store import ExplanationRow, Store
from shared.outbox import BatchedRelay
from shared.privacy import session_key
from shared.ratelimit import RateLimiter
from shared.text import check_text
from shared.web import AdminDep, Metrics, add_direct_route, declared_body, from_state

log = logging.getLogger(__name__)
router = APIRouter()


class ExplanationIn(BaseModel):
    """Tickers are normalised to upper case ("aapl" -> "AAPL") and then must be 1-12 of [A-Z0-9.-]."""

    model_config = ConfigDict(extra="forbid")

    ticker: StrictStr = Field(min_length=1, max_length=12, examples=["AAPL"])
    signal: Literal["BUY", "SELL", "HOLD"]
    context: dict[str, Any] = Field(
        default_factory=dict, description="indicators: at most 50 names mapped to a number, string or boolean"
    )
    session_id: StrictStr = Field(min_length=1, max_length=200, description="anonymous; stored only as a keyed hash")

    @field_validator("session_id")
    @classmethod
    def _session(cls, value: str) -> str:
        return check_text(value, "session_id")

    @field_validator("ticker")
    @classmethod
    def _ticker(cls, value: str) -> str:
        try:
            return domain.normalise_ticker(value)
        except domain.InvalidRequest as exc:
            raise ValueError(str(exc)) from None

    @field_validator("context")
    @classmethod
    def _context(cls, value: dict[str, Any]) -> dict[str, domain.ContextValue]:
        try:
            return domain.check_context(value)
        except domain.InvalidRequest as exc:
            raise ValueError(str(exc)) from None


class ExplanationOut(BaseModel):
    explanation_id: uuid.UUID
    text: str
    prompt_version: str
    model: str
    experiment_id: str | None
    latency_ms: float
    cost_usd: float
    # beyond the public contract, useful to a client and to operators
    prompt_name: str
    arm_id: str | None
    ticker: str
    signal: str
    fallback_used: bool
    tokens_in: int
    tokens_out: int
    created_at: datetime


@dataclass
class RouterMetrics:
    explanations: Counter
    provider_errors: Counter
    fallbacks: Counter
    latency: Histogram
    budget_refusals: Counter

    @classmethod
    def register(cls, metrics: Metrics) -> RouterMetrics:
        return cls(
            explanations=metrics.counter(
                "router_explanations_total", "Explanations served", ("model", "prompt_version", "signal")
            ),
            provider_errors=metrics.counter(
                "router_provider_errors_total", "Failed provider attempts", ("model", "kind")
            ),
            fallbacks=metrics.counter(
                "router_fallbacks_total", "Explanations answered by a fallback model", ("requested", "answered")
            ),
            latency=metrics.histogram(
                "router_explanation_latency_seconds",
                "Provider latency per explanation (retries and fallbacks included)",
                ("model",),
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ),
            budget_refusals=metrics.counter(
                "router_budget_refusals_total", "Explanations refused because the daily provider budget is spent"
            ),
        )


StoreDep = Annotated[Store, from_state("store")]
ProvidersDep = Annotated[ProviderSet, from_state("providers")]
SettingsDep = Annotated[RouterSettings, from_state("settings")]


def _out(row: ExplanationRow) -> ExplanationOut:
    return ExplanationOut.model_validate(row, from_attributes=False)


async def create_explanation(request: Request) -> Response:
    """Explain a signal with the variant this session is assigned to; 201 with the explanation."""
    # A direct route (`shared.web.DirectRoute`): the body is validated here, the same 422s as a declared body;
    # the work (a provider call and a write) runs in the threadpool, as a plain `def` route's would.
    body = await declared_body(request, ExplanationIn)
    return await run_in_threadpool(_create_explanation, body, request)


def _create_explanation(body: ExplanationIn, request: Request) -> Response:
    # What the lifespan built, read from the app's state here rather than as nine dependencies: FastAPI solves
    # each dependency on every request, a measurable share of this route's work.
    state = request.app.state
    settings: RouterSettings = state.settings
    limiter: RateLimiter = state.limiter
    store: Store = state.store
    metrics: RouterMetrics = state.router_metrics
    relay: BatchedRelay = state.relay
    key = session_key(body.session_id, settings.require_session_hash_key())
    limiter.check(client=request.client.host if request.client else None, session=key)
    cmd = handlers.Explain(ticker=body.ticker, signal=body.signal, context=body.context, session_key=key)
    try:
        result = handlers.create_explanation(
            cmd,
            store.uow(),
            state.providers,
            price_overrides=settings.prices,
            budget=state.budget,
            routing_source=state.routing,
        )
    except handlers.BudgetSpent as exc:
        metrics.budget_refusals.inc()
        raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    except NoProviderConfigured as exc:
        raise HTTPException(503, str(exc)) from None
    except AllProvidersFailed as exc:
        for e in exc.errors:
            metrics.provider_errors.labels(e.model, e.kind).inc()
        raise HTTPException(502, f"all providers failed: {exc}") from None
    except handlers.RoutingUnavailable as exc:
        raise HTTPException(503, str(exc)) from None
    for e in result.errors:
        metrics.provider_errors.labels(e.model, e.kind).inc()
    event = result.event
    if event.fallback_used:
        metrics.fallbacks.labels(result.requested_model, event.model).inc()
    metrics.explanations.labels(event.model, event.prompt_version, cmd.signal).inc()
    metrics.latency.labels(event.model).observe(event.latency_ms / 1000)
    # Recorded, with its event in the outbox, in the commit above. The relay thread publishes it after the
    # response, batched with other requests' events, and adds its cost to the day's spend; the periodic relay
    # publishes it if this process dies first. No request waits on the broker.
    relay.submit(state.bus, [event])
    # Serialised here, by pydantic, into the response: FastAPI would otherwise validate and encode the returned
    # model again in a second trip through the threadpool (the body is the same, `response_model` documents it).
    out = ExplanationOut.model_validate(event, from_attributes=True)
    return Response(out.model_dump_json(), status_code=201, media_type="application/json")


add_direct_route(
    router,
    "/api/explanations",
    create_explanation,
    body=ExplanationIn,
    status_code=201,
    responses={
        201: {"model": ExplanationOut, "description": "the explanation, recorded"},
        403: {"description": "a browser request from an origin that is not allowed"},
        429: {"description": "too many explanations from this client or session (Retry-After)"},
        502: {"description": "every provider of the chain failed"},
        503: {"description": "the daily provider budget is spent (Retry-After), or no provider is configured"},
    },
)


@router.get(
    "/api/explanations/{explanation_id}",
    response_model=ExplanationOut,
    responses={
        404: {"description": "the explanation id was never issued"},
        410: {"description": "the session it was served to was erased: its text is gone"},
    },
)
def get_explanation(explanation_id: uuid.UUID, store: StoreDep) -> Any:
    row = handlers.get_explanation(store.uow(), explanation_id)
    if row is None:
        raise HTTPException(404, f"explanation {explanation_id} was never issued")
    if handlers.explanation_erased(row):
        raise HTTPException(410, f"explanation {explanation_id} was erased with the session it was served to")
    return _out(row)


@router.get("/api/router/state")
def routing_state(_: AdminDep, store: StoreDep, providers: ProvidersDep, settings: SettingsDep) -> dict[str, Any]:
    """Admin: the champion, the running experiment and its weights, registered models, configured providers."""
    state = handlers.routing_state(store.uow())
    default = settings.resolved_default_model()
    return {
        **state,
        "default_model": default,
        "fallback_models": providers.chain(default, default),  # the order tried after the assigned model
        "offline_fallback": settings.offline_fallback,
        "prices_usd_per_1m_tokens": settings.price_table(),
    }
