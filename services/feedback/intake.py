"""Feedback intake: how an accepted vote gets onto the queue without loss, fast.

- `GroupCommitSender` puts the API's commands on the queue from the async request path, many requests per
  Redis round trip (group commit), each request answered only once its message is in Redis.
- `IntakeJournal` keeps a copy of every accepted command in Redis until the worker has stored it, written in
  the same atomic step as the queue push, and re-sent by a periodic sweep: it covers the one gap kombu's Redis
  transport leaves (a worker killed between taking a message off the queue and recording it as unacknowledged).

The task messages are the bus's own (`shared.bus.TaskMessageEncoder`): a worker cannot tell them from
`send_task`'s. The votes of one group commit go as messages of up to `TASK_BATCH_SIZE` votes each (the batch
consumer `feedback.record` is in `shared.bus.MANY_TO_A_MESSAGE`); an erasure rewrites such a message without
the erased session's votes (`IntakeJournal.forget_session`).
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery

from shared.bus import MANY_TO_A_MESSAGE, TaskMessageEncoder, batch_size, group_by_queue, queue_for
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

    One hash: message id -> "<unix time>|<the command's payload, JSON>" (an entry of an earlier version holds
    a whole task message there instead; both are read). It holds only what is in flight, so the sweep scans
    it whole.
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
        """Remove an erased session's commands from the journal (and from the task messages still waiting on
        `queue`: `forget_in_queue`): those with one of its keys submitted at or before `erased_at`, which the
        worker would drop anyway. A later vote of the same session stays. Returns how many entries were
        removed."""
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
            client.hdel(self.hash_key, *[mid for mid, _ in gone])
            if queue:
                forget_in_queue(client, queue, {mid.decode() for mid, _ in gone})
        return len(gone)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def task_payload(raw: bytes) -> dict[str, Any]:
    """The command's payload in a journal entry: the payload's JSON, or (an entry of an earlier version) a
    task message of one command written by `TaskMessageEncoder`."""
    value = json.loads(raw)
    if isinstance(value, dict) and "body" in value and "headers" in value:
        _, kwargs, _ = _task_body(value)
        return kwargs["payload"]
    return value


def _task_body(envelope: dict[str, Any]) -> list[Any]:
    """`[args, kwargs, embed]` of a task message's envelope (protocol 2, base64 body)."""
    return json.loads(base64.b64decode(envelope["body"]))


def forget_in_queue(client: Any, queue: str, message_ids: set[str], *, chunk: int = 500) -> int:
    """Take the commands `message_ids` out of the task messages waiting on `queue`: a message left with none
    of its commands is removed, one with others too is rewritten without them (the same task id and delivery
    tag). Each change is one atomic step that applies only if the message is still there as it was read
    (`_REPLACE_LUA`); a worker that took it meanwhile handles the commands itself (a vote cast before its
    session's erasure is dropped).

    The queue is read in chunks from the head, where new messages come; workers take from the other end. A
    message moves towards the head only when one before it is removed: the reading counts this call's own
    removals, and the queue is read again (up to five rounds) when a change found its message rewritten by
    another erasure, or when a command was not found at all (another erasure's removal may have moved its
    message past the reading; or a worker has it). Returns how many commands were taken out."""
    replace = client.register_script(_REPLACE_LUA)
    taken = 0
    found: set[str] = set()
    for round_ in range(5):
        missed = False
        start = 0
        while True:
            raws = client.lrange(queue, start, start + chunk - 1)
            if not raws:
                break
            removed = 0
            for raw in raws:
                rewritten, hit = _without(raw, message_ids)
                if not hit:
                    continue
                found |= hit
                if replace(keys=[queue], args=[raw, rewritten]):
                    taken += len(hit)
                    if not rewritten:  # the messages after it have moved one place towards the head
                        removed += 1
                else:
                    missed = True
            start += len(raws) - removed
        if not missed and (found >= message_ids or round_ > 0):
            break
    return taken


def _without(raw: bytes, message_ids: set[str]) -> tuple[bytes, set[str]]:
    """A task message without the commands `message_ids` (b"" when none of its commands is left), and which
    of them it had; (b"", empty) for a message with none of them, or one that cannot be read (the worker
    dead-letters it)."""
    try:
        envelope = json.loads(raw)
        args, kwargs, embed = _task_body(envelope)
        payloads = kwargs["payloads"] if "payloads" in kwargs else [kwargs.get("payload")]
        ids = [str(p.get("message_id")) if isinstance(p, dict) else None for p in payloads]
    except Exception:
        return b"", set()
    hit = {i for i in ids if i in message_ids}
    if not hit:
        return b"", hit
    kept = [p for p, i in zip(payloads, ids, strict=True) if i not in hit]
    if not kept:
        return b"", hit
    kwargs["payloads"] = kept
    envelope["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()
    return json.dumps(envelope).encode(), hit


# Queue push and journal entry in one atomic step: KEYS = queue, journal hash; ARGV = now, the number of task
# messages, the task messages (in order), then (message id, payload JSON) for each command. The journal keeps
# "<time>|<payload JSON>".
_JOURNAL_PUSH_LUA = """
local stamp = ARGV[1] .. '|'
local n = tonumber(ARGV[2])
for i = 3, n + 2 do
  redis.call('LPUSH', KEYS[1], ARGV[i])
end
for i = n + 3, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], stamp .. ARGV[i + 1])
end
return n
"""

# Replace a task message where it stands on the queue, if it is still there as read: KEYS = queue; ARGV = the
# message as read, its replacement (empty: remove it). Returns 1 when it was there.
_REPLACE_LUA = """
local i = redis.call('LPOS', KEYS[1], ARGV[1])
if not i then
  return 0
end
if ARGV[2] == '' then
  redis.call('LREM', KEYS[1], 1, ARGV[1])
else
  redis.call('LSET', KEYS[1], i, ARGV[2])
end
return 1
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
        self._pending: list[tuple[Command, str, Any]] = []
        self._flushing = False
        self._journal_push: Any = None

    async def send(self, command: Command) -> None:
        import asyncio

        future = asyncio.get_running_loop().create_future()
        self._pending.append((command, command.payload_json(), future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        await future

    def _messages(self, batch: list[tuple[Command, str, Any]]) -> list[tuple[str, bytes]]:
        """The task messages of a group commit, in order: for a task in `MANY_TO_A_MESSAGE`, its commands
        `TASK_BATCH_SIZE` to a message (one alone is an ordinary message of one `payload`); any other, one
        message each."""
        by_task: dict[str, list[str]] = {}
        for command, payload_json, _ in batch:
            by_task.setdefault(command.type, []).append(payload_json)
        size = batch_size()
        out: list[tuple[str, bytes]] = []
        for task, jsons in by_task.items():
            step = size if task in MANY_TO_A_MESSAGE else 1
            for start in range(0, len(jsons), step):
                out.append(self._encoder.encode_body(task, TaskMessageEncoder.body_of(jsons[start : start + step])))
        return out

    async def _write(self, batch: list[tuple[Command, str, Any]]) -> None:
        import time

        by_queue = group_by_queue(self._messages(batch))
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
        for key, raws in by_queue.items():  # one atomic script call per queue (one: a sender serves one service)
            args: list[Any] = [repr(now), len(raws), *raws]
            for cmd, payload_json, _ in batch:
                if queue_for(cmd.type) == key:
                    args += [str(cmd.message_id), payload_json]
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
