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
    own. The deadline is the attempt's timeout (the `read` timeout the SDK puts on the request), counted from the moment the request is
    sent and kept across redirects; the body is read chunk by chunk against it and against MAX_ANSWER_BYTES,
    uncompressed (the request asks for no content coding, so the cap counts what is parsed), and a body cut short
    closes its connection. A body is complete once its Content-Length has arrived, whatever the clock says. An
    error status keeps its meaning: its body is cut at MAX_ERROR_BYTES or at the deadline, and the SDK's status
    error follows. Not bounded so: a status line and headers that trickle (each wait is)."""
    http: Any = http_library_of(sdk)

    class BoundedBody(http.SyncByteStream):
        def __init__(self, inner: Any, status: int, expected: int | None, deadline: float, budget_s: float) -> None:
            self.inner, self.status, self.expected = inner, status, expected
            self.deadline, self.budget_s = deadline, budget_s

        def __iter__(self) -> Iterator[bytes]:
            error = self.status >= 400
            limit = MAX_ERROR_BYTES if error else MAX_ANSWER_BYTES
            size = 0
            for chunk in self.inner:
                if size + len(chunk) > limit:
                    if error:
                        yield chunk[: limit - size]
                        return
                    raise AnswerCut(f"the answer is larger than {limit} bytes", kind="bad_response", transient=False)
                size += len(chunk)
                yield chunk
                if self.expected is not None and size >= self.expected:
                    continue  # all of it: no deadline for what has arrived
                if time.monotonic() > self.deadline:
                    if error:
                        return
                    raise AnswerCut(
                        f"timed out: the answer was still arriving after {self.budget_s:g} s",
                        kind="timeout",
                        transient=True,
                    )

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
        response.stream = BoundedBody(response.stream, response.status_code, expected, deadline, budget_s)

    return sdk.DefaultHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
