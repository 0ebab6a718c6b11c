"""What the router adds to an explanation, over a provider that answers at once, in one run.

A fake OpenAI-compatible server (tests/fakes/openai_server.py: answers every chat completion immediately) is
called directly, then through the router (`POST /api/explanations`, one uvicorn process), each `--requests`
times, sequentially, over one keep-alive connection. The router's overhead is the difference of the two
latency distributions at p50 and p99 (goal: p50 <= 1 ms, p99 <= 5 ms added). Two routers, one after the
other: one whose model is a self-hosted `vllm/` model (the case where a provider answers in milliseconds: the
plain-HTTP adapter), one whose model is `openai/` (the official SDK, as for the hosted API), both served by
the same fake. And the floor of this stack: `bench.bare_app`'s forwarding route (the same uvicorn and
FastAPI, a plain `def` route that posts the body to the fake with urllib3 and returns its text, and nothing
else), so that what the router's own work adds shows apart from what any Python router on this stack costs.
What the router does on the request path: one rate-limit script call and the budget read (Redis), the routing version (one row; the state itself is held in memory), the provider call, one write
transaction (the explanation and its outbox row); the relay thread publishes the event after the response, in
a batch (the periodic relay covers a crash).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.feedback_throughput import _serve
from gateway.redis_server import RedisServer, free_port
from tests.fakes.openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parent.parent


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _timed(client: httpx.Client, n: int, call: Callable[..., Any]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        r = call(client, i)
        out.append((time.perf_counter() - t) * 1000)
        if r.status_code >= 300:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args(argv)
    fake = FakeOpenAIServer().start()
    try:
        lanes = [("bare forward (the floor)", _floor(fake, args.requests))]
        lanes += [(f"router, {m}", _lane(fake, m, args.requests)) for m in ("vllm/bench-model", "openai/gpt-4o-mini")]
    finally:
        fake.stop()
    print(f"\nExplanation overhead ({datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores,"
          f" {args.requests} sequential requests each)")  # fmt: skip
    print(f"{'':40}{'fake directly':>15}{'through it':>12}{'added':>9}")
    for name, (d, r) in lanes:
        for q in (50, 99):
            a, b = _percentile(d, q), _percentile(r, q)
            goal = 1.0 if q == 50 else 5.0
            verdict = (
                "" if name.startswith("bare") else f"   goal <= {goal:.0f} ms: {'PASS' if b - a <= goal else 'MISS'}"
            )
            print(f"{f'{name} p{q} (ms)':40}{a:>15.2f}{b:>12.2f}{b - a:>9.2f}{verdict}")
    floor = lanes[0][1]
    for name, lane in lanes[1:]:  # what the router's own work adds over what any route of this stack costs
        own = [_added(lane, q) - _added(floor, q) for q in (50, 99)]
        print(f"{name}: its own work over the floor, p50 {own[0]:.2f} ms, p99 {own[1]:.2f} ms")
    return 0


def _added(lane: tuple[list[float], list[float]], q: float) -> float:
    direct, through = lane
    return _percentile(through, q) - _percentile(direct, q)


def _floor(fake: FakeOpenAIServer, requests: int) -> tuple[list[float], list[float]]:
    env = {**os.environ, "BARE_FORWARD_URL": fake.openai_base_url, "PYTHONPATH": str(ROOT)}
    port = free_port()
    server = _serve("bench.bare_app:create_app", port, env, 60)
    try:
        return _interleaved(fake, requests, lambda c, i: c.post(f"http://127.0.0.1:{port}/bare-forward", json=_body(i)))
    finally:
        server.terminate()
        server.wait()


def _body(i: int) -> dict[str, Any]:
    return {"ticker": "AAPL", "signal": "BUY", "context": {"rsi": 28.5}, "session_id": f"bench-{i % 50}"}


def _interleaved(
    fake: FakeOpenAIServer, requests: int, routed: Callable[[httpx.Client, int], httpx.Response]
) -> tuple[list[float], list[float]]:
    """Latencies (ms) of the fake called directly and through `routed`, after a warm-up, in interleaved halves
    so that the machine's drift shows in both."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Explain BUY for AAPL"}]}

    def direct(c: httpx.Client, i: int) -> httpx.Response:
        return c.post(f"{fake.openai_base_url}/chat/completions", json=body, headers={"Authorization": "Bearer sk"})

    with httpx.Client(timeout=10) as client:
        _timed(client, 50, direct)
        _timed(client, 50, routed)
        d1 = _timed(client, requests // 2, direct)
        r1 = _timed(client, requests // 2, routed)
        d2 = _timed(client, requests - requests // 2, direct)
        r2 = _timed(client, requests - requests // 2, routed)
    return d1 + d2, r1 + r2


def _lane(fake: FakeOpenAIServer, model: str, requests: int) -> tuple[list[float], list[float]]:
    """`_interleaved` through a router whose default model is `model`."""
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "DATA_DIR": tmp,
            "ADMIN_TOKEN": "bench",
            "SESSION_HASH_KEY": "bench",
            "LOG_LEVEL": "WARNING",
            "OPENAI_API_KEY": "sk-fake",
            "OPENAI_BASE_URL": fake.openai_base_url,
            "ROUTER_COMPATIBLE_BASE_URL": fake.openai_base_url,
            "ROUTER_DEFAULT_MODEL": model,
            "ROUTER_EXPLANATIONS_PER_CLIENT": "100000000/minute",
            "ROUTER_EXPLANATIONS_PER_SESSION": "100000000/minute",
            "PYTHONPATH": str(ROOT),
        }
        port = free_port()
        router = _serve("services.router.main:create_app", port, env, 180)

        def routed(c: httpx.Client, i: int) -> httpx.Response:
            return c.post(f"http://127.0.0.1:{port}/api/explanations", json=_body(i))

        try:
            with httpx.Client(timeout=10) as client:
                answered = routed(client, 0).json()["model"]
            if answered != model:
                raise RuntimeError(f"the router answered with {answered}, not {model}")
            return _interleaved(fake, requests, routed)
        finally:
            router.terminate()
            router.wait()


if __name__ == "__main__":
    raise SystemExit(main())
