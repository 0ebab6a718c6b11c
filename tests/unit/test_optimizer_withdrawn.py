"""The optimizer's side of a withdrawn model (erasure reached its training data): its experiments end so the
control serves, it is never champion, and a late ModelRegistered for it starts nothing."""

from __future__ import annotations

import pytest

from services.optimizer import domain, experiments, handlers, views
from services.optimizer.config import OptimizerSettings
from services.optimizer.store import Store
from shared.contracts import ExperimentConcluded, ModelRegistered, ModelWithdrawn, derived_id
from shared.prompts import PROMPT_NAME
from tests.unit.optimizer_support import (
    MODEL,
    offline_settings,
    optimizer_store,  # noqa: F401  (the store fixture)
    published,
)


@pytest.fixture
def settings() -> OptimizerSettings:
    return offline_settings()


def registered(model_id: str) -> ModelRegistered:
    return ModelRegistered(
        message_id=derived_id("model.registered", model_id),
        model_id=model_id,
        model=f"local/{model_id}",
        base_model="b",
    )


def test_withdrawn_model_ends_its_experiment_and_a_late_registration_starts_nothing(
    store: Store, settings: OptimizerSettings
) -> None:
    assert handlers.on_model_registered(registered("ft-1"), store.uow, settings).endswith("running")
    with store.uow() as uow:
        [exp] = uow.repo.experiments(status=domain.RUNNING)
    published(store)
    event = ModelWithdrawn(model_id="ft-1", model="local/ft-1", reason="erased session")
    result = handlers.on_model_withdrawn(event, store.uow)
    assert result["stopped"] == [exp["experiment_id"]]
    assert handlers.on_model_withdrawn(event, store.uow) == {"outcome": "duplicate"}
    concluded = [e for e in published(store) if isinstance(e, ExperimentConcluded)]
    assert [c.experiment_id for c in concluded] == [exp["experiment_id"]] and concluded[0].winner_arm_id is None
    assert views.prompts_view(store.uow(), PROMPT_NAME)[0]["champion"]["model"] == MODEL
    # the same ModelRegistered redelivered (or arriving late) is a duplicate: no new experiment
    assert handlers.on_model_registered(registered("ft-1"), store.uow, settings) == "duplicate"


def test_a_withdrawn_champion_is_rolled_back_to_the_latest_other_model(
    store: Store, settings: OptimizerSettings
) -> None:
    handlers.on_model_registered(registered("ft-2"), store.uow, settings)
    with store.uow() as uow:
        [exp] = uow.repo.experiments(status=domain.RUNNING)
        tuned = next(a for a in uow.repo.arms(exp["experiment_id"]) if not a["is_control"])
    experiments.promote_experiment(exp["experiment_id"], store.uow(), arm_id=tuned["arm_id"])
    assert views.prompts_view(store.uow(), PROMPT_NAME)[0]["champion"]["model"] == "local/ft-2"
    result = handlers.on_model_withdrawn(ModelWithdrawn(model_id="ft-2", model="local/ft-2"), store.uow)
    assert result["rolled_back"] == [PROMPT_NAME]
    assert views.prompts_view(store.uow(), PROMPT_NAME)[0]["champion"]["model"] == MODEL
