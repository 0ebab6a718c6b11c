"""Feedback intake: how an accepted vote gets onto the queue without loss, fast.

- `GroupCommitSender` puts the API's commands on the queue from the async request path, many requests per
  Redis round trip (group commit), each request answered only once its message is in Redis.
- `IntakeJournal` keeps a copy of every accepted command in Redis until the worker has stored it, written in
  the same atomic step as the queue push, and re-sent by a periodic sweep: it covers the one gap kombu's Redis
  transport leaves (a worker killed between taking a message off the queue and recording it as unacknowledged).

The task messages are the bus's own (`shared.bus.TaskMessageEncoder`): a worker cannot tell them from
`send_task`'s.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery

from shared.bus import TaskMessageEncoder, group_by_queue
from shared.contracts import Command

log = logging.getLogger(__name__)


class IntakeJournal:
    """A copy of every accepted command, kept in Redis until its handler has run.

    Why: kombu's Redis transport takes a message off the queue (BRPOP) and only then records it as
    unacknowledged; a worker killed between the two loses that message, and nothing would ever redeliver
    it. The project's transport (`shared.redis_transport`) closes that gap for a worker of one queue on Redis
    6.2 or later; the journal keeps an accepted vote safe whatever the transport does. So the sender writes the
    task message into this journal in the same atomic step as the queue push (one Lua script call), the worker removes it once the handler has committed (`done`), and a periodic
    sweep re-sends whatever has waited longer than a grace period (`overdue`). Handlers are idempotent on
    the message id, so a re-sent command that had in fact been handled is recognised and only costs a lookup.

    One hash: message id -> "<unix time>|<task message>". It holds only what is in flight, so the sweep
    scans it whole.
    """

    def __init__(self, redis_url: str, name: str) -> None:
        self.redis_url = redis_url
        self.hash_key = f"journal:{name}"
        self._sync: Any = None

    def _client(self) -> Any:
        if self._sync is None:
            import redis

            self._sync = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        return self._sync

    def done(self, message_id: uuid.UUID | str) -> None:
        self._client().hdel(self.hash_key, str(message_id))

    def done_many(self, message_ids: Iterable[uuid.UUID | str]) -> None:
        ids = [str(m) for m in message_ids]
        if ids:
            self._client().hdel(self.hash_key, *ids)

    def overdue(self, older_than_s: float, *, limit: int = 1000, on_unreadable: Any = None) -> list[dict[str, Any]]:
        """Payloads of commands journalled more than `older_than_s` ago whose handler has not run; each is
        re-armed for another grace period, so one sweep re-sends it once.

        An entry that cannot be read (a broken stamp or task message) does not stop the sweep: it is handed to
        `on_unreadable(message_id, raw_value, error)` (which dead-letters it) and removed from the journal;
        without a callback it is logged and left where it is."""
        import time

        now = time.time()
        client = self._client()
        found: list[tuple[bytes, bytes, dict[str, Any]]] = []
        unreadable: list[bytes] = []
        for mid, value in client.hscan_iter(self.hash_key, count=500):
            try:
                stamp, _, raw = value.partition(b"|")
                if float(stamp) > now - older_than_s:
                    continue
                payload = task_payload(raw)
                if not isinstance(payload, dict):
                    raise ValueError("the task message's payload is not an object")
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                if on_unreadable is None:
                    log.error("intake journal entry %r cannot be read (%s); skipped", mid, error)
                    continue
                on_unreadable(mid.decode(errors="replace"), value.decode(errors="replace"), error)
                unreadable.append(mid)
                continue
            found.append((mid, raw, payload))
            if len(found) >= limit:
                break
        if unreadable:
            client.hdel(self.hash_key, *unreadable)
        if found:
            client.hset(self.hash_key, mapping={mid: f"{now!r}|".encode() + raw for mid, raw, _ in found})
        return [payload for _, _, payload in found]

    def pending(self) -> int:
        return int(self._client().hlen(self.hash_key))

    def forget_session(self, session_keys: Iterable[str], erased_at: Any, queue: str | None = None) -> int:
        """Remove an erased session's commands from the journal (and the same task messages still waiting on
        `queue`): those with one of its keys submitted at or before `erased_at`, which the worker would drop
        anyway. A later vote of the same session stays. Returns how many entries were removed."""
        from datetime import datetime

        from shared.votes import erased_before

        keys = set(session_keys)
        client = self._client()
        gone: list[tuple[bytes, bytes]] = []
        for mid, value in client.hscan_iter(self.hash_key, count=500):
            try:
                raw = value.partition(b"|")[2]
                payload = task_payload(raw)
                if payload.get("session_key") not in keys:
                    continue
                submitted = datetime.fromisoformat(str(payload.get("submitted_at")))
                if not erased_before(erased_at, submitted):
                    continue
            except Exception:  # unreadable: the sweep dead-letters it
                continue
            gone.append((mid, raw))
        if gone:
            pipe = client.pipeline(transaction=False)
            pipe.hdel(self.hash_key, *[mid for mid, _ in gone])
            if queue:
                for _, raw in gone:
                    pipe.lrem(queue, 0, raw)
            pipe.execute()
        return len(gone)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def task_payload(raw: bytes) -> dict[str, Any]:
    """The contract payload inside a task message written by `TaskMessageEncoder`."""
    envelope = json.loads(raw)
    _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
    return kwargs["payload"]


# Queue push and journal entry in one atomic step: KEYS = queue, journal hash; ARGV = now, then
# (task message, message id) for each command, in order. The journal keeps "<time>|<task message>".
_JOURNAL_PUSH_LUA = """
local stamp = ARGV[1] .. '|'
for i = 2, #ARGV, 2 do
  redis.call('LPUSH', KEYS[1], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i + 1], stamp .. ARGV[i])
end
return (#ARGV - 1) / 2
"""


class GroupCommitSender:
    """Puts commands on the queue from an async hot path, with group commit.

    Each caller awaits until its message is in Redis (so a 202 still means "durably queued"), but the
    messages of all requests that arrive while one write is in flight go to Redis together in the next
    write: one round trip for many requests instead of one each, and no thread hop. The messages are the
    same Celery (protocol 2) messages `send_task` writes (see `TaskMessageEncoder`). With a journal, each
    command is also written to it in the same atomic step, a Lua script (see `IntakeJournal`).
    """

    def __init__(self, app: Celery, journal: IntakeJournal | None = None) -> None:
        import redis.asyncio as aioredis

        self.app = app
        self.journal = journal
        # A frozen broker fails the request within about a second (503, "please retry") instead of holding it.
        self._redis = aioredis.from_url(app.conf.broker_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._encoder = TaskMessageEncoder(app)
        self._pending: list[tuple[str, bytes, Command, Any]] = []
        self._flushing = False
        self._journal_push: Any = None

    async def send(self, command: Command) -> None:
        import asyncio

        key, raw = self._encoder.encode(command.type, command)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((key, raw, command, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        await future

    async def _write(self, batch: list[tuple[str, bytes, Command, Any]]) -> None:
        import time

        by_queue = group_by_queue((key, raw) for key, raw, _, _ in batch)
        if self.journal is None:
            if len(by_queue) == 1:
                ((key, raws),) = by_queue.items()
                await self._redis.lpush(key, *raws)
                return
            pipe = self._redis.pipeline(transaction=False)
            for key, raws in by_queue.items():
                pipe.lpush(key, *raws)
            await pipe.execute()
            return
        if self._journal_push is None:
            self._journal_push = self._redis.register_script(_JOURNAL_PUSH_LUA)
        now = time.time()
        for key in by_queue:  # one atomic script call per queue (one in practice: a sender serves one service)
            args: list[Any] = [repr(now)]
            for k, raw, cmd, _ in batch:
                if k == key:
                    args += [raw, str(cmd.message_id)]
            await self._journal_push(keys=[key, self.journal.hash_key], args=args)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._write(batch)
                except Exception as exc:  # every waiter of this batch learns it was not queued
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_result(None)
        finally:
            self._flushing = False

    async def aclose(self) -> None:
        await self._redis.aclose()
