"""Dead letters: the messages a service could not handle, kept with the error, so nothing acknowledged is lost
and nothing poisonous blocks the queue.

Every service has a `dead_letters` table in its own store. A worker puts a message there when it cannot
succeed: its payload does not validate (a bad message, an unknown schema version), its handler raised
something that is not transient, or a transient error (a locked database, a broker hiccup) outlasted its
retries. The outbox relay and the intake-journal sweep put there what they cannot read, and go on.

Operators list them with `GET /services/<name>/dead-letters` (admin) and send them again, once the cause
is fixed, with `python -m shared.deadletter replay <service>`: each is sent as a new task message with its
original payload; handlers are idempotent on the message id, so a replay of something that had in fact
succeeded is harmless.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from shared.contracts import utcnow

log = logging.getLogger(__name__)

TABLE_NAME = "dead_letters"
MAX_ERROR_CHARS = 2000


def dead_letter_table(metadata: sa.MetaData) -> sa.Table:
    """The dead-letter table, added to a service's metadata (once)."""
    if TABLE_NAME in metadata.tables:
        return metadata.tables[TABLE_NAME]
    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task", sa.String(100), nullable=False),
        sa.Column("message_id", sa.String(64), nullable=True, index=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("payload", sa.JSON, nullable=True),
        sa.Column("raw", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, default=1),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True, index=True),
    )


#: Why a message was dead-lettered.
INVALID = "invalid"  # the payload does not validate (bad message, unknown schema version)
FAILED = "failed"  # the handler raised an error that retrying cannot fix
EXHAUSTED = "retries_exhausted"  # a transient error outlasted the retries
UNREADABLE = "unreadable"  # the relay or the sweep could not even parse it


def describe_error(exc: BaseException) -> str:
    """The error as it goes into the store and the log: a pydantic validation error without the input values
    it would otherwise quote (a comment, a session key), a database error without its statement's parameters
    (the same), anything else as `Type: message`, bounded."""
    from pydantic import ValidationError
    from sqlalchemy.exc import StatementError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_url=False, include_input=False, include_context=False):
            loc = ".".join(str(p) for p in err.get("loc", ())) or "payload"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        text = f"ValidationError: {'; '.join(parts)}"
    elif isinstance(exc, StatementError):
        text = f"{type(exc).__name__}: {exc.orig if exc.orig is not None else 'statement failed'}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text[:MAX_ERROR_CHARS]


class DeadLetters:
    """The dead-letter table of one service store."""

    def __init__(self, factory: sessionmaker[Session], table: sa.Table) -> None:
        self.factory = factory
        self.table = table

    def add(
        self,
        task: str,
        *,
        reason: str,
        error: str,
        payload: Any = None,
        raw: str | None = None,
        message_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        if message_id is None and isinstance(payload, dict):
            message_id = str(payload.get("message_id") or "") or None
        with self.factory() as session, session.begin():
            session.execute(
                self.table.insert().values(
                    task=task,
                    message_id=message_id,
                    reason=reason,
                    error=error[:MAX_ERROR_CHARS],
                    payload=payload if isinstance(payload, dict | list) or payload is None else None,
                    raw=raw,
                    attempts=attempts,
                    created_at=utcnow(),
                )
            )
        from shared.worker_metrics import DEAD_LETTERS

        DEAD_LETTERS.labels(task, reason).inc()
        log.error(
            "dead-lettered a %s message (reason %s, message %s): %s",
            task,
            reason,
            message_id,
            error[:300],
            extra={"task": task, "reason": reason},
        )

    def list(self, *, limit: int = 100, include_replayed: bool = False) -> list[dict[str, Any]]:
        t = self.table
        query = sa.select(t).order_by(t.c.id.desc()).limit(limit)
        if not include_replayed:
            query = query.where(t.c.replayed_at.is_(None))
        with self.factory() as session:
            return [dict(r) for r in session.execute(query).mappings().all()]

    def counts(self) -> dict[str, int]:
        """Waiting (not replayed) dead letters per reason."""
        t = self.table
        with self.factory() as session:
            rows = session.execute(
                sa.select(t.c.reason, sa.func.count()).where(t.c.replayed_at.is_(None)).group_by(t.c.reason)
            ).all()
        return {reason: int(n) for reason, n in rows}

    def mark_replayed(self, ids: Sequence[int]) -> None:  # (`list` here would name the method above)
        if ids:
            with self.factory() as session, session.begin():
                session.execute(sa.update(self.table).where(self.table.c.id.in_(ids)).values(replayed_at=utcnow()))


def for_engine(engine: sa.Engine) -> DeadLetters:
    """The dead letters of a store, from its engine alone (for the replay command and tests)."""
    metadata = sa.MetaData()
    return DeadLetters(sessionmaker(engine, expire_on_commit=False), dead_letter_table(metadata))


def public_view(row: dict[str, Any]) -> dict[str, Any]:
    """A dead letter as the admin route shows it (the payload is included: the route is admin only)."""
    return {
        **{k: v for k, v in row.items() if k not in ("created_at", "replayed_at")},
        "created_at": row["created_at"].isoformat() if row.get("created_at") else None,
        "replayed_at": row["replayed_at"].isoformat() if row.get("replayed_at") else None,
    }


def replay(dead: DeadLetters, send: Any, *, ids: list[int] | None = None, limit: int = 1000) -> tuple[int, int]:
    """Send waiting dead letters again (`send(task_name, payload)`), oldest first, and mark them replayed.
    Unreadable ones (no payload) are skipped. Returns (sent, skipped)."""
    rows = sorted(dead.list(limit=limit), key=lambda r: r["id"])
    if ids:
        rows = [r for r in rows if r["id"] in set(ids)]
    from shared.bus import SUBSCRIPTIONS

    sent: list[int] = []
    skipped = 0
    for row in rows:
        task: str = row["task"]
        # An event the relay could not read goes to each of its subscribers; anything else to its task.
        targets = list(SUBSCRIPTIONS.get(task.partition(":")[2], ())) if task.startswith("outbox:") else [task]
        if not isinstance(row.get("payload"), dict) or not targets:
            skipped += 1
            continue
        for target in targets:
            send(target, row["payload"])
        sent.append(row["id"])
    dead.mark_replayed(sent)
    return len(sent), skipped


def _service_url(service: str) -> str:
    explicit = os.environ.get(f"{service.upper()}_DATABASE_URL")
    if explicit:
        return explicit
    from shared.settings import ServiceSettings

    return ServiceSettings().sqlite_url(service)


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.deadletter list|replay <service> [--id N ...]`: list a service's dead letters, or send
    them again (the same REDIS_URL, DATA_DIR and <SERVICE>_DATABASE_URL as the service)."""
    from shared.contracts import SERVICES

    parser = argparse.ArgumentParser(prog="python -m shared.deadletter", description=main.__doc__)
    parser.add_argument("action", choices=("list", "replay"))
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--id", type=int, action="append", dest="ids", help="only these dead letters (repeatable)")
    parser.add_argument("--url", help="the service's database URL (default: as the service finds it)")
    args = parser.parse_args(argv)
    from shared.db import make_engine

    engine = make_engine(args.url or _service_url(args.service))
    dead = for_engine(engine)
    try:
        if args.action == "list":
            rows = dead.list()
            if not rows:
                print(f"no dead letters in {args.service}")
            for row in rows:
                print(
                    f"{row['id']:>6}  {row['created_at']:%Y-%m-%d %H:%M:%S}  {row['task']:<34} {row['reason']:<18} {row['error'][:120]}"
                )
            return 0
        from shared.bus import make_celery, task_message_sender
        from shared.settings import ServiceSettings

        settings = ServiceSettings()
        sender = task_message_sender(make_celery(args.service, settings))
        sent, skipped = replay(dead, sender, ids=args.ids)
        print(
            f"replayed {sent} dead letter(s) of {args.service}; {skipped} unreadable one(s) left for a person to read"
        )
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())


def forget_session(session: Session, table: sa.Table, keys: list[str]) -> tuple[int, int]:
    """Remove an erased session from this store's dead letters, inside the caller's transaction. A message that
    names one of its keys is rewritten without the session when it can still be replayed without it (an
    explanation's event: its cost and variant still count) and deleted when it was the session's own (a vote:
    replayed, it would be dropped anyway). An erasure itself stays, to be replayed. Returns (rewritten, deleted)."""
    from shared.bus import SUBSCRIPTIONS
    from shared.outbox import redact_session

    event_of_task = {task: event for event, tasks in SUBSCRIPTIONS.items() for task in tasks}
    rewritten = deleted = 0
    for key in [k for k in keys if k]:
        rows = session.execute(
            sa.select(table.c.id, table.c.task, table.c.payload).where(
                sa.or_(sa.cast(table.c.payload, sa.Text).contains(key), table.c.raw.contains(key))
            )
        ).all()
        for row_id, task, payload in rows:
            event_type = task.split(":", 1)[1] if task.startswith("outbox:") else event_of_task.get(task)
            if event_type == "feedback.erased":
                continue  # the erasure itself: kept to be replayed
            redacted = redact_session(event_type, payload, keys) if event_type and isinstance(payload, dict) else None
            if redacted is None:
                session.execute(sa.delete(table).where(table.c.id == row_id))
                deleted += 1
            else:
                session.execute(sa.update(table).where(table.c.id == row_id).values(payload=redacted, raw=None))
                rewritten += 1
    return rewritten, deleted
