"""The message bus: which task hears which event, and how messages get onto the queue.

One queue per service, named after it; a task's name starts with its service ("feedback.record"), so the
queue of any task is readable from its name. Services call each other's tasks by name, never by import.

Redis (kombu's virtual transport) drops a message published to an exchange that has no queue bound yet, so
`declare_topology` binds every queue of the system before anything is published; every process calls it
when it starts.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, Retry
from celery.signals import before_task_publish
from celery_batches import Batches as _Batches
from kombu import Exchange, Queue

from shared import redis_transport, worker_metrics
from shared.clock import utcnow
from shared.contracts import SERVICES, Command, Event, Message, new_id

log = logging.getLogger(__name__)

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
        "router.on_feedback_erased",
        "optimizer.on_feedback_erased",
        "finetune.on_feedback_erased",
        "dashboard.on_feedback_erased",
    ),
    "prompt.champion_changed": ("router.on_champion_changed", "dashboard.on_champion_changed"),
    "experiment.started": ("router.on_experiment_started", "dashboard.on_experiment_started"),
    "experiment.allocation_changed": ("router.on_allocation_changed",),
    "experiment.concluded": ("router.on_experiment_concluded", "dashboard.on_experiment_concluded"),
    "prompt.search_exhausted": ("dashboard.on_search_exhausted",),
    "model.registered": (
        "router.on_model_registered",
        "optimizer.on_model_registered",
        "dashboard.on_model_registered",
    ),
    "model.withdrawn": ("router.on_model_withdrawn", "optimizer.on_model_withdrawn"),
    "finetune.progress": ("dashboard.on_finetune_progress",),
}

#: The subscribers of the two busiest events, which take them many to a task message: a relay's batch goes to
#: each of them as messages of up to `TASK_BATCH_SIZE` events (`{"payloads": [...]}`) instead of one message
#: per event, so a consumer pays the broker's and Celery's per-message work once per batch of events. Each is a
#: batch consumer (`BatchTask`, registered by `event_tasks`), which unpacks a message into its events.
#: The votes too: the feedback intake sends the votes of one group commit (`services.feedback.intake`) as
#: messages of up to `TASK_BATCH_SIZE` votes to `feedback.record`.
MANY_TO_A_MESSAGE: frozenset[str] = frozenset(
    [*SUBSCRIPTIONS["explanation.created"], *SUBSCRIPTIONS["feedback.recorded"], "feedback.record"]
)


#: What Celery shows of a task's arguments in logs and monitoring: payloads may carry comments.
REDACTED_KWARGS = "{'payload': '<redacted>'}"


@before_task_publish.connect
def _redact_task_arguments(headers: dict | None = None, **_: Any) -> None:
    if headers is not None and "kwargsrepr" in headers:
        headers["kwargsrepr"] = REDACTED_KWARGS


def queue_for(task_name: str) -> str:
    service = task_name.split(".", 1)[0]
    if service not in SERVICES:
        raise ValueError(f"task {task_name!r} does not start with a known service name {SERVICES}")
    return service


def all_queues() -> list[Queue]:
    return [Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True) for name in SERVICES]


def is_transient(exc: BaseException) -> bool:
    """Errors that a later attempt can get past: a locked or unreachable database, a broker hiccup, a network
    error, and a unique-key clash (two workers storing the same redelivered message at once: the retry finds
    it already handled)."""
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError
    from sqlalchemy.exc import DisconnectionError, IntegrityError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    transient: tuple[type[BaseException], ...] = (
        OperationalError,
        DisconnectionError,
        PoolTimeout,
        IntegrityError,
        redis.ConnectionError,
        redis.TimeoutError,
        redis.BusyLoadingError,
        KombuOperationalError,
        ConnectionError,
        TimeoutError,
    )
    try:
        import httpx

        transient += (httpx.TransportError,)
    except ImportError:  # pragma: no cover - httpx is a core dependency
        pass
    return isinstance(exc, transient)


class ReliableTask(Task):
    """The base of every task: what happens when a handler raises.

    - A task with a payload (a message): a transient error (`is_transient`) is retried with exponential
      backoff and jitter (`TASK_MAX_RETRIES`, `TASK_RETRY_BACKOFF_S`, capped below the visibility timeout);
      a payload that does not validate (a bad message, an unknown schema version), any other error, or
      retries exhausted: the message goes to the service's dead-letter store with the error, and is
      acknowledged, so the queue goes on. If even the dead-letter store cannot be written, the message is put
      back on the queue (after a pause) rather than dropped.
    - A periodic task (no payload, sent by beat): the error is logged once; the next tick runs it again.

    The error is logged without the payload, and a validation error without the input values pydantic would
    quote (a comment, a session key).
    """

    max_retries: int | None = None  # None: TASK_MAX_RETRIES; a task sets its own with `@app.task(max_retries=...)`

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (Retry, Reject):
            raise
        except Exception as exc:
            return self._handle_failure(exc, kwargs.get("payload"))

    def _handle_failure(
        self, exc: Exception, payload: Any, *, retries: int | None = None, retry_later: Any = None
    ) -> Any:
        """Retry, dead-letter or put back one message whose handler raised. `retries` and `retry_later(countdown)`
        are given by a batch task (`BatchTask`), whose messages are not the task's current request."""
        import time

        from pydantic import ValidationError

        from shared.deadletter import EXHAUSTED, FAILED, INVALID, describe_error

        error = describe_error(exc)
        if payload is None:
            log.error("periodic task %s failed (the next run tries again): %s", self.name, error)
            return None
        if retries is None:
            retries = int(self.request.retries or 0)
        max_retries = (
            self.max_retries if self.max_retries is not None else self.app.conf.get("selflearn_max_retries", 6)
        )
        transient = is_transient(exc) and not isinstance(exc, ValidationError)
        reason = INVALID if isinstance(exc, ValidationError) else FAILED
        if transient and retries < max_retries:
            countdown = self._backoff(retries)
            log.warning(
                "%s: transient %s, retry %d of %d in %.1fs",
                self.name,
                type(exc).__name__,
                retries + 1,
                max_retries,
                countdown,
            )
            try:
                if retry_later is not None:
                    retry_later(countdown)
                    return "retried"
                # the error Celery logs with the retry: described, never with a statement's parameters
                raise self.retry(countdown=countdown, max_retries=max_retries, exc=RuntimeError(error))
            except Retry:
                raise
            except Exception as retry_exc:  # the broker is down too: keep the message in the dead letters
                error = f"{error} (and the retry could not be queued: {describe_error(retry_exc)})"
                reason = EXHAUSTED
        elif transient:
            reason = EXHAUSTED
        sink = getattr(self.app, "dead_letter_sink", None)
        try:
            if sink is None:
                raise RuntimeError(f"no dead-letter store is installed for {self.app.main}")
            sink(self.name, reason=reason, error=error, payload=payload, attempts=retries + 1)
        except Exception as dl_exc:
            log.error(
                "%s: could not dead-letter a message (%s); putting it back on the queue",
                self.name,
                describe_error(dl_exc),
            )
            time.sleep(1.0)
            raise Reject(describe_error(dl_exc), requeue=True) from None
        return f"dead-lettered: {reason}"

    def _backoff(self, retries: int) -> float:
        import random

        conf = self.app.conf
        base = float(conf.get("selflearn_retry_backoff_s", 1.0))
        cap = float(conf.get("selflearn_retry_backoff_max_s", 60.0))
        delay = min(cap, base * (2**retries))
        return delay * random.uniform(0.5, 1.0)  # jitter: redeliveries of one outage do not come back together


def batch_size() -> int:
    """How many messages a batch task digests in one transaction at most (`TASK_BATCH_SIZE`, 100)."""
    return max(1, int(os.environ.get("TASK_BATCH_SIZE", "100")))


def batch_wait_s() -> float:
    """How long a batch task waits for more messages before it digests what it has (`TASK_BATCH_WAIT_MS`, 50)."""
    return max(0.001, float(os.environ.get("TASK_BATCH_WAIT_MS", "50")) / 1000)


class BatchTask(_Batches, ReliableTask):
    """A consumer that digests its messages in batches: up to `TASK_BATCH_SIZE` messages, or what arrived within
    `TASK_BATCH_WAIT_MS`, in one transaction (celery-batches buffers the worker's prefetched messages and
    flushes them as a list). The guarantees of one message hold for each message of a batch:

    - **At least once**: every message of the batch is acknowledged only after the batch returned (its
      transaction committed, its outbox relayed); a worker killed before that leaves them all unacknowledged,
      so Redis delivers them again (and an intake journal, where a service keeps one, re-sends what the kill
      took from the queue). If the batch raised instead of returning, every message is put back on the queue.
    - **Idempotent**: each message runs the service's one-message handler, which checks its message id, in its
      own savepoint of the batch's transaction (`shared.db.run_in_one_transaction`).
    - **Poison alone**: a message that does not validate, or whose handler raises, is rolled back alone and
      retried (transient errors, sent again with backoff) or dead-lettered (`ReliableTask`); the rest of the
      batch commits. A message that even the dead-letter store cannot take is put back on the queue.

    The worker must prefetch at least a batch (`make_celery(..., batches=True)` sets the prefetch multiplier).
    """

    abstract = True
    typing = False
    flush_every = 100
    flush_interval = 0.05

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # ReliableTask's per-message handling is in digest
        return self.run(*args, **kwargs)

    def flush(self, requests: Any) -> Any:
        from celery_batches import SimpleRequest
        from celery_batches.trace import apply_batches_task

        requests = list(requests)
        simple = ([SimpleRequest.from_request(r) for r in requests],)

        def on_return(result: Any) -> None:
            # a list: the positions to put back on the queue; anything else: the batch raised, put back all
            put_back = set(result) if isinstance(result, list) else None
            done = []
            for i, req in enumerate(requests):
                if put_back is None or i in put_back:
                    req.reject(requeue=True)
                else:
                    done.append(req)
            acknowledge_all(done)

        return self._pool.apply_async(apply_batches_task, (self, simple, 0, None), callback=on_return)

    def digest(
        self,
        requests: list[Any],
        parse: Any,
        handle: Any,
        after: Any = None,
    ) -> list[int]:
        """Run one batch: `parse(payload)` every message's payload (one, or the `payloads` of a message that
        carries many: `MANY_TO_A_MESSAGE`), `handle(messages)` the valid ones in chunks of at most
        `TASK_BATCH_SIZE` (one transaction each; returning, in order, (True, outcome) or (False, exception) for
        each), then `after(handled messages)` for each chunk. Returns the positions of the task messages to put
        back on the queue: one goes back whole when any of its payloads must (the others are recognised by
        their message ids when it comes again)."""
        import time

        put_back: set[int] = set()
        valid: list[tuple[int, dict, int, Any]] = []
        for i, req in enumerate(requests):
            retries = int((req.request_dict or {}).get("retries") or 0)
            for payload in payloads_of(req.kwargs or {}):
                try:
                    if not isinstance(payload, dict):
                        raise TypeError("the task message carries no payload object")
                    valid.append((i, payload, retries, parse(payload)))
                except Exception as exc:
                    if not self._settle(exc, payload if isinstance(payload, dict) else {"raw": repr(payload)}, retries):
                        put_back.add(i)
        size = batch_size()
        for start in range(0, len(valid), size):
            chunk = valid[start : start + size]
            try:
                outcomes = handle([message for *_, message in chunk])
            except Exception as exc:  # e.g. the store cannot be opened: each message is retried or dead-lettered
                outcomes = [(False, exc)] * len(chunk)
            handled: list[Any] = []
            for (i, payload, retries, message), (ok, value) in zip(chunk, outcomes, strict=True):
                if ok:
                    handled.append(message)
                elif not self._settle(value, payload, retries):
                    put_back.add(i)
            if handled and after is not None:
                after(handled)
        if put_back:
            time.sleep(1.0)  # as ReliableTask does before it puts a message back: no hot loop
        return sorted(put_back)

    def _settle(self, exc: Exception, payload: dict, retries: int) -> bool:
        """Retry or dead-letter one message of a batch; False when it must go back on the queue."""

        def retry_later(countdown: float) -> None:
            self.apply_async(kwargs={"payload": payload}, countdown=countdown, retries=retries + 1)

        try:
            self._handle_failure(exc, payload, retries=retries, retry_later=retry_later)
        except Reject:
            return False
        return True


def payloads_of(kwargs: Mapping[str, Any]) -> list[Any]:
    """The contract payloads a task message carries: its `payloads` (a message of several events, for a
    consumer in `MANY_TO_A_MESSAGE`), or its one `payload`."""
    many = kwargs.get("payloads")
    if many is None:
        return [kwargs.get("payload")]
    return list(many) if isinstance(many, list) else [many]


def acknowledge_all(requests: list[Any]) -> None:
    """Acknowledge a batch's messages (Celery requests) in one round trip to Redis instead of one each. kombu's
    Redis transport keeps every delivered, unacknowledged message in a hash and a sorted set (restored to the
    queue after the visibility timeout); an acknowledgement removes it from both (its
    `QoS._remove_from_indices`: a ZREM and an HDEL of the tag). Here the tags of all the messages go in one
    ZREM and one HDEL, in one pipeline, then each message is marked acknowledged in this worker as
    `Message.ack` would. Another transport, messages of several channels, or a failure before anything was
    removed: each is acknowledged on its own, as Celery would (a failure is logged; the message comes back
    after the timeout)."""
    from kombu.transport.virtual import QoS

    pending = [r for r in requests if not r.acknowledged]
    if not pending:
        return
    try:
        messages = [r.message for r in pending]
        channel = messages[0].channel
        qos = channel.qos
        index, records = qos.unacked_index_key, qos.unacked_key  # kombu.transport.redis.QoS
        if any(m.channel is not channel for m in messages):
            raise ValueError("messages of several channels")
        tags = [m.delivery_tag for m in messages]
        with qos.pipe_or_acquire() as pipe:
            pipe.zrem(index, *tags).hdel(records, *tags).execute()
    except Exception:
        for r in pending:
            r.acknowledge()
        return
    for r, m in zip(pending, messages, strict=True):
        QoS.ack(qos, m.delivery_tag)  # forgotten by this worker (the Redis QoS's own ack did the removal above)
        m._state = "ACK"
        r.acknowledged = True


def batch_task(
    app: Celery,
    name: str,
    *,
    parse: Any,
    handle: Any = None,
    each: Any = None,
    many: Any = None,
    uow: Any = None,
    after: Any = None,
    size: int | None = None,
) -> BatchTask:
    """Register the batch consumer `name` (see `BatchTask`): `parse(payload) -> message`,
    `handle(messages) -> [(ok, outcome or exception), ...]`, or, the usual case, the one-message handler
    `each(message, uow)` run for every message in its own savepoint of one transaction on `uow()`
    (`shared.db.run_in_one_transaction`); with a set-based handler `many(messages, uow)` as well, the batch
    is digested by `many` and only falls back to `each` if it raises (`shared.db.run_batch`);
    `after(handled messages)` once they are committed (relay the outbox, clear a journal)."""
    if handle is None:
        from shared.db import run_batch, run_in_one_transaction

        def handle(messages: list[Any]) -> list[tuple[bool, Any]]:
            if many is not None:
                return run_batch(uow(), messages, many, each)
            return run_in_one_transaction(uow(), messages, each)

    def run(self: BatchTask, requests: list[Any]) -> list[int]:
        return self.digest(requests, parse, handle, after)

    run.__name__ = name.rsplit(".", 1)[-1]
    return app.task(
        name=name,
        base=BatchTask,
        bind=True,
        flush_every=size or batch_size(),
        flush_interval=batch_wait_s(),
    )(run)


def event_tasks(
    app: Celery,
    handlers: Mapping[str, tuple[Any, Any]],
    uow: Any,
    *,
    after: Any = None,
    batched: Iterable[str] = (),
    many: Mapping[str, Any] | None = None,
) -> dict[str, Task]:
    """Register a consumer for each entry of `handlers`, task name -> (message class, one-message handler):
    the task turns its payload into the message and calls `handler(message, uow())`, then `after()` (relay
    the outbox) once the handler has returned; the task's result is the handler's. Failures are
    `ReliableTask`'s (retried, dead-lettered). The tasks in `MANY_TO_A_MESSAGE`, and those named in `batched`,
    digest their messages in batches instead (`batch_task`: the same handler per message, or the set-based
    handler `many[name]` where there is one). Returns the tasks by name."""
    batched = set(batched) | (MANY_TO_A_MESSAGE & set(handlers))
    many = dict(many or {})
    if batched - set(handlers):
        raise ValueError(f"batched tasks without a handler: {sorted(batched - set(handlers))}")
    if set(many) - batched:
        raise ValueError(f"set-based handlers of tasks that are not batched: {sorted(set(many) - batched)}")

    def consumer(name: str, cls: Any, handler: Any) -> Any:
        def run(payload: dict) -> Any:
            result = handler(cls.from_payload(payload), uow())
            if after is not None:
                after()
            return result

        run.__name__ = run.__qualname__ = name.rsplit(".", 1)[-1]
        return run

    def after_batch(_: list[Any]) -> None:
        after()

    return {
        name: batch_task(
            app,
            name,
            parse=cls.from_payload,
            each=handler,
            many=many.get(name),
            uow=uow,
            after=None if after is None else after_batch,
        )
        if name in batched
        else app.task(name=name)(consumer(name, cls, handler))
        for name, (cls, handler) in handlers.items()
    }


def subscribed_tasks(
    app: Celery,
    service: str,
    handlers: Any,
    uow: Any,
    *,
    after: Any = None,
    own: Mapping[str, Callable[[dict], Any]] | None = None,
) -> dict[str, Task]:
    """Register `service`'s consumers as `SUBSCRIPTIONS` names them, so the table stays the one place that says
    who consumes what: task `<service>.on_x` takes the event of its subscription and calls `handlers.on_x`
    (a module or object), and, where the task takes many events to a message (`MANY_TO_A_MESSAGE`), the
    set-based `handlers.on_x_batch` if it has one (`event_tasks`). A task whose handler takes more than the
    message and a unit of work is given in `own`, name -> the task's function (`payload -> result`), and
    registered as it is. A subscription with no handler, or an `own` task that subscribes to nothing, is an
    error here, at import, not a message nobody consumes. Returns every subscribed task of the service."""
    from shared.contracts import EVENT_TYPES

    own = dict(own or {})
    table: dict[str, tuple[Any, Any]] = {}
    many: dict[str, Any] = {}
    for event_type, tasks in SUBSCRIPTIONS.items():
        for name in tasks:
            owner, _, short = name.partition(".")
            if owner != service or name in own:
                continue
            handler = getattr(handlers, short, None)
            if not callable(handler):
                raise LookupError(f"{name} subscribes to {event_type!r}, but {handlers.__name__} has no {short}")
            table[name] = (EVENT_TYPES[event_type], handler)
            batch_handler = getattr(handlers, f"{short}_batch", None)
            if name in MANY_TO_A_MESSAGE and callable(batch_handler):
                many[name] = batch_handler
    unknown = set(own) - {name for tasks in SUBSCRIPTIONS.values() for name in tasks if name.startswith(f"{service}.")}
    if unknown:
        raise LookupError(f"tasks given as {service}'s own that subscribe to nothing: {sorted(unknown)}")
    registered = event_tasks(app, table, uow, after=after, many=many)
    return registered | {name: app.task(name=name)(function) for name, function in own.items()}


def use_dead_letters(app: Celery, dead_letters: Any, *, after: Any = None) -> None:
    """Where this service's workers put what they cannot handle: `dead_letters()` returns the service
    store's `DeadLetters`; `after(task, payload)` runs once one is stored (e.g. to drop a journal entry)."""

    def sink(task: str, *, reason: str, error: str, payload: Any, attempts: int) -> None:
        dead_letters().add(task, reason=reason, error=error, payload=payload, attempts=attempts)
        if after is not None:
            after(task, payload)

    app.dead_letter_sink = sink


def worker_app(service: str, settings: Any, dead_letters: Any, *, batches: bool = False, after: Any = None) -> Celery:
    """A service's worker process: its Celery app (`make_celery`), JSON logs as `<service>-worker`, and what a
    task cannot handle going to `dead_letters()`, the service store's (`use_dead_letters`, `after` included)."""
    from shared.logging import configure_logging

    app = make_celery(service, settings, batches=batches)
    configure_logging(f"{service}-worker", settings.log_level)
    use_dead_letters(app, dead_letters, after=after)
    return app


def outbox_relay(app: Celery, service: str, store: Any) -> Any:
    """Publish what the service's store (`store()`) has staged in its outbox, through this worker's bus:
    `relay()` after a task's commit, what this process has just committed, from memory
    (`shared.outbox.relay_committed`: the table is read only when it may hold more), and the periodic task
    `<service>.relay_outbox` (beat), everything pending in the table: what a crash, a failed publication or
    another process left behind. Returns `relay`."""
    from shared.outbox import relay as relay_pending
    from shared.outbox import relay_committed

    def relay(*_: Any) -> int:
        opened = store()
        return relay_committed(opened.factory, opened.outbox, bus_for(app), opened.just_committed)

    def relay_outbox(payload: dict | None = None) -> int:  # beat sends no payload
        opened = store()
        return relay_pending(opened.factory, opened.outbox, bus_for(app))

    app.task(name=f"{service}.relay_outbox")(relay_outbox)
    return relay


def task_message_sender(app: Celery) -> Any:
    """`send(task_name, payload)`: a new task message for a task, by name, on its service's queue."""

    def send(task_name: str, payload: dict[str, Any]) -> None:
        app.send_task(task_name, kwargs={"payload": payload}, queue=queue_for(task_name))

    return send


def make_celery(service: str, settings: Any, *, batches: bool = False) -> Celery:
    """A Celery app for one service: at-least-once delivery (ack after the handler ran, requeue when the
    worker dies), one message prefetched at a time (two batches' worth for a service with batch tasks, which
    buffer them: `BatchTask`), JSON only, no result backend (no task waits on another); failures retried or
    dead-lettered (`ReliableTask`)."""
    app = Celery(service, broker=settings.redis_url, task_cls=ReliableTask)
    retry_cap = max(
        1.0, min(float(getattr(settings, "task_retry_backoff_max_s", 60.0)), settings.visibility_timeout_s / 2)
    )
    app.conf.update(
        selflearn_max_retries=int(getattr(settings, "task_max_retries", 6)),
        selflearn_retry_backoff_s=float(getattr(settings, "task_retry_backoff_s", 1.0)),
        selflearn_retry_backoff_max_s=retry_cap,
        task_queues=all_queues(),
        task_default_queue=service,
        task_routes=[_route_by_prefix],
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=2 * batch_size() if batches else 1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        # kombu's Redis transport, taking a backlog in bulk (BROKER_BULK_TAKE=0: kombu's own, for comparison)
        broker_transport=redis_transport.TRANSPORT if os.environ.get("BROKER_BULK_TAKE", "1") != "0" else "redis",
        broker_transport_options={
            # A message taken by a worker that died is delivered again after this many seconds.
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout_s // 2))),
            "unacked_restore_throttle": 1,
        },
        broker_pool_limit=settings.broker_pool_limit,
        timezone="UTC",
    )
    worker_metrics.install(app, service)
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


class TaskMessageEncoder:
    """Builds the bytes of a Celery task message for a task name and a contract message.

    The message is Celery's task protocol 2 (documented in Celery's "Message Protocol" page: the headers
    below, a body of `[args, kwargs, embed]`), in the envelope kombu's Redis transport writes (virtual
    `Channel.prepare_message` + `basic_publish`: base64 body, persistent delivery, default exchange with
    the queue as routing key). Pushed onto the queue's list, a worker cannot tell it from one sent by
    `send_task`: `tests/integration/test_bus.py` runs it through a real worker, and
    `tests/unit/test_bus_encoding.py` compares the headers with Celery's own `as_task_v2`.
    Built by hand because this is the hot path of feedback intake (about 3x cheaper than `as_task_v2`).
    """

    def __init__(self, app: Celery) -> None:
        from celery.utils.nodenames import anon_nodename

        self.app = app
        self._origin = anon_nodename()
        self._templates: dict[str, tuple[str, str]] = {}

    def encode(self, task_name: str, message: Message) -> tuple[str, bytes]:
        return self._encode(task_name, self.body(message))

    def encode_for(self, task_names: Iterable[str], message: Message) -> list[tuple[str, bytes]]:
        """One message of `message` for each task: the body is built and encoded once for all of them (an
        event goes to every subscriber with the same body; only the headers and the queue differ)."""
        names = list(task_names)
        if not names:
            return []
        body = self.body(message)
        return [self._encode(name, body) for name in names]

    def encode_body(self, task_name: str, body: str) -> tuple[str, bytes]:
        """A message for `task_name` with a body built by `body` or `body_of_many`."""
        return self._encode(task_name, body)

    @staticmethod
    def body(message: Message) -> str:
        """The base64 task body of protocol 2 for `message`: `[args, kwargs, embed]`, the payload as a kwarg.
        The payload's JSON is pydantic's (`Message.payload_json`); the frame around it is fixed text."""
        return TaskMessageEncoder.body_of_one(message.payload_json())

    @staticmethod
    def body_of_one(payload_json: str) -> str:
        """`body` of a payload given as its JSON text."""
        raw = _BODY_HEAD + payload_json + _BODY_TAIL
        return base64.b64encode(raw.encode()).decode()

    @staticmethod
    def body_of(payload_jsons: Sequence[str]) -> str:
        """The body of a message of these payloads (given as their JSON text): one alone is an ordinary message
        of one `payload` (`body_of_one`), several the `payloads` of a message of many (`body_of_many`)."""
        if len(payload_jsons) == 1:
            return TaskMessageEncoder.body_of_one(payload_jsons[0])
        return TaskMessageEncoder.body_of_many(payload_jsons)

    @staticmethod
    def body_of_many(payload_jsons: Iterable[str]) -> str:
        """The body of one message carrying several payloads (given as their JSON text), as the kwarg
        `payloads`: for a consumer that takes many to a message (`MANY_TO_A_MESSAGE`, `payloads_of`)."""
        raw = _MANY_BODY_HEAD + ",".join(payload_jsons) + "]" + _BODY_TAIL
        return base64.b64encode(raw.encode()).decode()

    def envelope(self, task_name: str, *, body: str, task_id: str, delivery_tag: str) -> dict[str, Any]:
        """The envelope kombu writes to the queue, as a dict (what `_encode` fills in, as text, per message)."""
        headers = {
            "lang": "py",
            "task": task_name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": REDACTED_KWARGS,
            "origin": self._origin,
            "ignore_result": False,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        return {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": delivery_tag,
                "delivery_info": {"exchange": "", "routing_key": queue_for(task_name)},
            },
        }

    def _template(self, task_name: str) -> tuple[str, str]:
        """The queue and the envelope of `task_name` as JSON text with `%(body)s`, `%(id)s` and `%(tag)s` where
        the per-message values go: serialised once per task name, filled in per message (the values are
        base64 and UUID text, which JSON writes as they are)."""
        cached = self._templates.get(task_name)
        if cached is None:
            marks = {"body": "\x01body\x01", "id": "\x01id\x01", "tag": "\x01tag\x01"}
            text = json.dumps(
                self.envelope(task_name, body=marks["body"], task_id=marks["id"], delivery_tag=marks["tag"])
            ).replace("%", "%%")
            for slot in marks:
                mark = json.dumps(marks[slot])[1:-1]  # as JSON writes it inside a string
                if text.count(mark) != (3 if slot == "id" else 1):
                    raise ValueError(f"task name {task_name!r} cannot be templated")
                text = text.replace(mark, f"%({slot})s")
            cached = self._templates[task_name] = (queue_for(task_name), text)
        return cached

    def _encode(self, task_name: str, body: str) -> tuple[str, bytes]:
        queue, template = self._template(task_name)
        values = {"body": body, "id": str(new_id()), "tag": str(new_id())}
        return queue, (template % values).encode()


# The frame of a protocol-2 body around its one kwarg, as `json.dumps` writes it.
_BODY_HEAD = '[[], {"payload": '
_BODY_TAIL = '}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
_MANY_BODY_HEAD = '[[], {"payloads": ['


def group_by_queue(messages: Iterable[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    """One LPUSH per queue with every message for it, in order: LPUSH k a b c leaves `a` at the tail, where
    the worker's BRPOP takes from, so the queue stays first in, first out."""
    grouped: dict[str, list[bytes]] = {}
    for key, raw in messages:
        grouped.setdefault(key, []).append(raw)
    return grouped


class CeleryBus:
    """Publishes an event to every subscribed task, and sends a command to its one handler, by name.

    All the task messages of one event go to Redis in one pipelined round trip, retried on connection errors
    until `deadline_s` has passed; `publish` returns only once they are there, or raises. A request path
    keeps the default (about a second: a frozen broker never holds a request longer; the outbox relays the
    event later), a worker may wait longer."""

    def __init__(self, app: Celery, *, deadline_s: float = 1.0, many_to_a_message: bool = True) -> None:
        import redis

        self.app = app
        self.deadline_s = deadline_s
        # False: every event is a message of its own to every subscriber (for comparison: bench.digest)
        self._many = MANY_TO_A_MESSAGE if many_to_a_message else frozenset()
        self._encoder = TaskMessageEncoder(app)
        timeout = max(0.2, min(deadline_s, 5.0))
        self._redis = redis.Redis.from_url(
            app.conf.broker_url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 1.0)
        )

    def publish(self, event: Event) -> None:
        self._push(self._encoder.encode_for(SUBSCRIPTIONS.get(event.type, ()), event))

    def publish_many(self, events: Iterable[Event]) -> None:
        """Several events in one pipelined round trip (the outbox relay of a batch), in order: to a subscriber
        in `MANY_TO_A_MESSAGE`, up to `TASK_BATCH_SIZE` of them in a message; to any other, one message each.
        Each event's JSON is made once, and a body once for all the subscribers that get the same events."""
        events = list(events)
        messages: list[tuple[str, bytes]] = []
        many: dict[str, list[int]] = {}  # subscriber that takes many -> the positions of its events
        for i, event in enumerate(events):
            subscribers = SUBSCRIPTIONS.get(event.type, ())
            messages += self._encoder.encode_for([t for t in subscribers if t not in self._many], event)
            for task in subscribers:
                if task in self._many:
                    many.setdefault(task, []).append(i)
        size = batch_size()
        jsons: dict[int, str] = {}
        bodies: dict[tuple[int, ...], str] = {}
        for task, positions in many.items():
            for start in range(0, len(positions), size):
                chunk = tuple(positions[start : start + size])
                body = bodies.get(chunk)
                if body is None:
                    for i in chunk:
                        if i not in jsons:
                            jsons[i] = events[i].payload_json()
                    body = bodies[chunk] = TaskMessageEncoder.body_of([jsons[i] for i in chunk])
                messages.append(self._encoder.encode_body(task, body))
        self._push(messages)

    def send(self, command: Command) -> None:
        self._push([self._encoder.encode(command.type, command)])

    def ping(self) -> bool:
        """Whether the broker answers (within this bus's socket timeout)."""
        return bool(self._redis.ping())

    def queue_lags(self) -> list[dict[str, Any]]:
        """Per service queue: messages waiting and the age in seconds of the oldest (`worker_metrics.queue_lag`,
        the figures the workers export as `celery_queue_depth` and `celery_queue_oldest_age_seconds`)."""
        out = []
        for queue in SERVICES:
            depth, age = worker_metrics.queue_lag(self._redis, queue)
            out.append({"queue": queue, "depth": depth, "oldest_age_s": None if age is None else round(age, 3)})
        return out

    def _push(self, messages: list[tuple[str, bytes]]) -> None:
        import time

        import redis

        if not messages:
            return
        give_up = time.monotonic() + self.deadline_s
        attempt = 0
        while True:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for key, raws in group_by_queue(messages).items():
                    pipe.lpush(key, *raws)
                pipe.execute()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                attempt += 1
                pause = 0.1 * attempt
                if time.monotonic() + pause >= give_up:
                    raise
                time.sleep(pause)


def api_bus(service: str, settings: Any) -> CeleryBus:
    """The bus of a service's API process: its Celery app (`make_celery`), every queue declared first
    (`declare_topology`), publishing with the request path's short deadline."""
    app = make_celery(service, settings)
    declare_topology(app)
    return CeleryBus(app)


_BUSES: dict[int, CeleryBus] = {}


#: A vote whose explanation's event has not arrived after this long (the event was lost on its way: kombu's Redis
#: transport loses a message taken by a worker killed before it was recorded as unacknowledged) makes its
#: service ask the router for the event again, at every check, for up to MISSING_EVENT_WINDOW_S.
MISSING_EVENT_AFTER_S = float(os.environ.get("MISSING_EVENT_AFTER_S", "30"))
MISSING_EVENT_WINDOW_S = float(os.environ.get("MISSING_EVENT_WINDOW_S", "3600"))


def ask_for_missing_explanations(
    app: Celery,
    uow_factory: Callable[[], Any],
    find: Callable[[Any, datetime, datetime], list[Any]],
    *,
    after_s: float = MISSING_EVENT_AFTER_S,
    window_s: float = MISSING_EVENT_WINDOW_S,
) -> int:
    """Ask the router to publish again (`ResendExplanations`) the `ExplanationCreated` of explanations this
    service holds votes on but never got: `find(repo, since, until)` lists those whose votes arrived between
    `window_s` and `after_s` ago. Every subscriber ignores an event id it has. Returns how many were asked for."""
    from shared.contracts import ResendExplanations

    now = utcnow()
    with uow_factory() as uow:
        missing = find(uow.repo, now - timedelta(seconds=window_s), now - timedelta(seconds=after_s))[:500]
    if missing:
        bus_for(app).send(ResendExplanations(explanation_ids=missing))
    return len(missing)


def missing_explanations_task(app: Celery, service: str, uow_factory: Callable[[], Any]) -> Any:
    """The periodic task `<service>.ask_for_missing_explanations` (beat) of a service that keeps votes beside
    its replica of the explanations: votes whose explanation's event never reached it (its repository's
    `votes_without_explanation`) make it ask the router for the event again; the event, when it comes,
    completes the replica. Returns the task."""

    def ask(payload: dict | None = None) -> int:  # beat sends no payload
        return ask_for_missing_explanations(
            app, uow_factory, lambda repo, since, until: repo.votes_without_explanation(since, until)
        )

    return app.task(name=f"{service}.ask_for_missing_explanations")(ask)


def bus_for(app: Celery) -> CeleryBus:
    """The bus of a worker process: one per Celery app, so every task reuses its Redis connections instead
    of opening new ones per message."""
    bus = _BUSES.get(id(app))
    if bus is None:
        bus = _BUSES[id(app)] = CeleryBus(app, deadline_s=10.0)
    return bus
