"""A small HTTP/1.1 load generator on raw asyncio streams (keep-alive, no client library overhead), so the
client costs little next to the server it measures. Two modes:

- `closed_loop`: N connections send back to back for D seconds -> throughput.
- `open_loop`: requests are *scheduled* at a fixed rate and latency is measured from the scheduled time, so
  a slow server cannot hide its queueing (no coordinated omission) -> p50 / p99 at that rate.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Result:
    sent: int
    ok: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    #: open loop: (request index, time.time() when its 2xx answer arrived), for lag measurements
    answered_at: list[tuple[int, float]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def _closed(host: str, port: int, make: Callable[[int], tuple[str, dict]], conns: int, seconds: float) -> Result:
    counter = 0
    ok = errors = 0
    lat: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal counter, ok, errors
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < deadline:
            counter += 1
            path, body = make(counter)
            t = time.perf_counter()
            writer.write(_request(host, port, path, json.dumps(body).encode()))
            status = await _read_response(reader)
            lat.append((time.perf_counter() - t) * 1000)
            if 200 <= status < 300:
                ok += 1
            else:
                errors += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return Result(counter, ok, errors, time.perf_counter() - start, lat)


async def _open(
    host: str, port: int, make: Callable[[int], tuple[str, dict]], rate: float, seconds: float, conns: int
) -> Result:
    total = int(rate * seconds)
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    ok = errors = 0
    lat: list[float] = []
    answered: list[tuple[int, float]] = []
    start = time.perf_counter() + 0.05
    for i in range(total):
        queue.put_nowait((i, start + i / rate))

    async def worker() -> None:
        nonlocal ok, errors
        reader, writer = await asyncio.open_connection(host, port)
        while True:
            try:
                i, due = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            path, body = make(i)
            writer.write(_request(host, port, path, json.dumps(body).encode()))
            status = await _read_response(reader)
            lat.append((time.perf_counter() - due) * 1000)  # from when it *should* have been sent
            if 200 <= status < 300:
                ok += 1
                answered.append((i, time.time()))
            else:
                errors += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return Result(total, ok, errors, time.perf_counter() - start, lat, answered)


def closed_loop(
    host: str, port: int, make: Callable[[int], tuple[str, dict]], *, conns: int = 32, seconds: float = 5.0
) -> Result:
    return asyncio.run(_closed(host, port, make, conns, seconds))


def open_loop(
    host: str, port: int, make: Callable[[int], tuple[str, dict]], *, rate: float, seconds: float = 5.0, conns: int = 64
) -> Result:
    return asyncio.run(_open(host, port, make, rate, seconds, conns))
