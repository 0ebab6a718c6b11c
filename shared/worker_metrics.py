"""What operators scaling workers need to see, as Prometheus series from every worker: per-queue depth and the
age of its oldest waiting message (the lag), task durations by outcome, failures, retries and dead letters.

- Task series come from Celery's signals, in whichever process runs the task. Under the prefork pool (compose's
  `-c 2`) those are child processes: set `PROMETHEUS_MULTIPROC_DIR` (compose does) and the worker's metrics
  page aggregates every child's files, as prometheus_client's multiprocess mode does for gunicorn.
- Queue series are read from Redis when the page is scraped: `LLEN` of the queue and the timestamp carried in
  the oldest message's payload (`occurred_at`, every event and command has one). kombu pushes with LPUSH and
  takes from the right end, so the oldest message is the list's last element.
- The page: `WORKER_METRICS_PORT` (unset or 0: no page; `make run` leaves it off, compose sets 9808). It is an
  operational page only: names of tasks and queues, counts and durations, nothing about users or votes.

`install(app, service)` is called by `shared.bus.make_celery`; the signal handlers are connected once per
process, whatever the number of apps.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from celery import Celery, signals
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from shared.clock import as_utc

log = logging.getLogger(__name__)

TASK_SECONDS = Histogram(
    "celery_task_duration_seconds",
    "Time a task took, by task name and outcome (success, failure, retry)",
    ["task", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TASK_FAILURES = Counter(
    "celery_task_failures_total", "Tasks that raised, by task name and exception", ["task", "exception"]
)
TASK_RETRIES = Counter("celery_task_retries_total", "Task retries scheduled, by task name", ["task"])
DEAD_LETTERS = Counter(
    "celery_task_dead_letters_total",
    "Messages put into the service's dead-letter store, by task and reason (shared.deadletter)",
    ["task", "reason"],
)

_started: dict[str, float] = {}
_connected = False


def _task_name(sender: Any, task: Any = None) -> str:
    return str(getattr(task or sender, "name", None) or "unknown")


def _on_prerun(task_id: str = "", **_: Any) -> None:
    _started[task_id] = time.perf_counter()


def _on_postrun(task_id: str = "", task: Any = None, state: str | None = None, sender: Any = None, **_: Any) -> None:
    began = _started.pop(task_id, None)
    if began is not None:
        outcome = {"SUCCESS": "success", "FAILURE": "failure", "RETRY": "retry"}.get(state or "", (state or "").lower())
        TASK_SECONDS.labels(_task_name(sender, task), outcome or "unknown").observe(time.perf_counter() - began)


def _on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    TASK_FAILURES.labels(_task_name(sender), type(exception).__name__ if exception else "unknown").inc()


def _on_retry(sender: Any = None, **_: Any) -> None:
    TASK_RETRIES.labels(_task_name(sender)).inc()


def oldest_age_s(raw: bytes | str | None, now: float | None = None) -> float | None:
    """Seconds since the message's payload says it occurred; None when the message carries no such time."""
    if raw is None:
        return None
    try:
        envelope = json.loads(raw)
        body = envelope.get("body")
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, *_ = json.loads(body)
        payload = kwargs.get("payload") or (kwargs.get("payloads") or [None])[0] or (args[0] if args else {})
        occurred = datetime.fromisoformat(str(payload["occurred_at"]).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return max(0.0, (now if now is not None else time.time()) - as_utc(occurred).timestamp())


def queue_lag(client: Any, queue: str) -> tuple[int, float | None]:
    """(messages waiting, age in seconds of the oldest) for one kombu queue on Redis."""
    depth = int(client.llen(queue))
    return depth, oldest_age_s(client.lindex(queue, -1)) if depth else 0.0


class QueueCollector(Collector):
    """`celery_queue_depth` and `celery_queue_oldest_age_seconds` per queue, read from Redis at scrape time."""

    def __init__(self, redis_url: str, queues: Iterable[str]) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self.queues = tuple(queues)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("celery_queue_depth", "Messages waiting in the queue", labels=["queue"])
        age = GaugeMetricFamily(
            "celery_queue_oldest_age_seconds", "Age of the oldest waiting message (the lag)", labels=["queue"]
        )
        for queue in self.queues:
            try:
                n, oldest = queue_lag(self.client, queue)
            except Exception:  # a scrape must not fail because Redis is away: the series is simply missing
                log.warning("could not read the depth of queue %s", queue)
                continue
            depth.add_metric([queue], float(n))
            if oldest is not None:
                age.add_metric([queue], oldest)
        yield depth
        yield age


def serve(port: int, redis_url: str, queues: Iterable[str]) -> None:
    """Start the worker's metrics page (in the main process of the worker)."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(QueueCollector(redis_url, queues))
    start_http_server(port, registry=registry)
    log.info("worker metrics on :%d for queues %s", port, ", ".join(queues))


def install(app: Celery, service: str) -> None:
    """Connect the task signals (once per process), and start the metrics page when the worker is ready."""
    global _connected
    if not _connected:
        signals.task_prerun.connect(_on_prerun, weak=False)
        signals.task_postrun.connect(_on_postrun, weak=False)
        signals.task_failure.connect(_on_failure, weak=False)
        signals.task_retry.connect(_on_retry, weak=False)
        _connected = True

    def _ready(sender: Any = None, **_: Any) -> None:
        port = int(os.environ.get("WORKER_METRICS_PORT") or 0)
        consumer_app = getattr(sender, "app", None)
        if port and (consumer_app is None or consumer_app is app):
            queues = [q.name for q in app.amqp.queues.consume_from.values()] or [service]
            serve(port, str(app.conf.broker_url), queues)

    signals.worker_ready.connect(_ready, weak=False)
