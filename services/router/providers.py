"""LLM providers: the only module that imports openai / groq.

A model is named "<provider>/<model>":
- ``openai/<name>``: the official openai SDK (OPENAI_API_KEY, optional OPENAI_BASE_URL);
- ``groq/<name>``: the official groq SDK (GROQ_API_KEY, optional GROQ_BASE_URL);
- ``vllm/<name>`` / ``local/<name>``: any OpenAI-compatible server, through `CompatibleProvider` (plain HTTP
  on a urllib3 pool, the same request and answer as the SDK's): the ``serving_base_url`` a ModelRegistered event
  gave for that model (asked for by ``shared.serving.served_name``, the name the finetune service loaded it
  under, with the serving key), else ROUTER_COMPATIBLE_BASE_URL (with ROUTER_COMPATIBLE_API_KEY). A base URL
  without a trailing ``/v1`` gets one (vLLM and the finetune server serve under ``/v1``);
- ``offline/template-v1``: a deterministic writer that needs nothing and honours style cues in the prompt.

`ProviderSet.generate` tries a chain of models: each gets retries with exponential backoff on transient errors
(timeouts, connection errors, 408/429, 5xx) and none on other 4xx; then the next model in the chain answers.
One request's hosted attempts share a deadline (ROUTER_REQUEST_DEADLINE_S), so a hanging provider cannot hold
a caller for timeout x tries x models; the offline writer, if it is in the chain, still answers after it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import groq
import groq.types.chat
import openai
import openai.types.chat
import urllib3

from services.router import domain
from services.router.config import OFFLINE_MODEL, RouterSettings
from shared.answers import AnswerCut, BodyLimits, answer_cut, bounded_http_client
from shared.prompts import format_indicators
from shared.serving import SYSTEM_MESSAGE, served_name, serving_api_key

#: The least time worth giving a hosted attempt; with less left of a request's deadline, it has passed.
MIN_ATTEMPT_S = 0.05


@dataclass(frozen=True)
class ProviderRequest:
    prompt: str
    ticker: str
    signal: str
    context: Mapping[str, domain.ContextValue]


@dataclass(frozen=True)
class Completion:
    text: str
    tokens_in: int
    tokens_out: int


class ProviderError(Exception):
    def __init__(self, message: str, *, kind: str, transient: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.transient = transient


@dataclass(frozen=True)
class AttemptError:
    model: str
    attempt: int
    kind: str
    message: str


class NoProviderConfigured(Exception):
    """No model of the chain has a configured provider (503)."""


class AllProvidersFailed(Exception):
    """Every configured model of the chain failed (502)."""

    def __init__(self, errors: Sequence[AttemptError]) -> None:
        self.errors = list(errors)
        summary = "; ".join(f"{e.model}: {e.kind} ({e.message[:120]})" for e in _last_per_model(errors))
        super().__init__(summary or "no attempt was made")


def _last_per_model(errors: Sequence[AttemptError]) -> list[AttemptError]:
    last: dict[str, AttemptError] = {}
    for e in errors:
        last[e.model] = e
    return list(last.values())


@dataclass(frozen=True)
class Generation:
    completion: Completion
    model: str  # the model that answered
    provider: str
    fallback_used: bool
    errors: list[AttemptError] = field(default_factory=list)


class Provider(Protocol):
    name: str

    def complete(self, model_name: str, request: ProviderRequest, *, timeout_s: float) -> Completion: ...


# ---------------------------------------------------------------------------------------------------------
# SDK adapters
# ---------------------------------------------------------------------------------------------------------

_SYSTEM = SYSTEM_MESSAGE  # the same system turn the fine-tuning rows carry


def _classify(exc: Exception, sdk: Any) -> ProviderError:
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderError(f"timed out: {exc}", kind="timeout", transient=True)
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderError(f"connection failed: {exc}", kind="connection", transient=True)
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        transient = status in (408, 429) or status >= 500
        kind = "rate_limited" if status == 429 else f"http_{status}"
        return ProviderError(f"HTTP {status}: {exc.message}", kind=kind, transient=transient)
    return ProviderError(f"{type(exc).__name__}: {exc}", kind="bad_response", transient=False)


def _completion_from(response: Any, request: ProviderRequest) -> Completion:
    """The completion of an SDK's parsed answer (a `ChatCompletion`)."""
    try:
        text = response.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as exc:
        raise ProviderError("response has no choices", kind="bad_response", transient=False) from exc
    usage = getattr(response, "usage", None)
    return _completion(text, getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None), request)


def _completion_from_json(data: Any, request: ProviderRequest) -> Completion:
    """The completion of an answer still in JSON form (the chat-completion object as a dict)."""
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ProviderError("response has no choices", kind="bad_response", transient=False) from exc
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return _completion(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), request)


def _completion(text: object, tokens_in: object, tokens_out: object, request: ProviderRequest) -> Completion:
    """One rule for every adapter: an empty answer is a bad response; missing token counts are estimated."""
    if not isinstance(text, str) or not text.strip():
        raise ProviderError("response text is empty", kind="bad_response", transient=False)
    return Completion(
        text=text.strip(),
        tokens_in=tokens_in if isinstance(tokens_in, int) else domain.estimate_tokens(request.prompt),
        tokens_out=tokens_out if isinstance(tokens_out, int) else domain.estimate_tokens(text),
    )


def _chat_body(model_name: str, request: ProviderRequest, settings: RouterSettings) -> dict[str, Any]:
    return {
        "model": model_name,
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": request.prompt},
        ],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
    }


#: Where each SDK posts a chat completion, relative to its client's base URL (where its `chat.completions.create`
#: posts), and the type it parses the answer into.
_COMPLETIONS: dict[Any, tuple[str, type]] = {
    openai: ("/chat/completions", openai.types.chat.ChatCompletion),
    groq: ("/openai/v1/chat/completions", groq.types.chat.ChatCompletion),
}


class ChatProvider:
    """One chat-completions endpoint through an official SDK (openai or groq); our own retries, not the SDK's.

    The request goes through the SDK client's own `post` (its documented way to call an endpoint: the client's
    base URL, key, headers, timeout and error types), not `chat.completions.create`: that one first walks the
    whole body through the SDK's type-driven transform, which cost about a millisecond of CPU per request,
    more than a fast provider takes to answer. The body here is plain JSON already; the answer is parsed into
    the same `ChatCompletion` type."""

    def __init__(
        self, name: str, sdk: Any, client_cls: type, *, api_key: str, base_url: str | None, settings: RouterSettings
    ) -> None:
        self.name = name
        self.sdk = sdk
        self.path, self.completion_type = _COMPLETIONS[sdk]
        self.settings = settings
        kwargs: dict[str, Any] = {
            "api_key": api_key,
            "max_retries": 0,
            "timeout": settings.provider_timeout_s,
            "http_client": bounded_http_client(sdk, settings.provider_timeout_s),
        }
        if base_url:
            kwargs["base_url"] = base_url
        self.client = client_cls(**kwargs)

    def complete(self, model_name: str, request: ProviderRequest, *, timeout_s: float) -> Completion:
        try:
            response = self.client.post(
                self.path,
                cast_to=self.completion_type,
                body=_chat_body(model_name, request, self.settings),
                options={"timeout": timeout_s},
            )
        except Exception as exc:
            cut = answer_cut(exc)  # the bounded read's verdict (`shared.answers`), which an SDK may have wrapped
            if cut is not None:
                raise _cut_error(cut) from None
            raise _classify(exc, self.sdk) from exc
        return _completion_from(response, request)

    def close(self) -> None:
        self.client.close()


class CompatibleProvider:
    """A self-hosted OpenAI-compatible server (vLLM, the finetune service's server): `POST
    <base>/chat/completions` as plain HTTP on a pool of keep-alive connections (urllib3), with the SDK
    adapters' body, answer and error kinds. Such a server is usually a hop away and answers in milliseconds, so
    the client's own cost shows: the openai SDK spends about 0.7 ms of CPU per call building, sending and
    parsing (`bench.explain_overhead` prints both), urllib3 about a fifth of that. Hosted OpenAI and Groq keep
    their SDKs, whose ~0.7 ms is lost in their network time."""

    def __init__(self, name: str, *, api_key: str, base_url: str, settings: RouterSettings) -> None:
        self.name = name
        self.settings = settings
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        # No retries here (ProviderSet.generate's loop retries, with backoff and a deadline); redirects are
        # followed, as the SDK follows them (an ingress sending http to https with a 308). A pool per endpoint,
        # as big as the threads that may call it at once.
        retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=3)
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=64, block=False, retries=retries)

    def complete(self, model_name: str, request: ProviderRequest, *, timeout_s: float) -> Completion:
        deadline = time.monotonic() + timeout_s
        try:
            body = json.dumps(_chat_body(model_name, request, self.settings)).encode()
            response = self.pool.request(
                "POST",
                self.url,
                body=body,
                headers=self.headers,
                timeout=urllib3.Timeout(total=timeout_s),
                preload_content=False,
            )
        except Exception as exc:
            raise _transport_error(exc) from exc
        raw = _read_answer(response, deadline, timeout_s)
        status = response.status
        if status >= 400:
            transient = status in (408, 429) or status >= 500
            kind = "rate_limited" if status == 429 else f"http_{status}"
            raise ProviderError(f"HTTP {status}: {_error_message(raw)}", kind=kind, transient=transient)
        if status >= 300:
            # too many redirects raise above; this is one urllib3 would not follow (no Location, a 304 ...)
            raise ProviderError(f"HTTP {status}: a redirect not followed", kind=f"http_{status}", transient=False)
        try:
            data = json.loads(raw)
        except Exception as exc:  # not JSON, or nested past the parser's depth
            raise ProviderError(f"the answer is not JSON: {exc}", kind="bad_response", transient=False) from exc
        return _completion_from_json(data, request)

    def close(self) -> None:
        self.pool.clear()


def _read_answer(response: urllib3.BaseHTTPResponse, deadline: float, timeout_s: float) -> bytes:
    """The body, read as it arrives, within the attempt's deadline and the size cap (`shared.answers.BodyLimits`).

    urllib3's timeout bounds each wait for the socket, not the call: a server that sends its answer a few bytes at
    a time would otherwise hold the request for as long as it likes. The deadline is checked between reads, so a
    body that trickles ends the call about one read timeout past it. Not bounded so (each wait still is): status
    line and headers that trickle, and, inside one read, a chunked body's size lines or a compressed stream's
    header (an OpenAI-compatible server answers with Content-Length and no compression).

    An error status (>= 400) keeps its meaning whatever its body does: up to 16 KiB of it are read for
    the message, and a body that is larger, late or cut off only shortens the message. A body cut short leaves
    its connection closed, not back in the pool.
    """
    limits = BodyLimits(response.status, deadline, timeout_s)
    chunks: list[bytes] = []
    done = False
    try:
        while chunk := response.read1(65536):
            # all that Content-Length announced, nothing held in a decoder: no read to see the end
            complete = response.length_remaining == 0 and "content-encoding" not in response.headers
            kept, stop = limits.take(chunk, complete=complete)
            chunks.append(kept)
            if complete or stop:
                done = complete
                break
        else:
            done = True
    except AnswerCut as cut:
        raise _cut_error(cut) from None
    except Exception as exc:  # reset or closed mid-answer, a read timeout, a bad gzip stream
        if not limits.error:
            raise _transport_error(exc) from exc
    finally:
        if not done:
            response.close()
        response.release_conn()
    return b"".join(chunks)


def _cut_error(cut: AnswerCut) -> ProviderError:
    """An answer cut short (`shared.answers.BodyLimits`) as a failed attempt of the same kind."""
    return ProviderError(str(cut), kind=cut.kind, transient=cut.transient)


def _transport_error(exc: Exception) -> ProviderError:
    """A failed request as the SDK adapters' kinds: timeouts and connection failures are transient; anything
    else (a header the key makes invalid, too many redirects ...) is not, as `_classify` has it."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason  # what made the one try fail
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # refused (urllib3 files it under connect timeouts)
        return ProviderError(f"connection failed: {exc}", kind="connection", transient=True)
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return ProviderError(f"timed out: {exc}", kind="timeout", transient=True)
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError) and not isinstance(
        exc, urllib3.exceptions.ResponseError
    ):  # reset, closed mid-answer, TLS
        return ProviderError(f"connection failed: {exc}", kind="connection", transient=True)
    return ProviderError(f"{type(exc).__name__}: {exc}", kind="bad_response", transient=False)


def _error_message(raw: bytes) -> str:
    """What an error body says: OpenAI's `{"error": {"message"}}`, vLLM's older top-level `{"object": "error",
    "message"}`, FastAPI's `{"detail"}`; else the body's start."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        for message in (
            error.get("message") if isinstance(error, dict) else error,
            data.get("message"),
            data.get("detail"),
        ):
            if message:
                return str(message)[:300]
    return raw[:300].decode("utf-8", "replace")


def compatible_base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


# ---------------------------------------------------------------------------------------------------------
# The offline writer
# ---------------------------------------------------------------------------------------------------------

_CONCISE = re.compile(r"\b(concise|concisely|brief|briefly|short)\b")
_PLAIN = re.compile(r"\b(plain language|plain english|simple|simply)\b")

_STANCE = {
    "BUY": ("a BUY: the setup favours upside", "buying looks reasonable"),
    "SELL": ("a SELL: the setup favours downside", "selling or reducing looks reasonable"),
    "HOLD": ("a HOLD: the evidence is mixed, so waiting is favoured", "waiting looks reasonable"),
}


def _label(key: str) -> str:
    return key.replace("_", " ").strip()


def _number(value: domain.ContextValue) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _fmt(value: domain.ContextValue) -> str:
    number = _number(value)
    if number is None:
        return _label(str(value))
    return f"{number:g}"


def _indicator_phrase(key: str, value: domain.ContextValue, plain: bool) -> str:
    k = key.lower()
    number = _number(value)
    if "rsi" in k:
        if number is None:
            return f"the momentum reading is {_fmt(value)}" if plain else f"RSI is {_fmt(value)}"
        if number < 30:
            return (
                f"the price has fallen fast lately (strength score {number:g} of 100)"
                if plain
                else f"RSI at {number:g} is oversold"
            )
        if number > 70:
            return (
                f"the price has risen fast lately (strength score {number:g} of 100)"
                if plain
                else f"RSI at {number:g} is overbought"
            )
        return f"the strength score is a middling {number:g} of 100" if plain else f"RSI at {number:g} is neutral"
    if "macd" in k:
        if number is None:
            text = _label(str(value)).lower()
            if plain:
                text = text.replace("bullish", "upward").replace("bearish", "downward").replace("crossover", "turn")
                return (
                    f"the trend signal shows an {text}" if text[:1] in "aeiou" else f"the trend signal shows a {text}"
                )
            return f"MACD shows a {text}"
        if plain:
            return f"the recent trend is pointing {'up' if number > 0 else 'down' if number < 0 else 'sideways'}"
        return f"MACD at {number:g} is {'bullish' if number > 0 else 'bearish' if number < 0 else 'flat'}"
    if any(t in k for t in ("sma", "ema", "moving_average", "ma50", "ma200", "ma_")):
        if plain:
            return f"the average price over recent days ({_label(key)}) is {_fmt(value)}"
        return f"the {_label(key).upper()} is {_fmt(value)}"
    if "volume" in k:
        return f"trading activity is {_fmt(value)}" if plain else f"volume is {_fmt(value)}"
    return f"{_label(key)} is {_fmt(value)}"


def _importance(key: str) -> tuple[int, str]:
    k = key.lower()
    for rank, token in enumerate(("rsi", "macd", "sma", "ema", "moving_average", "volume")):
        if token in k:
            return rank, k
    return 99, k


def style_cues(prompt: str, ticker: str, context: Mapping[str, domain.ContextValue]) -> dict[str, bool]:
    """Cues in the template's own words: the ticker and the indicator list are taken out first, so an
    indicator called "risk_score" or a ticker "SHORT" does not change the style."""
    text = prompt.replace(format_indicators(context), " ").replace(ticker, " ").lower()
    return {
        "bullets": "bullet" in text,
        "concise": bool(_CONCISE.search(text)),
        "risk": "risk" in text,
        "plain": bool(_PLAIN.search(text)),
    }


def offline_explanation(request: ProviderRequest) -> str:
    cues = style_cues(request.prompt, request.ticker, request.context)
    plain = cues["plain"]
    keys = sorted(request.context, key=_importance)
    phrases = [_indicator_phrase(k, request.context[k], plain) for k in keys]
    jargon_stance, plain_stance = _STANCE.get(request.signal, _STANCE["HOLD"])
    stance = plain_stance if plain else jargon_stance
    signal_word = {"BUY": "buy", "SELL": "sell", "HOLD": "hold"}.get(request.signal, "hold")

    if phrases:
        lead = f"{request.ticker} gets a {request.signal} signal mainly because {phrases[0]}."
    else:
        lead = f"{request.ticker} gets a {request.signal} signal; no indicators were given, so it rests on the signal alone."
    sentences = [lead]
    if not cues["concise"]:
        if len(phrases) > 1:
            support = ", ".join(phrases[1:4])
            sentences.append(f"This is backed up by the other readings: {support}.")
        if plain:
            sentences.append(f"Put simply, the numbers suggest it is a time to {signal_word}.")
        else:
            sentences.append(f"Taken together, the indicators make this {stance}.")
        sentences.append(
            "Keep watching these readings, because they can change quickly."
            if plain
            else "Watch for the indicators to confirm or contradict this over the next sessions."
        )
    if cues["risk"]:
        sentences.append(
            "Risk note: prices can move against you, so only put in money you can afford to lose."
            if plain
            else "Risk note: signals can reverse quickly; size positions carefully and consider a stop-loss."
        )
    if cues["bullets"]:
        return "\n".join(f"- {s}" for s in sentences)
    return " ".join(sentences)


class OfflineProvider:
    """Deterministic explanations from the signal and the indicators, with no network and no key."""

    name = "offline"

    def complete(self, model_name: str, request: ProviderRequest, *, timeout_s: float) -> Completion:
        text = offline_explanation(request)
        return Completion(
            text=text, tokens_in=domain.estimate_tokens(request.prompt), tokens_out=domain.estimate_tokens(text)
        )


# ---------------------------------------------------------------------------------------------------------
# The set of providers and the fallback loop
# ---------------------------------------------------------------------------------------------------------


class ProviderSet:
    """Resolves a model name to a configured provider and runs the retry / fallback loop. Clients are built
    once per endpoint and reused (they hold connection pools)."""

    def __init__(self, settings: RouterSettings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.sleep = sleep
        self.offline = OfflineProvider()
        self._clients: dict[tuple[str, str, str], ChatProvider | CompatibleProvider] = {}
        self._lock = threading.Lock()

    def configured_defaults(self) -> list[str]:
        """The default model of each configured hosted provider, in preference order."""
        s = self.settings
        out = []
        if s.openai_api_key is not None and s.openai_api_key.get_secret_value():
            out.append("openai/gpt-4o-mini")
        if s.groq_api_key is not None and s.groq_api_key.get_secret_value():
            out.append("groq/llama-3.1-8b-instant")
        return out

    def chain(self, assigned: str, champion: str) -> list[str]:
        return domain.fallback_chain(
            assigned,
            champion,
            self.configured_defaults(),
            offline_model=OFFLINE_MODEL,
            offline_fallback=self.settings.offline_fallback,
        )

    def provider_for(self, model: str, registered: Mapping[str, str | None] | None = None) -> Provider | None:
        """The provider that serves `model`, or None when it is not configured (no key, no base URL)."""
        try:
            kind, _ = domain.split_model(model)
        except ValueError:
            return None
        s = self.settings
        if kind == "offline":
            return self.offline
        if kind == "openai":
            key = s.openai_api_key.get_secret_value() if s.openai_api_key else ""
            if not key:
                return None
            return self._client("openai", openai, openai.OpenAI, key, s.openai_base_url)
        if kind == "groq":
            key = s.groq_api_key.get_secret_value() if s.groq_api_key else ""
            if not key:
                return None
            return self._client("groq", groq, groq.Groq, key, s.groq_base_url)
        served = (registered or {}).get(model)
        if served:  # a model the finetune service registered: its serving engine, with the serving key
            admin = s.admin_token.get_secret_value() if s.admin_token else None
            key = serving_api_key(None, admin) or "EMPTY"
            return self._compatible(kind, key, compatible_base_url(served))
        if not s.compatible_base_url:
            return None
        key = s.compatible_api_key.get_secret_value() if s.compatible_api_key else "EMPTY"
        return self._compatible(kind, key or "EMPTY", compatible_base_url(s.compatible_base_url))

    def engine_model_name(self, model: str, registered: Mapping[str, str | None] | None = None) -> str:
        """The name to ask the provider for: a registered local model by its served name (the one rule of
        shared.serving), anything else by the part after the provider."""
        if (registered or {}).get(model):
            return served_name(model)
        return domain.split_model(model)[1]

    def _client(self, name: str, sdk: Any, cls: type, key: str, base_url: str | None) -> Provider:
        return self._cached(
            (name, base_url or "", key),
            lambda: ChatProvider(name, sdk, cls, api_key=key, base_url=base_url, settings=self.settings),
        )

    def _compatible(self, name: str, key: str, base_url: str) -> Provider:
        return self._cached(
            (name, base_url, key),
            lambda: CompatibleProvider(name, api_key=key, base_url=base_url, settings=self.settings),
        )

    def _cached(
        self, cache_key: tuple[str, str, str], build: Callable[[], ChatProvider | CompatibleProvider]
    ) -> Provider:
        with self._lock:
            client = self._clients.get(cache_key)
            if client is None:
                client = build()
                self._clients[cache_key] = client
            return client

    def generate(
        self, chain: Sequence[str], request: ProviderRequest, registered: Mapping[str, str | None] | None = None
    ) -> Generation:
        """Try each configured model of `chain` in order, with retries on transient errors."""
        usable = [(m, p) for m in chain if (p := self.provider_for(m, registered)) is not None]
        if not usable:
            raise NoProviderConfigured(f"no provider is configured for {', '.join(chain)} (set an API key)")
        s = self.settings
        pauses = [0.0, *domain.backoff_delays(s.provider_retries, s.retry_backoff_s, s.retry_backoff_max_s)]
        errors: list[AttemptError] = []
        deadline = time.monotonic() + s.request_deadline_s
        for model, provider in usable:
            model_name = self.engine_model_name(model, registered)
            for attempt, pause in enumerate(pauses):
                remaining = deadline - time.monotonic() - pause
                # An attempt with only a few milliseconds left cannot get an answer from a hosted model: the
                # deadline counts as passed rather than sending a request doomed to time out.
                if provider is not self.offline and remaining <= MIN_ATTEMPT_S:
                    errors.append(AttemptError(model, attempt, "deadline", "the request's deadline has passed"))
                    break
                if pause:
                    self.sleep(pause)
                timeout_s = min(s.provider_timeout_s, max(remaining, MIN_ATTEMPT_S))
                try:
                    completion = provider.complete(model_name, request, timeout_s=timeout_s)
                except ProviderError as exc:
                    errors.append(AttemptError(model, attempt, exc.kind, str(exc)))
                    if not exc.transient:
                        break
                    continue
                return Generation(completion, model, provider.name, fallback_used=model != chain[0], errors=errors)
        raise AllProvidersFailed(errors)

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
