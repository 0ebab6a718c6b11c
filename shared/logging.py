"""Structured (JSON lines) logging that never writes a raw session id or a user's comment.

Fields named in `REDACTED_FIELDS` are dropped from `extra=` data, and any value that looks like it came
from one (a `session_id=...` or `comment=...` fragment in a message) is masked.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

REDACTED_FIELDS = frozenset(
    {"session_id", "comment", "authorization", "admin_token", "session_hash_key", "session_hash_keys"}
)
_INLINE = re.compile(r"(?i)\b(session_id|comment|authorization)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)")
# pydantic quotes the input in a validation error ("input_value={'comment': ...}, input_type=dict"): all of it goes.
_INPUT_VALUE = re.compile(r"input_value=.*?(?=, input_type=|\]\n|\n|$)", re.DOTALL)
# SQLAlchemy quotes a failed statement's parameters ("[parameters: ('comment text', ...)]"): all of them go.
_SQL_PARAMETERS = re.compile(r"\[parameters: .*?\](?=\s*(\n|\(Background|$))", re.DOTALL)
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def _service_of(logger_name: str, default: str) -> str:
    """The service a log line comes from: its module's service when it has one (several services share a
    process in the embedded gateway), else the process's own name."""
    if logger_name.startswith("services."):
        return logger_name.split(".", 2)[1]
    return default


def redact(text: str) -> str:
    text = _INPUT_VALUE.sub("input_value=[redacted]", text)
    text = _SQL_PARAMETERS.sub("[parameters: redacted]", text)
    return _INLINE.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": _service_of(record.name, self.service),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _STD_ATTRS or key.startswith("_"):
                continue
            entry[key] = "[redacted]" if key.lower() in REDACTED_FIELDS else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old.formatter, JsonFormatter):  # installed by an earlier call: replaced, not doubled
            root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's access log prints request paths, which carry session ids on DELETE: keep it quiet.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
