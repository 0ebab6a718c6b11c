"""Celery entry points of the dashboard service (queue "dashboard"). Each turns a payload into an event and
calls the handler that updates the read model. The dashboard publishes nothing, so there is no outbox to relay."""

from __future__ import annotations

from functools import lru_cache

from services.dashboard import handlers
from services.dashboard.config import get_settings
from services.dashboard.store import Store
from shared.bus import missing_explanations_task, subscribed_tasks, worker_app

settings = get_settings()


@lru_cache
def _store() -> Store:
    return Store(get_settings().db_url)


# What a task cannot handle goes to this service's dead-letter store (shared.bus.ReliableTask).
app = worker_app("dashboard", settings, lambda: _store().dead_letters, batches=True)


#: task -> its registered consumer, one for each of the dashboard's subscriptions (`shared.bus.SUBSCRIPTIONS`),
#: each applying its event to the read model; the busiest two in batches (`shared.bus.MANY_TO_A_MESSAGE`)
EVENT_TASKS = subscribed_tasks(app, "dashboard", handlers, lambda: _store().uow())


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
    return handlers.check_anomalies(_store().uow(), policy)


# Beat: ask the router again for the events of explanations this service holds votes on but never got
ask_for_missing_explanations = missing_explanations_task(app, "dashboard", lambda: _store().uow())
