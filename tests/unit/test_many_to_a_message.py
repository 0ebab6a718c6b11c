"""Events many to a task message (`shared.bus.MANY_TO_A_MESSAGE`): the encoded body, and a batch consumer
that unpacks such a message keeps the guarantees of one message for each event in it."""

from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from shared.bus import TaskMessageEncoder, batch_task, make_celery, payloads_of
from shared.bus import use_dead_letters as install_dead_letters
from shared.settings import ServiceSettings
from tests.support import explanation_created


def _app() -> Any:
    return make_celery("feedback", ServiceSettings(redis_url="redis://127.0.0.1:1/0"), batches=True)


def test_a_body_of_many_is_celerys_protocol_2_with_the_payloads_as_one_kwarg() -> None:
    events = [explanation_created(ticker=t) for t in ("AMD", "IBM", 'A "quoted" %(id)s')]
    encoder = TaskMessageEncoder(_app())
    queue, raw = encoder.encode_body(
        "feedback.on_explanation_created", encoder.body_of_many(e.payload_json() for e in events)
    )
    envelope = json.loads(raw)
    assert queue == "feedback" and envelope["headers"]["task"] == "feedback.on_explanation_created"
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == [] and embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert list(kwargs) == ["payloads"]
    assert [type(events[0]).from_payload(p) for p in payloads_of(kwargs)] == events


def test_payloads_of_a_message_of_one_or_of_many() -> None:
    assert payloads_of({"payload": {"a": 1}}) == [{"a": 1}]
    assert payloads_of({"payloads": [{"a": 1}, {"b": 2}]}) == [{"a": 1}, {"b": 2}]
    assert payloads_of({"payloads": {"a": 1}}) == [{"a": 1}]  # not a list: one payload, judged as such
    assert payloads_of({}) == [None]


class _Sink:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.letters: list[tuple[str, Any]] = []

    def add(self, task: str, *, reason: str, payload: Any = None, **_: Any) -> None:
        if self.fail:
            raise RuntimeError("the dead-letter store is down")
        self.letters.append((reason, payload))


def _request(**kwargs: Any) -> SimpleNamespace:
    return SimpleNamespace(kwargs=kwargs, request_dict={"retries": 0})


def test_each_event_of_a_message_is_handled_or_dead_lettered_alone_in_chunks_of_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASK_BATCH_SIZE", "3")
    app = _app()
    sink = _Sink()
    install_dead_letters(app, lambda: sink)
    handled: list[list[int]] = []
    transactions: list[list[int]] = []

    def parse(payload: dict) -> int:
        return int(payload["n"])

    def handle(ns: list[int]) -> list[tuple[bool, object]]:
        transactions.append(ns)
        return [(False, RuntimeError("boom")) if n == 13 else (True, n) for n in ns]

    task = batch_task(app, name="feedback.test_many", parse=parse, handle=handle)
    requests = [
        _request(payloads=[{"n": 1}, {"n": "x"}, {"n": 2}, {"n": 13}, {"n": 3}]),
        _request(payload={"n": 4}),
        _request(payloads=[{"n": 5}, None]),
    ]
    assert task.digest(requests, parse, handle, handled.append) == []  # nothing goes back on the queue
    assert transactions == [[1, 2, 13], [3, 4, 5]]  # at most TASK_BATCH_SIZE events a transaction
    assert handled == [[1, 2], [3, 4, 5]]
    assert [reason for reason, _ in sink.letters] == ["failed"] * 3  # "x", 13 and the missing payload
    assert [payload for _, payload in sink.letters] == [{"n": "x"}, {"raw": "None"}, {"n": 13}]


def test_a_message_goes_back_whole_when_one_of_its_events_cannot_even_be_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the pause before a message goes back
    app = _app()
    sink = _Sink(fail=True)
    install_dead_letters(app, lambda: sink)

    def handle(ns: list[int]) -> list[tuple[bool, object]]:
        return [(False, RuntimeError("boom")) if n == 13 else (True, n) for n in ns]

    task = batch_task(app, name="feedback.test_many_back", parse=lambda p: int(p["n"]), handle=handle)
    requests = [_request(payloads=[{"n": 1}, {"n": 13}]), _request(payload={"n": 2})]
    handled: list[list[int]] = []
    # the first message goes back on the queue whole (its event 1 is recognised by its id when it comes again)
    assert task.digest(requests, lambda p: int(p["n"]), handle, handled.append) == [0]
    assert handled == [[1, 2]]


def test_the_age_of_a_message_of_many_is_its_oldest_events() -> None:
    from datetime import UTC, datetime, timedelta

    from shared.worker_metrics import oldest_age_s

    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    older, newer = (explanation_created(occurred_at=now - timedelta(seconds=s)) for s in (30, 5))
    encoder = TaskMessageEncoder(_app())
    _, raw = encoder.encode_body(
        "dashboard.on_explanation_created", encoder.body_of_many([older.payload_json(), newer.payload_json()])
    )
    assert oldest_age_s(raw, now=now.timestamp()) == 30.0
