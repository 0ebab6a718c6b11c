"""The message bus: which task hears which event, and how messages get onto the queue.

One queue per service, named after it; a task's name starts with its service ("feedback.record"), so the
queue of any task is readable from its name. Services call each other's tasks by name, never by import.

Redis (kombu's virtual transport) drops a message published to an exchange that has no queue bound yet, so
`declare_topology` binds every queue of the system before anything is published; every process calls it
when it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from celery import Celery
from kombu import Exchange, Queue

from shared.contracts import Command, Event, Message

log = logging.getLogger(__name__)

SERVICES: tuple[str, ...] = ("router", "feedback", "optimizer", "finetune", "dashboard")

#: event type -> the tasks that subscribe to it. This table is the whole event wiring of the system.
SUBSCRIPTIONS: Mapping[str, tuple[str, ...]] = {
    "explanation.created": (
        "feedback.on_explanation_created",
        "optimizer.on_explanation_created",
        "finetune.on_explanation_created",
        "dashboard.on_explanation_created",
    ),
    "feedback.recorded": (
        "optimizer.on_feedback_recorded",
        "finetune.on_feedback_recorded",
        "dashboard.on_feedback_recorded",
    ),
    "feedback.erased": (
        "optimizer.on_feedback_erased",
        "finetune.on_feedback_erased",
        "dashboard.on_feedback_erased",
    ),
    "prompt.champion_changed": ("router.on_champion_changed", "dashboard.on_champion_changed"),
    "experiment.started": ("router.on_experiment_started", "dashboard.on_experiment_started"),
    "experiment.allocation_changed": ("router.on_allocation_changed",),
    "experiment.concluded": ("router.on_experiment_concluded", "dashboard.on_experiment_concluded"),
    "model.registered": (
        "router.on_model_registered",
        "optimizer.on_model_registered",
        "dashboard.on_model_registered",
    ),
    "finetune.progress": ("dashboard.on_finetune_progress",),
}


def queue_for(task_name: str) -> str:
    service = task_name.split(".", 1)[0]
    if service not in SERVICES:
        raise ValueError(f"task {task_name!r} does not start with a known service name {SERVICES}")
    return service


def all_queues() -> list[Queue]:
    return [Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True) for name in SERVICES]


def make_celery(service: str, settings: Any) -> Celery:
    """A Celery app for one service: at-least-once delivery (ack after the handler ran, requeue when the
    worker dies), one message prefetched at a time, JSON only, no result backend (no task waits on another)."""
    app = Celery(service, broker=settings.redis_url)
    app.conf.update(
        task_queues=all_queues(),
        task_default_queue=service,
        task_routes=[_route_by_prefix],
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # A message taken by a worker that died is delivered again after this many seconds.
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout_s // 2))),
            "unacked_restore_throttle": 1,
        },
        broker_pool_limit=settings.broker_pool_limit,
        timezone="UTC",
    )
    return app


def _route_by_prefix(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict:
    try:
        return {"queue": queue_for(name)}
    except ValueError:
        return {}


def declare_topology(app: Celery) -> None:
    """Bind every queue of the system, so no message is dropped for want of a binding."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in all_queues():
            queue(channel).declare()


class Publisher(Protocol):
    def publish(self, event: Event) -> None: ...
    def send(self, command: Command) -> None: ...


class CeleryBus:
    """Publishes events to every subscribed task and sends commands to their one handler, by name."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def publish(self, event: Event) -> None:
        for task_name in SUBSCRIPTIONS.get(event.type, ()):
            self._send(task_name, event)

    def send(self, command: Command) -> None:
        self._send(command.type, command)

    def _send(self, task_name: str, message: Message) -> None:
        self.app.send_task(
            task_name,
            kwargs={"payload": message.to_payload()},
            queue=queue_for(task_name),
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.1, "interval_step": 0.2},
        )


class FakeBus:
    """Records what would have been published: for unit tests of handlers."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.commands: list[Command] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def send(self, command: Command) -> None:
        self.commands.append(command)

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in [*self.events, *self.commands] if isinstance(m, cls)]


def publish_all(bus: Publisher, events: Iterable[Event]) -> None:
    for event in events:
        bus.publish(event)
