"""Celery entry points of the dashboard service (queue "dashboard"). Each turns a payload into an event and
calls the handler that updates the read model; the outbox is relayed after the commit."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from services.dashboard import handlers
from services.dashboard.config import get_settings
from services.dashboard.store import Store, outbox
from shared.bus import batch_task, bus_for, make_celery, use_dead_letters
from shared.contracts import (
    ChampionChanged,
    ExperimentConcluded,
    ExperimentStarted,
    ExplanationCreated,
    FeedbackErased,
    FeedbackRecorded,
    FineTuneProgress,
    ModelRegistered,
    SearchExhausted,
)
from shared.logging import configure_logging
from shared.outbox import relay

settings = get_settings()
app = make_celery("dashboard", settings, batches=True)
configure_logging("dashboard-worker", settings.log_level)


@lru_cache
def _store() -> Store:
    return Store(get_settings().db_url)


# What a task cannot handle goes to this service's dead-letter store (shared.bus.ReliableTask).
use_dead_letters(app, lambda: _store().dead_letters)


def _relay() -> None:
    relay(_store().factory, outbox, bus_for(app))


on_explanation_created = batch_task(
    app,
    name="dashboard.on_explanation_created",
    parse=ExplanationCreated.from_payload,
    handle=lambda events: handlers.on_explanation_created_batch(events, _store().uow()),
    after=lambda _: _relay(),
)


on_feedback_recorded = batch_task(
    app,
    name="dashboard.on_feedback_recorded",
    parse=FeedbackRecorded.from_payload,
    handle=lambda events: handlers.on_feedback_recorded_batch(events, _store().uow()),
    after=lambda _: _relay(),
)


@app.task(name="dashboard.on_feedback_erased")
def on_feedback_erased(payload: dict) -> Any:
    result = handlers.on_feedback_erased(FeedbackErased.from_payload(payload), _store().uow())
    _relay()
    return result


@app.task(name="dashboard.on_champion_changed")
def on_champion_changed(payload: dict) -> Any:
    result = handlers.on_champion_changed(ChampionChanged.from_payload(payload), _store().uow())
    _relay()
    return result


@app.task(name="dashboard.on_experiment_started")
def on_experiment_started(payload: dict) -> Any:
    result = handlers.on_experiment_started(ExperimentStarted.from_payload(payload), _store().uow())
    _relay()
    return result


@app.task(name="dashboard.on_experiment_concluded")
def on_experiment_concluded(payload: dict) -> Any:
    result = handlers.on_experiment_concluded(ExperimentConcluded.from_payload(payload), _store().uow())
    _relay()
    return result


@app.task(name="dashboard.on_model_registered")
def on_model_registered(payload: dict) -> Any:
    result = handlers.on_model_registered(ModelRegistered.from_payload(payload), _store().uow())
    _relay()
    return result


@app.task(name="dashboard.on_search_exhausted")
def on_search_exhausted(payload: dict) -> Any:
    result = handlers.on_search_exhausted(SearchExhausted.from_payload(payload), _store().uow())
    _relay()
    return result


@app.task(name="dashboard.on_finetune_progress")
def on_finetune_progress(payload: dict) -> Any:
    result = handlers.on_finetune_progress(FineTuneProgress.from_payload(payload), _store().uow())
    _relay()
    return result


@app.task(name="dashboard.check_anomalies")
def check_anomalies() -> list[dict]:
    s = get_settings()
    policy = handlers.AnomalyPolicy(
        window_s=s.anomaly_window_s,
        baseline_windows=s.anomaly_baseline_windows,
        min_votes=s.anomaly_min_votes,
        alpha=s.anomaly_alpha,
        min_drop=s.anomaly_min_drop,
        history_windows=s.anomaly_history_windows,
        season_windows=s.anomaly_season_windows,
    )
    checks = handlers.check_anomalies(_store().uow(), policy)
    _relay()
    return checks


@app.task(name="dashboard.relay_outbox")
def relay_outbox() -> int:
    return relay(_store().factory, outbox, bus_for(app))
