"""Celery entry points of the finetune service (queue "finetune"). Each turns a payload into a message and
calls the handler; the outbox is relayed after the commit.

`finetune.start_job` is not acks_late: a long job must not be delivered again while it runs (or after its
worker died); the job's heartbeat and `finetune.watchdog` deal with a lost worker instead.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from services.finetune import handlers, jobs
from services.finetune.config import get_settings
from services.finetune.store import ModelRow, Store
from shared.bus import outbox_relay, subscribed_tasks, worker_app
from shared.contracts import FeedbackErased, StartFineTune

settings = get_settings()
# torch reads these when it is first imported (inside the training edge, on the first job): one thread per
# worker by default, so a job shares the machine with the other services (FINETUNE_TORCH_THREADS).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(settings.torch_threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A job trains on one GPU: on a machine with several, transformers would wrap the model in nn.DataParallel, which
# trl's trainers refuse. The first is used unless CUDA_VISIBLE_DEVICES says otherwise (read at CUDA's first use).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")


@lru_cache
def _store() -> Store:
    return Store(get_settings().db_url)


# What a task cannot handle goes to this service's dead-letter store (shared.bus.ReliableTask).
app = worker_app("finetune", settings, lambda: _store().dead_letters, batches=True)


_relay = outbox_relay(app, "finetune", _store)


def _on_feedback_erased(payload: dict) -> dict[str, Any] | None:
    record = handlers.on_feedback_erased(FeedbackErased.from_payload(payload), _store().uow())
    _relay()  # ModelWithdrawn for every model its data reached
    return None if record is None else {k: v for k, v in record.items() if k != "erased_at"}


#: task -> its registered consumer, one for each of finetune's subscriptions (`shared.bus.SUBSCRIPTIONS`), each
#: keeping its event as training material, in batches (`shared.bus.MANY_TO_A_MESSAGE`); the erasure relays the
#: ModelWithdrawn it stages (above)
EVENT_TASKS = subscribed_tasks(
    app, "finetune", handlers, lambda: _store().uow(), own={"finetune.on_feedback_erased": _on_feedback_erased}
)


def _ack_now(task_id: str | None) -> bool:
    """Acknowledge this task's message now. Celery runs the early ack (acks_late=False) as a callback on the
    worker's event loop, which a task in the solo pool blocks until it returns: without this, a job's message
    stays unacked for the whole run, and Redis puts it back on the queue after the visibility timeout (or after
    the worker is killed). Only for kombu's virtual transports (Redis), where the later second ack is a no-op."""
    from celery.worker import state
    from kombu.transport.virtual import Channel as VirtualChannel

    for request in list(state.active_requests):
        if request.id == task_id:
            message = request.message
            if isinstance(message.channel, VirtualChannel):
                message.channel.basic_ack(message.delivery_tag)
                return True
    return False


@app.task(name="finetune.start_job", acks_late=False, bind=True, max_retries=0)  # a job is never run twice
def start_job(self: Any, payload: dict) -> str:
    _ack_now(self.request.id)
    settings = get_settings()
    announce = None
    if settings.serving_base_url:  # an external server (vLLM): load the adapter there once it is registered
        url, key = settings.serving_base_url, settings.serving_key()

        def announce(model: ModelRow) -> None:
            jobs.load_adapter_on_server(url, model, key=key)

    try:
        cmd = StartFineTune.from_payload(payload)
    except ValidationError as exc:  # sent by name from outside: record why, when it names a job
        handlers.reject_payload(_store(), payload, f"invalid finetune.start_job payload: {exc.errors()[0]['msg']}")
        _relay()
        return "failed"
    runner = jobs.JobRunner(_store(), settings, _relay, on_registered=announce)
    if settings.training_device == "cuda" and not _has_cuda():
        state = runner.wait_queued(cmd, "for a worker with a GPU (FINETUNE_TRAINING_DEVICE=cuda)")
    else:
        state = runner.start(cmd)
    if state == jobs.BUSY:  # another job runs: this one stays queued and comes back later
        cmd = cmd.model_copy(update={"job_id": runner.job_id_of(cmd)})
        start_job.apply_async(kwargs={"payload": cmd.to_payload()}, countdown=settings.busy_retry_s)
    return state


def _has_cuda() -> bool:
    return bool(handlers.load_training().cuda_available())


@app.task(name="finetune.watchdog")
def watchdog() -> list[str]:
    failed = jobs.watchdog(_store(), get_settings())
    _relay()
    return failed


@app.task(name="finetune.sync_serving")
def sync_serving() -> dict[str, Any]:
    """Load every registered adapter the serving engine lacks (e.g. after it restarted); unload withdrawn ones."""
    return jobs.sync_serving(_store(), get_settings())


@app.task(name="finetune.retrain")
def retrain(payload: dict) -> str:
    """Queue message {"model_id": ...}: train that model again (same base, method, recipe) from today's data."""
    cmd = handlers.retrain_command(_store().uow(), str(payload.get("model_id", "")))
    cmd = cmd.model_copy(update={"job_id": jobs.JobRunner.job_id_of(cmd)})
    start_job.apply_async(kwargs={"payload": cmd.to_payload()})
    return cmd.job_id or ""
