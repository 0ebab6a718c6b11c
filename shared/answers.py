"""Bounded answers from the official LLM SDKs (openai, groq): their timeout bounds each wait on the socket, not
the call, so a server that sends its answer a few bytes at a time could hold a request, or a worker, for as long
as it likes, and one that sends a huge body would have it held in memory whole. `bounded_http_client(sdk, t)`
is the SDK's own default HTTP client with that bounded; what it cuts short raises `AnswerCut`, which an SDK may
pass on as it is or wrap (`answer_cut` finds it either way).

The SDK module is passed in: only the provider adapters import openai and groq.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

#: The most an answer body may hold: max_tokens is at most 4,096, a few bytes a token, in JSON.
MAX_ANSWER_BYTES = 1 << 20
#: The most of an error body read for its message (the status decides what happens next).
MAX_ERROR_BYTES = 16 << 10


class AnswerCut(Exception):
    """An answer read no further: still arriving at the deadline (kind "timeout", transient) or larger than
    MAX_ANSWER_BYTES (kind "bad_response", not transient)."""

    def __init__(self, message: str, *, kind: str, transient: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.transient = transient


class BodyLimits:
    """What one answer body may be, checked as it arrives: at most MAX_ANSWER_BYTES (MAX_ERROR_BYTES of an error
    body, >= 400, read only for its message), and in before `deadline` (monotonic) unless it is complete. An answer
    that breaks either is cut (`AnswerCut`); an error body only stops being read, so its status keeps its meaning.
    Both readers apply it: the router's plain-HTTP adapter (urllib3) and the SDKs' client (`bounded_http_client`)."""

    def __init__(self, status: int, deadline: float, budget_s: float) -> None:
        self.error = status >= 400
        self.limit = MAX_ERROR_BYTES if self.error else MAX_ANSWER_BYTES
        self.deadline, self.budget_s = deadline, budget_s
        self.size = 0

    def take(self, chunk: bytes, *, complete: bool = False) -> tuple[bytes, bool]:
        """`chunk` as far as it may be kept, and whether to read no further (an error body cut at its cap or its
        deadline). `complete`: this chunk ends the body, so the deadline no longer matters."""
        room = self.limit - self.size
        if len(chunk) > room:
            if self.error:
                return chunk[:room], True
            raise AnswerCut(f"the answer is larger than {self.limit} bytes", kind="bad_response", transient=False)
        self.size += len(chunk)
        if not complete and time.monotonic() > self.deadline:
            if self.error:
                return chunk, True
            raise AnswerCut(
                f"timed out: the answer was still arriving after {self.budget_s:g} s", kind="timeout", transient=True
            )
        return chunk, False


def answer_cut(exc: BaseException) -> AnswerCut | None:
    """The `AnswerCut` behind an SDK's exception: the exception itself (openai from 3.0 lets it through), or its
    cause (groq, and openai before 3.0, wrap it as a connection error); None for any other failure."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, AnswerCut):
            return candidate
    return None


def http_library_of(sdk: Any) -> Any:
    """The HTTP library an SDK is built on, whose client and stream types its client takes: httpx (groq, and
    openai before 3.0) or its successor httpx2 (openai from 3.0), the same API."""
    if issubclass(sdk.DefaultHttpxClient, httpx.Client):
        return httpx
    import httpx2

    return httpx2


def bounded_http_client(sdk: Any, timeout_s: float) -> Any:
    """The HTTP client to give an SDK: the SDK's default one (its limits, redirects followed, proxies from the
    environment), with event hooks that bound each answer body, as the router's plain-HTTP adapter bounds its
    own (`BodyLimits`). The deadline is the attempt's timeout (the `read` timeout the SDK puts on the request),
    counted from the moment the request is sent and kept across redirects; the body is read chunk by chunk,
    uncompressed (the request asks for no content coding, so the cap counts what is parsed), and a body cut short
    closes its connection. A body is complete once its Content-Length has arrived, whatever the clock says; an
    error body cut short is followed by the SDK's status error. Not bounded so: a status line and headers that
    trickle (each wait is)."""
    http: Any = http_library_of(sdk)

    class BoundedBody(http.SyncByteStream):
        def __init__(self, inner: Any, limits: BodyLimits, expected: int | None) -> None:
            self.inner, self.limits, self.expected = inner, limits, expected

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.inner:
                complete = self.expected is not None and self.limits.size + len(chunk) >= self.expected
                kept, stop = self.limits.take(chunk, complete=complete)
                yield kept
                if stop:
                    return  # the inner stream is left unread: closed, not pooled

        def close(self) -> None:
            self.inner.close()

    def on_request(request: Any) -> None:
        budget_s = (request.extensions.get("timeout") or {}).get("read") or timeout_s
        request.extensions.setdefault("answer_deadline", (time.monotonic() + budget_s, budget_s))  # kept on redirect
        request.headers["Accept-Encoding"] = "identity"

    def on_response(response: Any) -> None:
        deadline, budget_s = response.request.extensions["answer_deadline"]
        length = response.headers.get("content-length")
        coded = response.headers.get("content-encoding", "identity") != "identity"
        expected = int(length) if length and length.isdigit() and not coded else None
        limits = BodyLimits(response.status_code, deadline, budget_s)
        response.stream = BoundedBody(response.stream, limits, expected)

    return sdk.DefaultHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
