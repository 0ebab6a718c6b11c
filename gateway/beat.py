"""Celery beat: the system's clock. It only sends tasks by name; the services do the work."""

from __future__ import annotations

import os

from celery import Celery

from shared.bus import all_queues, queue_for
from shared.contracts import SERVICES
from shared.settings import ServiceSettings

#: The services with a transactional outbox to relay (the dashboard publishes nothing: it has none).
OUTBOX_SERVICES = tuple(s for s in SERVICES if s != "dashboard")


def _every(env: str, default: float) -> float:
    return float(os.environ.get(env, default))


def schedule() -> dict[str, dict]:
    entries = {
        "optimizer.run_decisions": _every("OPTIMIZER_DECISION_INTERVAL_S", 60),
        "optimizer.generate_variants": _every("OPTIMIZER_GENERATION_CHECK_INTERVAL_S", 3600),
        "finetune.watchdog": _every("FINETUNE_WATCHDOG_INTERVAL_S", 30),
        "dashboard.check_anomalies": _every("DASHBOARD_ANOMALY_INTERVAL_S", 300),
        "feedback.sweep_journal": _every("FEEDBACK_JOURNAL_SWEEP_INTERVAL_S", 60),
        # votes whose explanation's event was lost on its way here: ask the router for it again
        "optimizer.ask_for_missing_explanations": _every("MISSING_EVENT_CHECK_INTERVAL_S", 60),
        "dashboard.ask_for_missing_explanations": _every("MISSING_EVENT_CHECK_INTERVAL_S", 60),
    }
    for service in OUTBOX_SERVICES:
        entries[f"{service}.relay_outbox"] = _every("OUTBOX_RELAY_INTERVAL_S", 10)
    return {
        name: {"task": name, "schedule": seconds, "options": {"queue": queue_for(name), "expires": seconds}}
        for name, seconds in entries.items()
    }


settings = ServiceSettings()
app = Celery("beat", broker=settings.redis_url)
app.conf.update(
    task_queues=all_queues(),
    beat_schedule=schedule(),
    timezone="UTC",
    broker_connection_retry_on_startup=True,
    task_serializer="json",
)
