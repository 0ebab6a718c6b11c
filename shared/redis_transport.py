"""kombu's Redis transport, taking a backlog many messages per round trip (every Celery app of the system uses it:
`shared.bus.make_celery` sets it as the broker transport).

kombu's Redis transport delivers one message per `BRPOP` and then records it as unacknowledged (a sorted set
of delivery times and a hash of the messages, from which a message whose worker died is restored after the
visibility timeout) in a second round trip of its own. A batch consumer (`shared.bus.BatchTask`) prefetches
up to two batches, so under load it paid two round trips per message, about a quarter of a worker's time
(profiled on the feedback and dashboard workers), and a message taken by a worker killed between the two was
lost (`shared.bus.ask_for_missing_explanations` exists for that).

Here, once a `BRPOP` has delivered a message and the channel may take more (the prefetch limit), one Lua
script takes up to that many more from the same queues and records each as unacknowledged in the same atomic
step, as kombu's own bookkeeping would have; they are then delivered without the second round trip. Nothing
is removed from a queue without being recorded, so the messages taken this way have no window of loss at all.
A consumer whose prefetch limit is full takes none this way. Acknowledgement, rejection, restoring at shutdown
and after the visibility timeout are kombu's, unchanged: the records are the ones they read.

The first message of a round had the same window: `BRPOP` removes it before anything records it, and a worker
killed in between lost it (about one message in 40 SIGKILLs under load; an event carried many to a message
would lose a batch of events). So a channel that consumes one queue (every worker of the system) does not pop
to wait: it waits with `BLMOVE queue queue RIGHT RIGHT`, which blocks until the queue has a message and leaves
it where it is (the tail moved to the tail), then takes it, and as many more as the prefetch limit allows,
with the take script above: at every moment a message is either on its queue or recorded as unacknowledged.
A message the script cannot read is popped and handed to kombu, as `BRPOP` would have (kombu rejects it).
A channel of several queues, or a Redis older than 6.2 (no `BLMOVE`), uses kombu's `BRPOP`. The take fills
the prefetch limit where `BRPOP` took one message a round: a solo worker (prefetch 2 under Celery here) holds
two messages more often, and a SIGKILL sends both back (each redelivered; idempotent handlers).
"""

from __future__ import annotations

import time
from queue import Empty
from time import monotonic
from typing import Any

from kombu.log import get_logger
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as VirtualQoS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = get_logger(__name__)

# A Lua function both scripts start with: the delivery info and tag of kombu's JSON envelope, or nothing when the
# item is not one (a message the take cannot record).
_ENVELOPE_LUA = """
local function envelope(item)
  local ok, m = pcall(cjson.decode, item)
  local p = ok and type(m) == 'table' and m['properties']
  local info = type(p) == 'table' and p['delivery_info']
  local tag = type(p) == 'table' and p['delivery_tag']
  if type(info) == 'table' and type(tag) == 'string' then return info, tag end
end
"""

# KEYS: the unacknowledged index (sorted set) and hash, then the queue lists in the order to take from.
# ARGV: at most how many messages, the time to record. Returns [list key, message, ...] pairs flattened.
# A message that is not kombu's JSON envelope is put back where it was and ends the take (kombu is then handed it,
# by its own BRPOP or by `_POP_UNREADABLE_LUA`, and rejects it the way it always has).
_TAKE_LUA = (
    _ENVELOPE_LUA
    + """
local limit, now = tonumber(ARGV[1]), ARGV[2]
local out = {}
for k = 3, #KEYS do
  while #out < 2 * limit do
    local item = redis.call('RPOP', KEYS[k])
    if not item then break end
    local info, tag = envelope(item)
    if not info then
      redis.call('RPUSH', KEYS[k], item)
      return out
    end
    redis.call('ZADD', KEYS[1], now, tag)
    redis.call('HSET', KEYS[2], tag,
      '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
    out[#out + 1] = KEYS[k]
    out[#out + 1] = item
  end
end
return out
"""
)

# KEYS: one queue list. Pops its oldest message only if it is not kombu's JSON envelope (the take script stops
# at such a message); returns it, or nil (the queue is empty, or its oldest message is one the take script reads).
_POP_UNREADABLE_LUA = (
    _ENVELOPE_LUA
    + """
local item = redis.call('LINDEX', KEYS[1], -1)
if not item or envelope(item) then return false end
return redis.call('RPOP', KEYS[1])
"""
)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS; a message the take script already recorded as unacknowledged is only remembered."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel._recorded.pop(delivery_tag, False):
            VirtualQoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._recorded: dict[str, bool] = {}
        self._take_script: Any = None
        self._waiting_on: str | None = None  # the queue a BLMOVE in flight waits on
        self._has_blmove: bool | None = None
        super().__init__(*args, **kwargs)

    def _brpop_start(self, timeout: Any = None) -> None:
        queues = list(self.active_queues)
        if len(queues) != 1 or self.global_keyprefix or not self.ack_emulation or not self._blmove_available():
            self._waiting_on = None
            return super()._brpop_start(timeout)
        queue = queues[0]
        key = self._q_for_pri(queue, 0)
        self._waiting_on = queue
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu declares it None, sets a float
        timeout = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", timeout or 0)

    def _brpop_read(self, **options: Any) -> bool:
        queue, self._waiting_on = self._waiting_on, None
        if queue is None:  # kombu's BRPOP
            delivered = bool(super()._brpop_read(**options))
            if delivered:
                self._take_more()
            return delivered
        try:
            try:
                waited = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next round reconnects
                raise
        finally:
            self._in_poll = False
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()
        if getattr(self, "_closing", False):
            raise Empty()  # closing: take nothing more
        taken = self._take_more(at_least=1)
        if taken:
            self._queue_cycle.rotate(queue)
            return True
        if waited is not None and taken == 0:
            return self._hand_unreadable_to_kombu(queue)
        raise Empty()

    def _hand_unreadable_to_kombu(self, queue: str) -> bool:
        """The queue's oldest message may be one the take script cannot record (not kombu's envelope): pop it,
        only if it is (another consumer may have taken it, and a readable one must never leave unrecorded),
        and let kombu's delivery deal with it, as after its own `BRPOP`."""
        with self.conn_or_acquire() as client:
            item = client.eval(_POP_UNREADABLE_LUA, 1, self._q_for_pri(queue, 0))
        if not item:  # nothing there, or a message the next take reads
            raise Empty()
        self._queue_cycle.rotate(queue)
        self.connection._deliver(loads(bytes_to_str(item)), queue)
        return True

    def _blmove_available(self) -> bool:
        if self._has_blmove is None:
            try:
                with self.conn_or_acquire() as client:
                    version = str(client.info("server").get("redis_version", "0"))
                major, minor = (int(x) for x in (version.split(".") + ["0"])[:2])
                self._has_blmove = (major, minor) >= (6, 2)
            except Exception as exc:  # kombu's BRPOP until the server answers
                log.warning("could not read the Redis version (%r); waiting with BRPOP", exc)
                return False
        return self._has_blmove

    def _room(self) -> int:
        """How many more messages the prefetch limit lets this channel take now (0: none, or no limit set)."""
        qos = self.qos
        if not qos.prefetch_count:
            return 0
        return max(0, int(qos.prefetch_count) - (len(qos._delivered) - len(qos._dirty)))

    def _take_more(self, at_least: int = 0) -> int | None:
        """Take up to the prefetch limit's room (and at least `at_least`) from this channel's queues, each
        recorded as unacknowledged in the same step, and deliver them. Returns how many were taken, None when
        the script could not run."""
        room = max(self._room(), at_least)
        if room <= 0 or self.global_keyprefix or not self.ack_emulation:
            return 0
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in self._active_queues]
        if not keys:
            return 0
        try:
            with self.conn_or_acquire() as client:
                if self._take_script is None:
                    self._take_script = client.register_script(_TAKE_LUA)
                taken = self._take_script(
                    keys=[self.unacked_index_key, self.unacked_key, *keys],
                    args=[room, repr(time.time())],
                    client=client,
                )
        except self.connection.connection_errors + self.connection.channel_errors as exc:
            # The messages stay queued for the next round; anything the script took and recorded before the
            # reply was lost is restored to its queue after the visibility timeout, as a dead worker's messages are.
            log.warning("could not take messages in one round trip: %r", exc)
            return None
        batch = []
        for k in range(0, len(taken), 2):
            payload = loads(bytes_to_str(taken[k + 1]))
            tag = payload["properties"]["delivery_tag"]
            self._recorded[tag] = True
            batch.append((bytes_to_str(taken[k]).rsplit(self.sep, 1)[0], payload, tag))
        delivered = 0
        try:
            for queue, payload, _ in batch:
                self.connection._deliver(payload, queue)
                delivered += 1
        finally:
            if delivered < len(batch):  # a delivery raised: what this worker will not see goes back at once
                self._give_back([tag for _, _, tag in batch[delivered:]])
        return len(batch)

    def _give_back(self, tags: list[str]) -> None:
        """Put taken messages that were not handed to the consumer back at the head of their queues, in their
        order (a message whose delivery raised before the consumer remembered it included)."""
        for tag in reversed(tags):
            if self._recorded.pop(tag, False):
                try:
                    self.qos.restore_by_tag(tag)
                except Exception as exc:  # still recorded: restored after the visibility timeout instead
                    log.warning("could not give back a taken message at once: %r", exc)


class Transport(kombu_redis.Transport):
    Channel = Channel


#: The value of Celery's `broker_transport` setting that selects this transport.
TRANSPORT = f"{__name__}:Transport"
