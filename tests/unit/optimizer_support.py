"""The optimizer tests' store (the seed prompt in it), what its outbox would publish, and settings with no paid
provider: one place for the set-up the registry, experiment, search and withdrawal tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from services.optimizer import handlers, registry
from services.optimizer.config import OptimizerSettings
from services.optimizer.store import Store, outbox
from shared.contracts import utcnow
from shared.outbox import relay
from shared.prompts import PROMPT_NAME
from tests.fakes.bus import FakeBus
from tests.support import disposed_after, explanation_created, feedback_recorded

MODEL = "offline/template-v1"


@pytest.fixture(name="store")
def optimizer_store(store_url: Callable[[str], str]) -> Iterator[Store]:
    """The `store` fixture of the optimizer tests (a module imports it): the optimizer's store with the seed
    prompt champion on MODEL, disposed after the test."""
    s = Store(store_url("optimizer"))
    registry.ensure_seeded(s.uow(), MODEL)
    yield from disposed_after(s)


def published(store: Store) -> list[Any]:
    """The events the store's outbox holds, relayed (so a second call returns only what came since)."""
    bus = FakeBus()
    relay(store.factory, outbox, bus)
    return bus.events


def offline_settings(**fields: Any) -> OptimizerSettings:
    """Settings with no paid provider, no minimum duration, automatic promotion, and a feedback rate over every
    session (these tests record a vote with its explanation, nothing in flight); `fields` add or override."""
    values: dict[str, Any] = {"min_duration_s": 0, "promotion_mode": "auto", "feedback_rate_grace_s": 0}
    return OptimizerSettings(**(values | fields), openai_api_key=None, groq_api_key=None)


def arm_fields(experiment_id: str, arm_id: str, version: str = "v1.0") -> dict[str, Any]:
    return {
        "prompt_name": PROMPT_NAME,
        "prompt_version": version,
        "model": MODEL,
        "experiment_id": experiment_id,
        "arm_id": arm_id,
    }


def explain_and_vote(
    store: Store,
    arm: dict[str, Any],
    session: str,
    up: bool,
    *,
    served_to: str | None = None,
    signal: str = "BUY",
    cost: float = 0.0,
    fallback: bool = False,
) -> None:
    """One explanation on `arm` (prompt and experiment fields) served to `served_to`, and one vote on it from
    `session`, through the handlers."""
    now = utcnow()
    ex = explanation_created(
        None, served_to, signal=signal, cost_usd=cost, latency_ms=5.0, created_at=now, fallback_used=fallback, **arm
    )
    handlers.on_explanation_created(ex, store.uow())
    vote = feedback_recorded(ex, 1 if up else -1, session_key=session, submitted_at=now)
    handlers.on_feedback_recorded(vote, store.uow())
