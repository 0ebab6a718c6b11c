"""A small OpenAI-compatible chat-completions server for tests: the real openai and groq SDKs talk to it over
real HTTP. It serves `/v1/chat/completions` (OpenAI, vLLM) and `/openai/v1/chat/completions` (Groq).

It can be told to fail the next N requests with a status (500, 429, 401 ...) and an error page of any size, to
hang for a while before answering, to answer with a body that is not JSON, to send its answer a few bytes at a
time, and what to answer (text, usage). Under `/moved/v1/` it answers 308 to `/v1/` (an ingress sending clients
on). It also serves as a forward proxy to itself: a request whose target is a whole URL (`POST http://host/v1/...`,
as a client sends it through `HTTP_PROXY`) is answered as its path, and recorded as proxied. It records every
request it received.

    with FakeOpenAIServer() as fake:
        fake.fail_next(2, status=500)
        ... OpenAI(base_url=fake.openai_base_url, api_key="sk-test") ...
        assert len(fake.requests) == 3
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from gateway.redis_server import free_port
from tests.support import ServedApp, ServesApp


@dataclass
class Received:
    path: str
    model: str
    messages: list[dict[str, Any]]
    authorization: str
    accept_encoding: str = ""
    proxied: bool = False


@dataclass
class Behaviour:
    fail_count: int = 0
    fail_status: int = 500
    fail_padding: int = 0  # bytes of filler in the failure's message (a proxy's big error page)
    hang_count: int = 0
    hang_s: float = 0.0
    garble_count: int = 0  # answer 200 with a body that is not JSON (a proxy's HTML page)
    trickle_count: int = 0  # send the answer trickle_bytes at a time, trickle_gap_s apart
    trickle_gap_s: float = 0.0
    trickle_bytes: int = 8
    trickle_pieces: int = 0  # or the answer in this many pieces
    text: str = "The indicators support the signal."
    prompt_tokens: int | None = 120
    completion_tokens: int | None = 45


@dataclass
class FakeOpenAIServer(ServesApp):
    port: int = 0
    behaviour: Behaviour = field(default_factory=Behaviour)
    requests: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.app = self._build()
        self._served = ServedApp(
            self.app,
            self.port,
            name="fake-openai",
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            timeout_graceful_shutdown=1,
        )

    # -- what the tests use -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def groq_base_url(self) -> str:  # the groq SDK appends /openai/v1/... itself
        return self.url

    def fail_next(self, count: int, *, status: int = 500, padding: int = 0) -> None:
        with self._lock:
            self.behaviour.fail_count, self.behaviour.fail_status = count, status
            self.behaviour.fail_padding = padding

    def hang_next(self, count: int, *, seconds: float = 30.0) -> None:
        with self._lock:
            self.behaviour.hang_count, self.behaviour.hang_s = count, seconds

    def garble_next(self, count: int) -> None:
        with self._lock:
            self.behaviour.garble_count = count

    def trickle_next(self, count: int, *, gap_s: float = 0.05, chunk: int = 8, pieces: int = 0) -> None:
        """Send the next `count` answers `chunk` bytes at a time (or in `pieces` pieces), `gap_s` apart."""
        with self._lock:
            self.behaviour.trickle_count, self.behaviour.trickle_gap_s = count, gap_s
            self.behaviour.trickle_bytes, self.behaviour.trickle_pieces = chunk, pieces

    def answer(self, text: str, *, prompt_tokens: int | None = 120, completion_tokens: int | None = 45) -> None:
        with self._lock:
            self.behaviour.text = text
            self.behaviour.prompt_tokens, self.behaviour.completion_tokens = prompt_tokens, completion_tokens

    def reset(self) -> None:
        with self._lock:
            self.behaviour = Behaviour()
            self.requests.clear()

    # -- the server -------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI()

        async def chat(request: Request) -> Response:
            body = await request.json()
            with self._lock:
                self.requests.append(
                    Received(
                        path=request.url.path,
                        model=str(body.get("model")),
                        messages=list(body.get("messages") or []),
                        authorization=request.headers.get("authorization", ""),
                        accept_encoding=request.headers.get("accept-encoding", ""),
                        proxied=bool(request.scope.get("proxied")),
                    )
                )
                b = self.behaviour
                hang = b.hang_s if b.hang_count > 0 else 0.0
                if b.hang_count > 0:
                    b.hang_count -= 1
                fail = b.fail_status if b.fail_count > 0 else None
                padding = b.fail_padding
                if b.fail_count > 0:
                    b.fail_count -= 1
                garble = b.garble_count > 0
                if garble:
                    b.garble_count -= 1
                trickle, piece, pieces = (
                    (b.trickle_gap_s if b.trickle_count > 0 else 0.0),
                    b.trickle_bytes,
                    b.trickle_pieces,
                )
                if b.trickle_count > 0:
                    b.trickle_count -= 1
                text, p_tok, c_tok = b.text, b.prompt_tokens, b.completion_tokens
            if hang:
                deadline = time.monotonic() + hang
                while time.monotonic() < deadline and not self._release.is_set():
                    await asyncio.sleep(0.02)
            if fail is not None:
                kind = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(fail, "server_error")
                return JSONResponse(
                    {
                        "error": {
                            "message": f"fake failure {fail}" + " " * padding,
                            "type": kind,
                            "param": None,
                            "code": kind,
                        }
                    },
                    status_code=fail,
                )
            if garble:
                return HTMLResponse("<html><body>502 Bad Gateway</body></html>")
            payload: dict[str, Any] = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            }
            if p_tok is not None and c_tok is not None:
                payload["usage"] = {
                    "prompt_tokens": p_tok,
                    "completion_tokens": c_tok,
                    "total_tokens": p_tok + c_tok,
                }
            if trickle:
                encoded = json.dumps(payload).encode()
                piece = -(-len(encoded) // pieces) if pieces else piece

                async def slowly() -> AsyncIterator[bytes]:
                    for i in range(0, len(encoded), piece):
                        if self._release.is_set():
                            return
                        yield encoded[i : i + piece]
                        await asyncio.sleep(trickle)

                headers = {"content-length": str(len(encoded))}
                return StreamingResponse(slowly(), media_type="application/json", headers=headers)
            return JSONResponse(payload)

        async def moved(request: Request) -> Response:  # an ingress sending an old address on, method and body kept
            return Response(status_code=308, headers={"location": "/v1/chat/completions"})

        @app.middleware("http")
        async def as_proxy(request: Request, call_next: Any) -> Response:
            if request.scope["path"].startswith(("http://", "https://")):  # absolute form: sent through a proxy
                path = "/" + request.scope["path"].split("/", 3)[3]
                request.scope.update(path=path, raw_path=path.encode(), proxied=True)
            response: Response = await call_next(request)
            return response

        app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
        app.add_api_route("/moved/v1/chat/completions", moved, methods=["POST"])
        app.add_api_route("/openai/v1/chat/completions", chat, methods=["POST"])
        return app

    def stop(self) -> None:
        self._release.set()
        super().stop()
