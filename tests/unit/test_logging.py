from __future__ import annotations

import json
import logging

from shared.logging import JsonFormatter


def _line(name: str, msg: str, **extra: object) -> dict:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(record, k, v)
    return json.loads(JsonFormatter("gateway").format(record))


def test_session_ids_and_comments_never_reach_the_log() -> None:
    line = _line(
        "services.feedback.api", "vote session_id=abc-123 comment='call me on 555'", session_id="abc-123", comment="hi"
    )
    text = json.dumps(line)
    assert "abc-123" not in text and "555" not in text and "hi" not in line.values()
    assert line["session_id"] == "[redacted]" and line["comment"] == "[redacted]"


def test_each_line_names_the_service_of_its_module_even_in_a_shared_process() -> None:
    assert _line("services.router.api", "x")["service"] == "router"
    assert _line("uvicorn.error", "x")["service"] == "gateway"


def test_a_validation_error_in_a_failure_log_shows_no_input_values() -> None:
    from pydantic import ValidationError

    from shared.contracts import RecordFeedback

    payload = {"rating": 7, "comment": "my private note", "session_key": "raw-session-42"}
    try:
        RecordFeedback.from_payload(payload)
    except ValidationError as exc:
        record = logging.LogRecord("celery.app.trace", logging.ERROR, __file__, 1, "task failed: %s", (exc,), None)
        try:
            raise exc
        except ValidationError:
            import sys

            record.exc_info = sys.exc_info()
        text = JsonFormatter("feedback-worker").format(record)
    assert "my private note" not in text and "raw-session-42" not in text
    assert "input_value=[redacted]" in text


def test_a_failed_statement_logs_and_dead_letters_without_its_parameters() -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError

    from shared.deadletter import describe_error

    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(text("create table votes (comment text unique)"))
        conn.execute(text("insert into votes values (:c)"), {"c": "call me on 555"})
    try:
        with engine.begin() as conn:
            conn.execute(text("insert into votes values (:c)"), {"c": "call me on 555"})
    except IntegrityError as exc:
        record = logging.LogRecord("celery.app.trace", logging.ERROR, __file__, 1, "retry: %s", (exc,), None)
        line = JsonFormatter("feedback-worker").format(record)
        described = describe_error(exc)
    assert "555" not in line and "[parameters: redacted]" in line
    assert described == "IntegrityError: UNIQUE constraint failed: votes.comment"
