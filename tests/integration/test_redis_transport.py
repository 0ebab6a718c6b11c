"""The Redis transport every Celery app uses (shared.redis_transport) against a real redis-server: a backlog is
taken many messages per round trip, each recorded as unacknowledged in the same atomic step (so a consumer that
dies holding them loses none: they come back after the visibility timeout), within the prefetch limit; a
consumer that takes one at a time behaves as kombu's own transport; a message that is not kombu's envelope is
put back and left to kombu's handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from gateway.redis_server import RedisServer
from shared.redis_transport import TRANSPORT
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
QUEUE = Queue("transport-test", Exchange("transport-test", type="direct"), routing_key="transport-test")


@pytest.fixture()
def server(tmp_path: Any) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as s:
        yield s


@pytest.fixture()
def r(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def _connection(url: str, **options: Any) -> Connection:
    return Connection(url, transport=TRANSPORT, transport_options={"visibility_timeout": 1, **options})


@pytest.fixture()
def conn(server: RedisServer) -> Iterator[Connection]:
    with _connection(server.url) as connection:
        yield connection


def _publish(conn: Connection, n: int, start: int = 0) -> None:
    with conn.channel() as channel:
        producer = Producer(channel)
        for i in range(start, start + n):
            producer.publish({"i": i}, exchange=QUEUE.exchange, routing_key=QUEUE.routing_key, declare=[QUEUE])


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def _consume(conn: Connection, prefetch: int, callback: Callable[[Any, Any], None]) -> tuple[Any, Consumer]:
    """A consumer of QUEUE on a new channel of `conn`, with this prefetch limit, handing each message to
    `callback`: the channel and the consumer."""
    channel = conn.channel()
    consumer = Consumer(channel, [QUEUE], callbacks=[callback], accept=["json"])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    return channel, consumer


def _take(conn: Connection, prefetch: int, rounds: int = 5) -> tuple[list[Any], Any]:
    """Consume with this prefetch limit without acknowledging: the messages delivered, and the channel."""
    got: list[Any] = []
    channel, _ = _consume(conn, prefetch, lambda body, message: got.append(message))
    for _ in range(rounds):
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            break
    return got, channel


def test_a_backlog_is_taken_in_bulk_and_each_taken_message_is_recorded_unacknowledged(
    conn: Connection, r: redis.Redis
) -> None:
    _publish(conn, 120)
    brpops = _calls(r, "brpop")
    got, channel = _take(conn, prefetch=50)
    # the prefetch limit holds: 50 taken (one by BRPOP, the rest by one script call), 70 left queued
    assert len(got) == 50
    assert sorted(m.payload["i"] for m in got) == list(range(50))  # oldest first
    assert r.llen("transport-test") == 70
    assert _calls(r, "brpop") - brpops <= 2  # not one per message
    # each one recorded as kombu records an unacknowledged message: in the index and in the hash
    assert r.zcard("unacked_index") == 50 and r.hlen("unacked") == 50
    for m in got:
        record = r.hget("unacked", m.delivery_tag)
        assert record is not None
        raw, exchange, routing_key = json.loads(record)
        assert (exchange, routing_key) == ("transport-test", "transport-test")
        assert raw["properties"]["delivery_tag"] == m.delivery_tag
    for m in got[:20]:
        m.ack()
    assert r.zcard("unacked_index") == 30 and r.hlen("unacked") == 30
    channel.close()  # a consumer that closes its channel gives back what it did not acknowledge, as kombu's
    assert r.llen("transport-test") == 100 and r.hlen("unacked") == 0


_CONSUMER = """
import sys, time
from kombu import Connection, Consumer, Exchange, Queue
from shared.redis_transport import TRANSPORT
queue = Queue("transport-test", Exchange("transport-test", type="direct"), routing_key="transport-test")
with Connection(sys.argv[1], transport=TRANSPORT, transport_options={"visibility_timeout": 1}) as conn:
    consumer = Consumer(conn.channel(), [queue], callbacks=[lambda body, message: None], accept=["json"])
    consumer.qos(prefetch_count=30)
    consumer.consume()
    while True:
        try:
            conn.drain_events(timeout=0.5)
        except TimeoutError:
            time.sleep(0.1)
"""


def test_messages_taken_by_a_consumer_killed_holding_them_come_back_after_the_visibility_timeout(
    server: RedisServer, r: redis.Redis
) -> None:
    with _connection(server.url) as conn:
        _publish(conn, 30)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CONSUMER, server.url], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        wait_for(lambda: r.llen("transport-test") == 0 and r.hlen("unacked") == 30, timeout_s=30, what="all taken")
    finally:
        proc.send_signal(signal.SIGKILL)  # no restore at shutdown: the consumer is gone holding all 30
        proc.wait()
    assert r.llen("transport-test") == 0 and r.zcard("unacked_index") == 30
    with _connection(server.url) as other:
        channel = other.channel()

        def restored() -> bool:
            channel.qos.restore_visible(num=100)
            return r.llen("transport-test") == 30

        wait_for(restored, timeout_s=10, interval_s=0.3, what="the taken messages restored after the timeout (1 s)")
        assert r.hlen("unacked") == 0
        again, channel2 = _take(other, prefetch=30)
        assert sorted(m.payload["i"] for m in again) == list(range(30))
        for m in again:
            m.ack()
        channel2.close()
        channel.close()


def test_a_consumer_of_one_message_at_a_time_takes_one_and_records_it_in_the_same_step(
    conn: Connection, r: redis.Redis
) -> None:
    _publish(conn, 10)
    brpops = _calls(r, "brpop")
    got, channel = _take(conn, prefetch=1, rounds=1)
    assert len(got) == 1 and r.llen("transport-test") == 9
    assert r.hlen("unacked") == 1 and r.zcard("unacked_index") == 1
    assert _calls(r, "brpop") == brpops  # waited with BLMOVE, taken by the script
    got[0].ack()
    channel.close()


def test_waiting_for_a_message_takes_nothing_so_a_consumer_killed_then_loses_nothing(
    conn: Connection, r: redis.Redis
) -> None:
    """kombu's BRPOP removed the message before anything recorded it: a worker killed between the two lost it.
    The wait now leaves the message on its queue; the take that follows records it in the same atomic step."""
    _publish(conn, 1)
    got: list[Any] = []
    channel, _ = _consume(conn, 1, lambda body, message: got.append(message))
    conn.transport.cycle._register_BRPOP(channel)  # as the worker's event loop: sends the wait
    wait_for(lambda: _calls(r, "blmove") == 1, timeout_s=5, what="the wait answered")
    # the wait has been answered and nothing is taken yet: a kill here leaves the message on its queue
    assert r.llen("transport-test") == 1 and r.hlen("unacked") == 0 and not got
    assert channel._brpop_read()
    assert [m.payload["i"] for m in got] == [0]
    assert r.llen("transport-test") == 0 and r.hlen("unacked") == 1
    got[0].ack()
    waited_on = channel.client.connection
    channel.close()
    waited_on.disconnect()  # the wait's connection, which the worker's event loop would close


def test_a_message_that_is_not_kombus_envelope_is_put_back_for_kombu_to_handle(
    conn: Connection, r: redis.Redis
) -> None:
    _publish(conn, 3)
    r.lpush("transport-test", b"not json at all")  # behind the three, at the left end
    _publish(conn, 2, start=3)
    got, channel = _take(conn, prefetch=50, rounds=1)
    # the take stopped at the bad message, which is back where it was, nothing lost on either side of it
    assert [m.payload["i"] for m in got] == [0, 1, 2]
    assert r.lindex("transport-test", -1) == b"not json at all"
    assert r.llen("transport-test") == 3
    assert r.hlen("unacked") == 3
    for m in got:
        m.ack()
    channel.close()


def test_after_a_wait_only_a_message_the_take_cannot_read_is_popped_unrecorded(
    conn: Connection, r: redis.Redis
) -> None:
    """When a wait's take finds nothing it can record, the oldest message is handed to kombu only if it is not
    kombu's envelope: a readable one (another consumer's race) stays queued for the next take."""
    from queue import Empty

    _publish(conn, 1)
    channel = conn.channel()
    with pytest.raises(Empty):
        channel._hand_unreadable_to_kombu("transport-test")
    assert r.llen("transport-test") == 1 and r.hlen("unacked") == 0  # still queued, for the next take
    r.rpush("transport-test", b"not json at all")  # now the oldest
    with pytest.raises(ValueError):  # kombu's delivery cannot read it, as after its own BRPOP
        channel._hand_unreadable_to_kombu("transport-test")
    assert r.llen("transport-test") == 1 and r.hlen("unacked") == 0
    channel.close()


def test_when_a_delivery_raises_the_taken_messages_not_yet_delivered_go_back_at_once_in_order(
    conn: Connection, r: redis.Redis
) -> None:
    _publish(conn, 10)
    got: list[Any] = []

    def callback(body: Any, message: Any) -> None:
        if body["i"] == 2:
            raise RuntimeError("the consumer failed on this one")
        got.append(message)

    channel, consumer = _consume(conn, 10, callback)
    with pytest.raises(RuntimeError):
        for _ in range(5):
            conn.drain_events(timeout=0.5)
    assert [m.payload["i"] for m in got] == [0, 1]
    # 0, 1 and the one that raised were handed to the consumer (it holds them, unacknowledged); 3..9 are
    # back at the head of the queue, oldest first, without waiting for the visibility timeout
    assert r.hlen("unacked") == 3 and r.zcard("unacked_index") == 3
    assert r.llen("transport-test") == 7
    consumer.cancel()
    again, channel2 = _take(conn, prefetch=3, rounds=1)
    assert [m.payload["i"] for m in again] == [3, 4, 5]
    for m in got + again:
        m.ack()
    channel2.close()
    # the one that raised goes back now (kombu's close would restore it after closing the channel's pools,
    # on a connection of its own that nothing closes)
    channel.qos.restore_unacked_once()
    channel.close()
