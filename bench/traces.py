"""Where a session's traces are: every column of every table of SQLite stores, and every key and value in Redis
(Celery task messages decoded). Used by `make chaos` ("erased sessions still found anywhere") and the erasure
tests; the answer is a list of places, empty when nothing is found."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _matcher(needles: Iterable[str], token: re.Pattern[str] | None) -> Any:
    wanted = {n for n in needles if n}
    if token is not None:  # many needles of a known shape: find the tokens, look them up
        return lambda text: {t for t in token.findall(text) if t in wanted}
    return lambda text: {n for n in wanted if n in text}


def found_in_sqlite(
    paths: Iterable[Path], needles: Iterable[str], *, token: re.Pattern[str] | None = None
) -> list[str]:
    """ "file:table.column" for each column of these SQLite files where any needle occurs (values read as text,
    JSON included). With `token`, a regex matching every needle's shape, only its matches are looked up (fast
    for many needles)."""
    match = _matcher(needles, token)
    hits: list[str] = []
    for path in paths:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]:
                    rows = conn.execute(f'SELECT CAST("{column}" AS TEXT) FROM "{table}"')
                    if any(value is not None and match(value) for (value,) in rows):
                        hits.append(f"{Path(path).name}:{table}.{column}")
        finally:
            conn.close()
    return hits


def _readable(item: object) -> str:
    """The value, and inside a Celery task message (as queued, or journalled after "<time>|") its body."""
    value = item if isinstance(item, bytes) else str(item).encode()  # bytes from a client without decode_responses
    text = value.decode(errors="replace")
    raw = value.partition(b"|")[2] if value[:1].isdigit() else value
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, dict) and isinstance(envelope.get("body"), str):
            text += base64.b64decode(envelope["body"]).decode(errors="replace")
    except (ValueError, TypeError):
        pass
    return text


def found_in_redis(url: str, needles: Iterable[str], *, token: re.Pattern[str] | None = None) -> list[str]:
    """ "<redis key> ttl=<seconds>" for each key whose name or value holds a needle (-1: it does not expire)."""
    import redis

    match = _matcher(needles, token)
    client = redis.Redis.from_url(url)
    hits: list[str] = []
    try:
        for name in client.scan_iter(count=1000):
            kind = client.type(name)
            values: list[Any]
            if kind == b"string":
                values = [client.get(name) or b""]
            elif kind == b"list":
                values = client.lrange(name, 0, -1)
            elif kind == b"hash":
                values = [part for item in client.hgetall(name).items() for part in item]
            elif kind == b"set":
                values = list(client.smembers(name))
            elif kind == b"zset":
                values = client.zrange(name, 0, -1)
            else:
                values = []
            if match(name.decode(errors="replace")) or any(match(_readable(v)) for v in values):
                hits.append(f"{name.decode(errors='replace')} ttl={client.ttl(name)}")
    finally:
        client.close()
    return hits
