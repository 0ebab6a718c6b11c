"""Router use cases on a real SQLite file: serving, recording, the outbox, and the routing replica kept up to
date by events (idempotent, order-tolerant)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest

from services.router import handlers
from services.router.config import RouterSettings
from services.router.providers import ProviderSet
from services.router.store import RoutingCache, Store, outbox
from shared.contracts import (
    AllocationChanged,
    ArmSpec,
    ChampionChanged,
    ExperimentConcluded,
    ExperimentStarted,
    ExplanationCreated,
    ModelRegistered,
    ModelWithdrawn,
    PromptTemplate,
    Signal,
    utcnow,
)
from shared.outbox import pending
from shared.prompts import SEED_PROMPT

V11 = PromptTemplate(name="explain_signal", version="v1.1", template="Be concise. {ticker} {signal}\n{indicators}")
V12 = PromptTemplate(
    name="explain_signal", version="v1.2", template="Use bullet points. {ticker} {signal}\n{indicators}"
)
OFFLINE = "offline/template-v1"


@pytest.fixture
def store(store_url: Callable[[str], str]) -> Iterator[Store]:
    s = Store(store_url("router"))
    handlers.ensure_seeded(s.uow(), OFFLINE)
    yield s
    s.dispose()


@pytest.fixture
def providers(tmp_path: Path) -> ProviderSet:
    return ProviderSet(RouterSettings(data_dir=tmp_path, openai_api_key=None, groq_api_key=None))


def explain(store: Store, providers: ProviderSet, session: str = "session-key-1", **kw: object) -> ExplanationCreated:
    cmd = handlers.Explain(
        ticker=str(kw.get("ticker", "AAPL")),
        signal=cast(Signal, str(kw.get("signal", "BUY"))),
        context=kw.get("context", {"rsi": 28}),  # type: ignore[arg-type]
        session_key=session,
    )
    return handlers.create_explanation(cmd, store.uow(), providers, price_overrides={}).event


def start_experiment(store: Store, weights: tuple[float, float] = (0.5, 0.5), exp_id: str = "exp-1") -> None:
    event = ExperimentStarted(
        experiment_id=exp_id,
        prompt_name="explain_signal",
        arms=[
            ArmSpec(arm_id="control", prompt=V11, model=OFFLINE, weight=weights[0], is_control=True),
            ArmSpec(arm_id="bullets", prompt=V12, model=OFFLINE, weight=weights[1]),
        ],
    )
    assert handlers.on_experiment_started(event, store.uow()) == "started"


def test_first_start_seeds_the_seed_prompt_with_the_default_model_once(store: Store) -> None:
    assert handlers.ensure_seeded(store.uow(), "groq/llama-3.1-8b-instant") is False
    state = handlers.routing_state(store.uow())
    assert state["champion"]["prompt_version"] == SEED_PROMPT.version
    assert state["champion"]["model"] == OFFLINE
    assert state["experiment"] is None


def test_explanation_is_recorded_with_its_event_staged_in_the_outbox(store: Store, providers: ProviderSet) -> None:
    result = explain(store, providers)
    row = handlers.get_explanation(store.uow(), result.explanation_id)
    assert row is not None
    assert row["session_key"] == "session-key-1"
    assert row["model"] == OFFLINE and row["provider"] == "offline" and row["fallback_used"] is False
    assert row["prompt_version"] == "v1.0" and "Ticker: AAPL" in row["prompt_text"]
    staged = pending(store.factory, outbox)
    assert len(staged) == 1
    event = ExplanationCreated.from_payload(staged[0]["payload"])
    assert event.explanation_id == result.explanation_id
    assert event.text == result.text and event.tokens_out == result.tokens_out
    assert event.request_key == row["request_key"]


def test_experiment_assigns_sessions_stickily_to_its_arms(store: Store, providers: ProviderSet) -> None:
    start_experiment(store)
    seen = {}
    for i in range(40):
        r = explain(store, providers, session=f"s{i}")
        assert r.experiment_id == "exp-1"
        seen[f"s{i}"] = (r.arm_id, r.prompt_version)
    assert {arm for arm, _ in seen.values()} == {"control", "bullets"}
    for session, (arm, version) in list(seen.items())[:10]:
        again = explain(store, providers, session=session)
        assert (again.arm_id, again.prompt_version) == (arm, version)
    bullets = explain(store, providers, session=next(s for s, (a, _) in seen.items() if a == "bullets"))
    assert bullets.text.startswith("- ")


def test_allocation_change_moves_all_traffic_and_stale_allocations_are_ignored(
    store: Store, providers: ProviderSet
) -> None:
    start_experiment(store)
    now = utcnow()
    assert (
        handlers.on_allocation_changed(
            AllocationChanged(experiment_id="exp-1", weights={"control": 0.0, "bullets": 1.0}, occurred_at=now),
            store.uow(),
        )
        == "changed"
    )
    older = AllocationChanged(
        experiment_id="exp-1", weights={"control": 1.0, "bullets": 0.0}, occurred_at=now - timedelta(seconds=5)
    )
    assert handlers.on_allocation_changed(older, store.uow()) == "stale"
    assert {explain(store, providers, session=f"s{i}").arm_id for i in range(20)} == {"bullets"}


def test_concluded_experiment_stops_and_the_champion_serves_again(store: Store, providers: ProviderSet) -> None:
    start_experiment(store)
    handlers.on_experiment_concluded(
        ExperimentConcluded(experiment_id="exp-1", decision="promote", winner_arm_id="bullets"), store.uow()
    )
    r = explain(store, providers)
    assert r.experiment_id is None and r.prompt_version == "v1.0"


def test_conclusion_that_overtakes_its_start_keeps_the_experiment_stopped(store: Store) -> None:
    concluded = ExperimentConcluded(experiment_id="exp-9", decision="stopped")
    assert handlers.on_experiment_concluded(concluded, store.uow()) == "concluded_before_start"
    late_start = ExperimentStarted(
        experiment_id="exp-9",
        prompt_name="explain_signal",
        arms=[ArmSpec(arm_id="a", prompt=V11, model=OFFLINE, weight=1.0, is_control=True)],
    )
    assert handlers.on_experiment_started(late_start, store.uow()) == "already_known"
    assert handlers.routing_state(store.uow())["experiment"] is None


def test_champion_change_applies_once_and_an_older_one_is_ignored(store: Store, providers: ProviderSet) -> None:
    event = ChampionChanged(prompt=V11, model=OFFLINE, previous_version="v1.0", reason="won exp-1")
    assert handlers.on_champion_changed(event, store.uow()) == "changed"
    assert handlers.on_champion_changed(event, store.uow()) == "duplicate"
    older = ChampionChanged(prompt=V12, model=OFFLINE, occurred_at=event.occurred_at - timedelta(minutes=1))
    assert handlers.on_champion_changed(older, store.uow()) == "stale"
    assert explain(store, providers).prompt_version == "v1.1"


def test_champion_with_a_broken_template_is_rejected(store: Store) -> None:
    broken = PromptTemplate(name="explain_signal", version="v9", template="no placeholders here")
    assert handlers.on_champion_changed(ChampionChanged(prompt=broken, model=OFFLINE), store.uow()) == "rejected"
    assert handlers.routing_state(store.uow())["champion"]["prompt_version"] == "v1.0"


def test_experiment_with_an_unknown_provider_is_rejected(store: Store) -> None:
    event = ExperimentStarted(
        experiment_id="exp-x",
        prompt_name="explain_signal",
        arms=[ArmSpec(arm_id="a", prompt=V11, model="azure/gpt", weight=1.0, is_control=True)],
    )
    assert handlers.on_experiment_started(event, store.uow()) == "rejected"
    assert handlers.routing_state(store.uow())["experiment"] is None


def test_registered_model_is_known_with_its_price(store: Store) -> None:
    event = ModelRegistered(
        model_id="ft-1", model="local/ft-1", base_model="tiny", serving_base_url="http://x", cost_per_1k_tokens_usd=0.01
    )
    assert handlers.on_model_registered(event, store.uow()) == "registered"
    assert handlers.on_model_registered(event, store.uow()) == "duplicate"
    models = handlers.routing_state(store.uow())["models"]
    assert models == [
        {
            "model": "local/ft-1",
            "model_id": "ft-1",
            "base_model": "tiny",
            "serving_base_url": "http://x",
            "cost_per_1k_tokens_usd": 0.01,
        }
    ]


def test_unknown_explanation_id_is_none(store: Store) -> None:
    assert handlers.get_explanation(store.uow(), uuid.uuid4()) is None


def test_the_cached_routing_state_is_reloaded_after_every_routing_event_applied_anywhere(
    store: Store, providers: ProviderSet
) -> None:
    cache = RoutingCache(store)
    first = cache.current()
    assert cache.current() is first  # nothing changed: not read again
    served = explain_with(cache, store, providers)
    assert served.prompt_version == SEED_PROMPT.version

    worker = Store(store.engine.url.render_as_string(hide_password=False))  # another process's store: the worker
    try:
        handlers.on_champion_changed(ChampionChanged(prompt=V11, model=OFFLINE), worker.uow())
        assert cache.current().routing.champion_prompt.version == "v1.1"  # type: ignore[union-attr]
        assert explain_with(cache, store, providers).prompt_version == "v1.1"

        start_experiment(worker, weights=(0.0, 1.0))
        assert explain_with(cache, store, providers).arm_id == "bullets"
        handlers.on_allocation_changed(
            AllocationChanged(experiment_id="exp-1", weights={"control": 1.0, "bullets": 0.0}), worker.uow()
        )
        assert explain_with(cache, store, providers).arm_id == "control"
        handlers.on_model_registered(
            ModelRegistered(model_id="m1", model="local/ft-1", base_model="tiny", cost_per_1k_tokens_usd=0.5),
            worker.uow(),
        )
        assert set(cache.current().models) == {"local/ft-1"}
        handlers.on_model_withdrawn(ModelWithdrawn(model_id="m1", model="local/ft-1", reason="erased"), worker.uow())
        assert cache.current().models == {}
        handlers.on_experiment_concluded(
            ExperimentConcluded(experiment_id="exp-1", decision="keep", winner_arm_id=None), worker.uow()
        )
        assert cache.current().routing.experiment is None  # type: ignore[union-attr]
        assert explain_with(cache, store, providers).experiment_id is None
    finally:
        worker.dispose()
    unchanged = cache.current()
    assert cache.current() is unchanged


def explain_with(cache: RoutingCache, store: Store, providers: ProviderSet) -> ExplanationCreated:
    cmd = handlers.Explain(ticker="AAPL", signal="BUY", context={"rsi": 28}, session_key="session-key-1")
    return handlers.create_explanation(cmd, store.uow(), providers, price_overrides={}, routing_source=cache).event
