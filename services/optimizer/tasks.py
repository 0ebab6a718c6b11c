"""Celery entry points of the optimizer (queue "optimizer"). Each turns a payload into a message and calls
the handler; the outbox is relayed after the commit. The periodic ones (run_decisions, generate_variants,
relay_outbox) are sent by beat without a payload."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from services.optimizer import experiments, handlers, registry
from services.optimizer.config import get_settings
from services.optimizer.generation import VariantGenerator, make_generator
from services.optimizer.store import Store
from shared.bus import missing_explanations_task, outbox_relay, subscribed_tasks, worker_app
from shared.contracts import ModelRegistered, ModelWithdrawn

settings = get_settings()


@lru_cache
def _store() -> Store:
    store = Store(get_settings().db_url)
    registry.ensure_seeded(store.uow(), get_settings().seed_model())
    return store


# What a task cannot handle goes to this service's dead-letter store (shared.bus.ReliableTask).
app = worker_app("optimizer", settings, lambda: _store().dead_letters, batches=True)


@lru_cache
def _generator() -> VariantGenerator:
    return make_generator(get_settings())


_relay = outbox_relay(app, "optimizer", _store)


def _on_model_registered(payload: dict) -> str:
    outcome = handlers.on_model_registered(ModelRegistered.from_payload(payload), _store().uow, get_settings())
    _relay()
    return outcome


def _on_model_withdrawn(payload: dict) -> dict[str, Any]:
    outcome = handlers.on_model_withdrawn(ModelWithdrawn.from_payload(payload), _store().uow)
    _relay()
    return outcome


#: task -> its registered consumer, one for each of the optimizer's subscriptions (`shared.bus.SUBSCRIPTIONS`);
#: the model events' handlers take a unit-of-work factory (above); the two busiest in batches
#: (`shared.bus.MANY_TO_A_MESSAGE`)
EVENT_TASKS = subscribed_tasks(
    app,
    "optimizer",
    handlers,
    lambda: _store().uow(),
    own={"optimizer.on_model_registered": _on_model_registered, "optimizer.on_model_withdrawn": _on_model_withdrawn},
)


@app.task(name="optimizer.run_decisions")
def run_decisions(payload: dict | None = None) -> list[dict[str, Any]]:
    results = experiments.run_decisions(_store().uow, get_settings())
    _relay()
    return results


@app.task(name="optimizer.generate_variants")
def generate_variants(payload: dict | None = None) -> list[dict[str, Any]]:
    """Beat: generate variants and start the next experiment where none runs (OPTIMIZER_AUTO_EXPERIMENT)."""
    results = handlers.auto_cycle(_store().uow, _generator(), get_settings())
    _relay()
    return results


# Beat: ask the router again for the events of explanations this service holds votes on but never got
ask_for_missing_explanations = missing_explanations_task(app, "optimizer", lambda: _store().uow())
