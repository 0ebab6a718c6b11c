"""`shared.bus.event_tasks`: one table per service from task name to (message, handler) registers its consumers."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from shared.bus import BatchTask, event_tasks, make_celery
from shared.contracts import ChampionChanged, FeedbackErased, utcnow
from shared.settings import ServiceSettings


def _app() -> Any:
    return make_celery("router", ServiceSettings(redis_url="redis://127.0.0.1:1/0"))


def test_a_task_parses_its_payload_calls_the_handler_with_a_fresh_unit_of_work_then_after() -> None:
    calls: list[Any] = []
    uows = iter(["uow-1", "uow-2"])

    def erase(event: FeedbackErased, uow: str) -> str:
        calls.append((event, uow))
        return "erased"

    tasks = event_tasks(
        _app(),
        {"router.on_feedback_erased": (FeedbackErased, erase)},
        lambda: next(uows),
        after=lambda: calls.append("after"),
    )
    event = FeedbackErased(session_key="k", feedback_ids=[uuid.uuid4()], explanation_ids=[], erased_at=utcnow())
    task = tasks["router.on_feedback_erased"]
    assert task.name == "router.on_feedback_erased" and not isinstance(task, BatchTask)
    assert task(payload=event.to_payload()) == "erased"
    assert calls == [(event, "uow-1"), "after"]


def test_batched_tasks_are_batch_consumers_and_a_batched_name_must_have_a_handler() -> None:
    handlers = {"router.on_champion_changed": (ChampionChanged, lambda event, uow: "changed")}
    tasks = event_tasks(_app(), handlers, lambda: None, batched=["router.on_champion_changed"])
    assert isinstance(tasks["router.on_champion_changed"], BatchTask)
    with pytest.raises(ValueError, match="router.on_model_withdrawn"):
        event_tasks(_app(), handlers, lambda: None, batched=["router.on_model_withdrawn"])


def test_a_service_registers_its_subscriptions_with_handlers_found_by_task_name(monkeypatch: Any) -> None:
    import types

    from shared import bus
    from shared.contracts import EVENT_TYPES

    seen: dict[str, Any] = {}

    def recorded(app: Any, table: Any, uow: Any, **kw: Any) -> dict[str, Any]:
        seen.update(table=table, **kw)
        return dict.fromkeys(table, "generic")

    monkeypatch.setattr(bus, "event_tasks", recorded)
    names = {t.partition(".")[2]: e for e, tasks in bus.SUBSCRIPTIONS.items() for t in tasks if t[:10] == "optimizer."}
    handlers = types.SimpleNamespace(**{n: (lambda e, u, n=n: n) for n in names}, on_feedback_recorded_batch=len)
    handlers.__name__ = "optimizer handlers"

    def withdrawn(payload: dict) -> str:
        return "withdrawn by the service's own task"

    app = _app()
    tasks = bus.subscribed_tasks(
        app, "optimizer", handlers, lambda: None, own={"optimizer.on_model_withdrawn": withdrawn}
    )
    assert seen["table"] == {
        f"optimizer.{n}": (EVENT_TYPES[e], getattr(handlers, n)) for n, e in names.items() if n != "on_model_withdrawn"
    }
    # the set-based handler of a task that takes many events to a message; none for a task without one
    assert seen["many"] == {"optimizer.on_feedback_recorded": len}
    # every subscription is registered, the service's own task as it is
    assert set(tasks) == {f"optimizer.{n}" for n in names}
    assert tasks["optimizer.on_model_withdrawn"].name == "optimizer.on_model_withdrawn"
    assert tasks["optimizer.on_model_withdrawn"](payload={}) == "withdrawn by the service's own task"

    handlers.on_feedback_erased = "not a handler"
    with pytest.raises(LookupError, match="optimizer.on_feedback_erased subscribes to 'feedback.erased'"):
        bus.subscribed_tasks(_app(), "optimizer", handlers, lambda: None)
    with pytest.raises(LookupError, match="optimizer.on_nothing"):
        bus.subscribed_tasks(
            _app(),
            "optimizer",
            handlers,
            lambda: None,
            own={"optimizer.on_feedback_erased": len, "optimizer.on_nothing": len},
        )
