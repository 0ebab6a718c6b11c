"""The GPU serving path end to end on CPU: the finetune service loads its registered adapters into a server that
answers exactly as vLLM does (tests/fakes/vllm_server.py: only the names it was given, its load-adapter route, its
API key), the router reaches the tuned model under the one naming rule without a fallback, a restarted engine
gets its adapters back, and a withdrawn model leaves serving and the experiment."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.redis_server import RedisServer
from services.finetune import domain, handlers, jobs
from services.finetune.config import FinetuneSettings
from services.finetune.store import ModelRow
from services.finetune.store import Store as FinetuneStore
from services.router import handlers as router
from services.router.config import RouterSettings
from services.router.providers import ProviderSet
from services.router.store import Store as RouterStore
from shared.contracts import ArmSpec, ExperimentStarted, ExplanationCreated, ModelWithdrawn, PromptTemplate, utcnow
from shared.prompts import SEED_TEMPLATE
from shared.serving import served_name, serving_api_key
from tests.fakes.vllm_server import FakeVLLM

ADMIN = "admin-token-for-tests"
OFFLINE = "offline/template-v1"


def finetune_settings(
    tmp_path: Path, store_url: Callable[[str], str], serving_base_url: str, **more: Any
) -> FinetuneSettings:
    """The finetune service's settings in these tests: its store, the admin token (the engine's API key is
    derived from it) and the serving engine at `serving_base_url`; `more` as given."""
    return FinetuneSettings(
        data_dir=tmp_path,
        database_url=store_url("finetune"),
        admin_token=SecretStr(ADMIN),
        serving_base_url=serving_base_url,
        **more,
    )


@pytest.fixture
def engine() -> Iterator[FakeVLLM]:
    with FakeVLLM(api_key=serving_api_key(None, ADMIN)) as fake:
        yield fake


@pytest.fixture
def finetune(tmp_path: Path, engine: FakeVLLM, store_url: Callable[[str], str]) -> Iterator[tuple]:
    settings = finetune_settings(tmp_path, store_url, engine.base_url)
    store = FinetuneStore(settings.db_url)
    yield settings, store
    store.dispose()


def register(store: FinetuneStore, settings: FinetuneSettings, tmp_path: Path, job_id: str = "job-v") -> ModelRow:
    model_id = domain.model_id_for(job_id)
    adapter = tmp_path / "adapters" / model_id / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    with store.uow() as uow:
        uow.repo.add_model(
            {
                "model_id": model_id,
                "name": domain.model_name(model_id),
                "job_id": job_id,
                "method": "sft",
                "base_model": "/models/base",
                "adapter_path": str(adapter),
                "recipe": {"lora_r": 16},
                "train_export_id": "t",
                "heldout_export_id": "h",
                "metrics": {"offline_margin_gain": 0.4},
                "status": domain.MODEL_REGISTERED,
                "serving_base_url": settings.public_serving_url,
                "cost_per_1k_tokens_usd": 0.0,
                "registered_at": utcnow(),
            }
        )
        uow.commit()
        model = uow.repo.model(model_id)
    assert model is not None
    return model


@pytest.fixture
def routing(tmp_path: Path, store_url: Callable[[str], str]) -> Iterator[tuple[RouterStore, ProviderSet]]:
    store = RouterStore(store_url("router"))
    router.ensure_seeded(store.uow(), OFFLINE)
    providers = ProviderSet(
        RouterSettings(data_dir=tmp_path, admin_token=SecretStr(ADMIN), openai_api_key=None, groq_api_key=None),
        sleep=lambda s: None,
    )
    yield store, providers
    providers.close()
    store.dispose()


def explain(store: RouterStore, providers: ProviderSet, session: str = "s-1") -> ExplanationCreated:
    cmd = router.Explain(ticker="AAPL", signal="BUY", context={"rsi": 28}, session_key=session)
    return router.create_explanation(cmd, store.uow(), providers, price_overrides={}).event


def test_router_reaches_the_tuned_model_on_a_vllm_like_engine_without_fallback(
    finetune: tuple, routing: tuple, engine: FakeVLLM, tmp_path: Path
) -> None:
    settings, ft_store = finetune
    store, providers = routing
    model = register(ft_store, settings, tmp_path)
    name = served_name(model["name"])
    assert name == model["model_id"] and model["name"] == f"local/{name}"

    # the service loads what is registered; vLLM then knows the adapter by exactly that name
    assert jobs.sync_serving(ft_store, settings)["loaded"] == [name]
    assert engine.loras == {name: model["adapter_path"]}
    assert jobs.sync_serving(ft_store, settings)["loaded"] == []  # nothing to do the second time
    # a second load of the same name is vLLM's 400 "already been loaded": counted as loaded, not an error
    assert jobs.load_adapter_on_server(engine.base_url, model, key=settings.serving_key()) == "already loaded"

    router.on_model_registered(handlers.registered_event(model), store.uow())
    template = PromptTemplate(name="explain_signal", version="v1.0", template=SEED_TEMPLATE)
    started = ExperimentStarted(
        experiment_id="exp-ft",
        prompt_name="explain_signal",
        arms=[
            ArmSpec(arm_id="control", prompt=template, model=OFFLINE, weight=0.0, is_control=True),
            ArmSpec(arm_id="tuned", prompt=template, model=model["name"], weight=1.0),
        ],
    )
    assert router.on_experiment_started(started, store.uow()) == "started"

    served = explain(store, providers)
    assert served.model == model["name"] and not served.fallback_used
    assert served.text.startswith(f"Answered by {name}")
    assert engine.chat_models == [name]

    # vLLM restarts and forgets runtime adapters: the router falls back (and says so) until the service's next
    # sync round loads the adapter again
    engine.restart()
    fell_back = explain(store, providers, session="s-2")
    assert fell_back.fallback_used and fell_back.model == OFFLINE
    assert jobs.sync_serving(ft_store, settings)["loaded"] == [name]
    again = explain(store, providers, session="s-3")
    assert again.model == model["name"] and not again.fallback_used

    # withdrawn (erased training data): unloaded from the engine, gone from the router and its experiment
    handlers.withdraw_model(ft_store.uow(), model["model_id"], "erased")
    assert jobs.sync_serving(ft_store, settings)["unloaded"] == [name]
    assert name not in engine.loras
    event = ModelWithdrawn(model_id=model["model_id"], model=model["name"], reason="erased")
    assert router.on_model_withdrawn(event, store.uow()) == "withdrawn"
    assert router.on_model_withdrawn(event, store.uow()) == "duplicate"
    state = router.routing_state(store.uow())
    assert state["experiment"] is None and state["models"] == []
    after = explain(store, providers, session="s-4")
    assert after.model == OFFLINE and after.experiment_id is None


def test_the_engine_refuses_callers_without_the_serving_key_and_unknown_names(engine: FakeVLLM) -> None:
    import httpx

    assert httpx.get(f"{engine.base_url}/models").status_code == 401
    key = {"Authorization": f"Bearer {engine.api_key}"}
    r = httpx.post(
        f"{engine.base_url}/chat/completions",
        json={"model": "local/ft-x", "messages": [{"role": "user", "content": "hi"}]},
        headers=key,
    )
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]


def test_without_runtime_lora_updating_the_load_route_is_missing_and_sync_reports_the_failure(
    tmp_path: Path, store_url: Callable[[str], str]
) -> None:
    with FakeVLLM(api_key=serving_api_key(None, ADMIN), allow_runtime_lora_updating=False) as fake:
        settings = finetune_settings(tmp_path, store_url, fake.base_url)
        store = FinetuneStore(settings.db_url)
        try:
            model = register(store, settings, tmp_path)
            result = jobs.sync_serving(store, settings)
            assert result["failed"] == [model["model_id"]] and result["loaded"] == []
        finally:
            store.dispose()


def test_the_service_loads_adapters_at_start_and_again_when_the_engine_comes_back(
    tmp_path: Path, engine: FakeVLLM, store_url: Callable[[str], str], redis_server: RedisServer
) -> None:
    from fastapi.testclient import TestClient

    from services.finetune.main import create_app
    from tests.support import wait_for

    settings = finetune_settings(
        tmp_path,
        store_url,
        engine.base_url,
        session_hash_key=SecretStr("k"),
        redis_url=redis_server.url,
        serving_sync_interval_s=0.2,
    )
    store = FinetuneStore(settings.db_url)
    model = register(store, settings, tmp_path)
    store.dispose()
    name = served_name(model["name"])
    with TestClient(create_app(settings)):
        wait_for(lambda: name in engine.loras, 10, what="the adapter loaded at start")
        engine.restart()  # vLLM restarted: runtime adapters are gone
        assert name not in engine.loras
        wait_for(lambda: name in engine.loras, 10, what="the adapter loaded again")
