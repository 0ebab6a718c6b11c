"""The hand-built task messages match what Celery itself would send (protocol 2)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

from shared.bus import REDACTED_KWARGS, TaskMessageEncoder, make_celery, queue_for
from shared.contracts import RecordFeedback
from shared.settings import ServiceSettings


def _cmd() -> RecordFeedback:
    return RecordFeedback(
        feedback_id=uuid.uuid4(),
        explanation_id=uuid.uuid4(),
        session_key="k",
        rating=1,
        comment="a private comment",
        submitted_at=datetime.now(UTC),
    )


def test_encoded_headers_and_body_match_celerys_protocol_2() -> None:
    app = make_celery("feedback", ServiceSettings(redis_url="redis://127.0.0.1:1/0"))
    cmd = _cmd()
    queue, raw = TaskMessageEncoder(app).encode(cmd.type, cmd)
    envelope = json.loads(raw)
    headers, properties, body, _ = app.amqp.as_task_v2(
        envelope["headers"]["id"],
        cmd.type,
        (),
        {"payload": cmd.to_payload()},
        argsrepr="()",
        kwargsrepr=REDACTED_KWARGS,
    )
    assert queue == "feedback"
    assert set(envelope["headers"]) == set(headers)
    for key in ("lang", "task", "id", "root_id", "retries", "argsrepr", "kwargsrepr"):
        assert envelope["headers"][key] == headers[key], key
    decoded = json.loads(base64.b64decode(envelope["body"]))
    assert decoded[1] == body[1] and decoded[2] == body[2] and list(decoded[0]) == list(body[0])
    assert set(properties) <= set(envelope["properties"])
    assert envelope["properties"]["delivery_info"] == {"exchange": "", "routing_key": "feedback"}


def test_task_arguments_are_not_shown_in_logs_or_monitoring() -> None:
    app = make_celery("feedback", ServiceSettings(redis_url="redis://127.0.0.1:1/0"))
    _, raw = TaskMessageEncoder(app).encode("feedback.record", _cmd())
    headers = json.loads(raw)["headers"]
    assert "private" not in headers["kwargsrepr"] and headers["kwargsrepr"] == REDACTED_KWARGS


def test_an_event_for_several_subscribers_is_one_message_each_with_the_same_body() -> None:
    from shared.bus import SUBSCRIPTIONS
    from shared.contracts import FeedbackRecorded

    app = make_celery("feedback", ServiceSettings(redis_url="redis://127.0.0.1:1/0"))
    encoder = TaskMessageEncoder(app)
    cmd = _cmd()
    event = FeedbackRecorded(
        feedback_id=cmd.feedback_id, explanation_id=cmd.explanation_id, session_key="k", rating=1, stars=None,
        has_comment=True, replaced=False, submitted_at=cmd.submitted_at, prompt_name="p", prompt_version="v1",
        model="m", signal="BUY", ticker="AAPL",
    )  # fmt: skip
    names = list(SUBSCRIPTIONS[event.type])
    assert len(names) >= 2
    out = encoder.encode_for(names, event)
    one_by_one = [encoder.encode(name, event) for name in names]
    assert [q for q, _ in out] == [q for q, _ in one_by_one]
    envelopes = [json.loads(raw) for _, raw in out]
    assert [e["headers"]["task"] for e in envelopes] == names
    assert len({e["headers"]["id"] for e in envelopes}) == len(names)  # a task id and a delivery tag each
    assert len({e["properties"]["delivery_tag"] for e in envelopes}) == len(names)
    assert {e["body"] for e in envelopes} == {json.loads(one_by_one[0][1])["body"]}
    for (queue, _), e in zip(out, envelopes, strict=True):
        assert e["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
    assert encoder.encode_for([], event) == []


def test_the_templated_message_is_the_one_json_dumps_would_write() -> None:
    """Envelope and body are filled into text serialised once per task; decoded, each is what `json.dumps` of
    the dicts gives: a command with awkward text, an event with nested models and a float out of range."""
    from shared.contracts import ArmSpec, ExperimentStarted, PromptTemplate

    app = make_celery("feedback", ServiceSettings(redis_url="redis://127.0.0.1:1/0"))
    encoder = TaskMessageEncoder(app)
    cmd = RecordFeedback(
        feedback_id=uuid.uuid4(), explanation_id=uuid.uuid4(), session_key="k", rating=1,
        comment='a "quoted" comment, 100% \u00e9 \u2028 \\ end %(id)s', submitted_at=datetime.now(UTC),
    )  # fmt: skip
    prompt = PromptTemplate(name="p", version="v1 \u00e9", template="Explain {signal} %s")
    started = ExperimentStarted(
        experiment_id="e", prompt_name="p",
        arms=[ArmSpec(arm_id="a", prompt=prompt, model="m", weight=float("inf")),
              ArmSpec(arm_id="b", prompt=prompt, model="m", weight=1e-7, is_control=True)],
    )  # fmt: skip
    for message, name in ((cmd, "feedback.record"), (started, "router.on_experiment_started")):
        queue, raw = encoder.encode(name, message)
        envelope = json.loads(raw)
        expected = encoder.envelope(
            name,
            body=encoder.body(message),
            task_id=envelope["headers"]["id"],
            delivery_tag=envelope["properties"]["delivery_tag"],
        )
        assert envelope == expected
        assert queue == expected["properties"]["delivery_info"]["routing_key"] == queue_for(name)
        assert envelope["headers"]["id"] == envelope["headers"]["root_id"] == envelope["properties"]["correlation_id"]
        decoded = json.loads(base64.b64decode(envelope["body"]))
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        assert decoded == json.loads(json.dumps([[], {"payload": message.to_payload()}, embed]))
        assert type(message).from_payload(decoded[1]["payload"]) == message
