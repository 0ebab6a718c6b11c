"""The OpenAI, Groq and OpenAI-compatible adapters against a local server that speaks the protocol (OpenAI and
Groq through their official SDKs, self-hosted servers through plain HTTP): usage, retries with backoff, no retry
on 4xx, timeouts, fallback, all-fail."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.redis_server import free_port
from services.router.config import RouterSettings
from services.router.providers import (
    AllProvidersFailed,
    CompatibleProvider,
    Completion,
    NoProviderConfigured,
    ProviderRequest,
    ProviderSet,
    _error_message,
)
from shared.answers import MAX_ANSWER_BYTES, MAX_ERROR_BYTES
from tests.fakes.openai_server import FakeOpenAIServer

OPENAI = "openai/gpt-4o-mini"
GROQ = "groq/llama-3.1-8b-instant"
OFFLINE = "offline/template-v1"
REQUEST = ProviderRequest(prompt="Explain BUY for AAPL.\n- rsi: 28", ticker="AAPL", signal="BUY", context={"rsi": 28})


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(fake: FakeOpenAIServer) -> None:
    fake.reset()


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


_open: list[ProviderSet] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def provider_set(tmp_path: Path, fake: FakeOpenAIServer, sleeps: Sleeps | None = None, **kw: object) -> ProviderSet:
    options: dict[str, object] = {
        "data_dir": tmp_path,
        "openai_api_key": "sk-test",
        "openai_base_url": fake.openai_base_url,
        "groq_api_key": "gsk-test",
        "groq_base_url": fake.groq_base_url,
        "provider_timeout_s": 2.0,
        "provider_retries": 2,
        "retry_backoff_s": 0.01,
        **kw,
    }
    ps = ProviderSet(RouterSettings(**options), sleep=sleeps or Sleeps())  # type: ignore[arg-type]
    _open.append(ps)  # closed after the test: the SDK clients hold sockets
    return ps


def test_openai_adapter_sends_the_prompt_and_reads_text_and_usage(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.answer("RSI is low, so BUY.", prompt_tokens=321, completion_tokens=54)
    result = provider_set(tmp_path, fake).generate([OPENAI], REQUEST)
    assert result.completion.text == "RSI is low, so BUY."
    assert (result.completion.tokens_in, result.completion.tokens_out) == (321, 54)
    assert (result.model, result.provider, result.fallback_used) == (OPENAI, "openai", False)
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions" and sent.model == "gpt-4o-mini"
    assert sent.authorization == "Bearer sk-test"
    assert sent.messages[-1] == {"role": "user", "content": REQUEST.prompt}


def test_groq_adapter_uses_the_groq_path_and_key(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    result = provider_set(tmp_path, fake).generate([GROQ], REQUEST)
    assert (result.model, result.provider) == (GROQ, "groq")
    sent = fake.requests[-1]
    assert sent.path == "/openai/v1/chat/completions" and sent.model == "llama-3.1-8b-instant"
    assert sent.authorization == "Bearer gsk-test"


def test_server_errors_are_retried_with_exponential_backoff(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.fail_next(2, status=500)
    sleeps = Sleeps()
    result = provider_set(tmp_path, fake, sleeps, retry_backoff_s=0.05).generate([OPENAI, OFFLINE], REQUEST)
    assert (result.model, result.fallback_used) == (OPENAI, False)
    assert len(fake.requests) == 3
    assert sleeps.calls == [0.05, 0.1]
    assert [e.kind for e in result.errors] == ["http_500", "http_500"]


def test_rate_limits_are_retried(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.fail_next(1, status=429)
    result = provider_set(tmp_path, fake).generate([GROQ], REQUEST)
    assert result.model == GROQ and len(fake.requests) == 2
    assert [e.kind for e in result.errors] == ["rate_limited"]


def test_client_errors_are_not_retried_and_fall_back_to_the_next_model(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.fail_next(1, status=401)
    result = provider_set(tmp_path, fake).generate([OPENAI, GROQ], REQUEST)
    assert (result.model, result.fallback_used) == (GROQ, True)
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/openai/v1/chat/completions"]
    assert [e.kind for e in result.errors] == ["http_401"]


def test_a_hanging_provider_times_out_and_offline_answers(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.hang_next(10, seconds=5)
    ps = provider_set(tmp_path, fake, provider_timeout_s=0.2, provider_retries=1)
    result = ps.generate([OPENAI, OFFLINE], REQUEST)
    assert (result.model, result.provider, result.fallback_used) == (OFFLINE, "offline", True)
    assert [e.kind for e in result.errors] == ["timeout", "timeout"]


def test_when_every_provider_fails_the_error_names_each(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.fail_next(100, status=503)
    ps = provider_set(tmp_path, fake, provider_retries=1, offline_fallback=False)
    with pytest.raises(AllProvidersFailed) as failed:
        ps.generate(ps.chain(OPENAI, GROQ), REQUEST)
    assert len(fake.requests) == 4  # two models, two tries each
    assert OPENAI in str(failed.value) and GROQ in str(failed.value) and "http_503" in str(failed.value)


def test_no_configured_provider_is_its_own_error(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    ps = provider_set(tmp_path, fake, openai_api_key=None, groq_api_key=None, offline_fallback=False)
    assert ps.chain(OPENAI, OPENAI) == [OPENAI]
    with pytest.raises(NoProviderConfigured):
        ps.generate(ps.chain(OPENAI, OPENAI), REQUEST)
    assert fake.requests == []


def test_registered_local_model_is_served_from_its_base_url(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    ps = provider_set(tmp_path, fake, openai_api_key=None, groq_api_key=None)
    assert ps.provider_for("local/ft-1") is None  # no base URL known yet
    result = ps.generate(["local/ft-1"], REQUEST, {"local/ft-1": fake.url})  # no /v1: it is added
    assert (result.model, result.provider) == ("local/ft-1", "local")
    assert fake.requests[-1].path == "/v1/chat/completions" and fake.requests[-1].model == "ft-1"


def test_compatible_base_url_serves_vllm_models(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    ps = provider_set(tmp_path, fake, compatible_base_url=fake.openai_base_url)
    result = ps.generate(["vllm/meta-llama/Llama-3-8B"], REQUEST)
    assert result.provider == "vllm" and fake.requests[-1].model == "meta-llama/Llama-3-8B"


def test_missing_usage_is_estimated_from_words(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.answer("one two three four five six seven eight nine ten", prompt_tokens=None, completion_tokens=None)
    result = provider_set(tmp_path, fake).generate([OPENAI], REQUEST)
    assert result.completion.tokens_out == 13


def test_one_deadline_bounds_all_hosted_attempts_of_a_request(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.hang_next(100, seconds=5)
    ps = provider_set(tmp_path, fake, provider_timeout_s=0.3, provider_retries=5, request_deadline_s=0.5)
    result = ps.generate([OPENAI, GROQ, OFFLINE], REQUEST)
    # the deadline (0.5 s) cuts the hung attempts short: fewer than even one model's 6 tries, not 6 x 2 models
    assert 1 <= len(fake.requests) < 6, [r.model for r in fake.requests]
    assert result.model == OFFLINE
    assert "deadline" in [e.kind for e in result.errors]


# -- the plain-HTTP adapter of self-hosted OpenAI-compatible servers (vllm/, local/) -------------------------

VLLM = "vllm/meta-llama/Llama-3-8B"


def compatible(tmp_path: Path, fake: FakeOpenAIServer, sleeps: Sleeps | None = None, **kw: object) -> ProviderSet:
    options: dict[str, object] = {"compatible_base_url": fake.url, "compatible_api_key": "vllm-key", **kw}
    return provider_set(tmp_path, fake, sleeps, **options)


def test_compatible_adapter_sends_the_sdks_request_and_reads_text_and_usage(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    ps = compatible(tmp_path, fake)
    assert isinstance(ps.provider_for(VLLM), CompatibleProvider)
    result = ps.generate([VLLM], REQUEST)
    assert (result.model, result.provider, result.errors) == (VLLM, "vllm", [])
    assert result.completion == Completion("The indicators support the signal.", 120, 45)
    sent = fake.requests[-1]
    assert (sent.path, sent.model, sent.authorization) == (
        "/v1/chat/completions",
        "meta-llama/Llama-3-8B",
        "Bearer vllm-key",
    )
    assert [m["role"] for m in sent.messages] == ["system", "user"] and sent.messages[1]["content"] == REQUEST.prompt
    # the same body the openai SDK adapter sends
    ps.generate([OPENAI], REQUEST)
    assert fake.requests[-1].messages == sent.messages


def test_compatible_adapter_retries_server_errors_and_rate_limits_with_backoff(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.fail_next(1, status=503)
    sleeps = Sleeps()
    first = compatible(tmp_path, fake, sleeps, retry_backoff_s=0.05).generate([VLLM], REQUEST)
    fake.fail_next(1, status=429)
    second = compatible(tmp_path, fake).generate([VLLM], REQUEST)
    assert [e.kind for e in first.errors + second.errors] == ["http_503", "rate_limited"]
    assert "fake failure 503" in first.errors[0].message  # the server's own error message, not its raw body
    assert sleeps.calls == [0.05] and len(fake.requests) == 4


def test_compatible_adapter_does_not_retry_client_errors(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.fail_next(1, status=401)
    result = compatible(tmp_path, fake).generate([VLLM, OPENAI], REQUEST)
    assert (result.model, result.fallback_used) == (OPENAI, True)
    assert [e.kind for e in result.errors] == ["http_401"] and len(fake.requests) == 2


def test_compatible_adapter_times_out_on_a_hanging_server(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    fake.hang_next(10, seconds=5)
    ps = compatible(tmp_path, fake, provider_timeout_s=0.2, provider_retries=1)
    result = ps.generate([VLLM, OFFLINE], REQUEST)
    assert (result.model, [e.kind for e in result.errors]) == (OFFLINE, ["timeout", "timeout"])


def test_compatible_adapter_reads_a_slow_answer_that_ends_in_time_and_refuses_an_oversized_one(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.trickle_next(1, gap_s=0.001)
    ps = compatible(tmp_path, fake, provider_timeout_s=5.0)
    slow = ps.generate([VLLM, OFFLINE], REQUEST)
    assert (slow.model, slow.completion.text, slow.errors) == (VLLM, fake.behaviour.text, [])
    fake.answer("x" * (1 << 20))
    big = ps.generate([VLLM, OFFLINE], REQUEST)
    assert (big.model, [e.kind for e in big.errors]) == (OFFLINE, ["bad_response"])  # not transient: no retry
    assert "larger than" in big.errors[0].message


def test_compatible_adapter_keeps_an_error_status_whatever_its_body(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    # a 503 with a body over the answer's cap (a proxy's page): still a transient http_503, retried, then answered
    fake.fail_next(1, status=503, padding=2 * MAX_ANSWER_BYTES)
    result = compatible(tmp_path, fake, Sleeps()).generate([VLLM, OFFLINE], REQUEST)
    assert (result.model, [e.kind for e in result.errors]) == (VLLM, ["http_503"])
    assert "fake failure 503" in result.errors[0].message and len(fake.requests) == 2
    assert len(result.errors[0].message) <= MAX_ERROR_BYTES  # the message is cut, not the page kept
    fake.reset()
    assert compatible(tmp_path, fake).generate([VLLM, OFFLINE], REQUEST).model == VLLM  # the cut connection closed


def test_compatible_adapter_names_a_refused_connection_and_a_body_that_is_not_json(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    refused = provider_set(tmp_path, fake, compatible_base_url=f"http://127.0.0.1:{free_port()}", provider_retries=1)
    result = refused.generate([VLLM, OFFLINE], REQUEST)
    assert [e.kind for e in result.errors] == ["connection", "connection"]  # transient: retried once
    fake.garble_next(1)
    garbled = compatible(tmp_path, fake).generate([VLLM, OFFLINE], REQUEST)
    assert [e.kind for e in garbled.errors] == ["bad_response"] and len(fake.requests) == 1  # not retried


def test_compatible_adapter_estimates_missing_usage_and_refuses_an_empty_answer(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    fake.answer("one two three four five six seven eight nine ten", prompt_tokens=None, completion_tokens=None)
    assert compatible(tmp_path, fake).generate([VLLM], REQUEST).completion.tokens_out == 13
    fake.answer("   ")
    result = compatible(tmp_path, fake).generate([VLLM, OFFLINE], REQUEST)
    assert result.model == OFFLINE and [e.kind for e in result.errors] == ["bad_response"]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"error": {"message": "model not found", "type": "invalid_request_error"}}', "model not found"),
        (b'{"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400}',
         "max_tokens is too large"),  # vLLM's older form
        (b'{"detail": "not authenticated"}', "not authenticated"),
        (b"<html>502 Bad Gateway</html>", "<html>502 Bad Gateway</html>"),
    ],
)  # fmt: skip
def test_compatible_adapter_reports_what_the_error_body_says(body: bytes, said: str) -> None:
    assert _error_message(body) == said


def test_compatible_adapter_follows_a_redirect_as_the_sdk_does(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    result = compatible(tmp_path, fake, compatible_base_url=fake.url + "/moved").generate([VLLM], REQUEST)
    assert result.errors == [] and [r.path for r in fake.requests] == ["/v1/chat/completions"]


def test_compatible_adapter_turns_any_other_failure_into_an_error_that_falls_back(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    # a key read from a file with its newline: the HTTP library refuses the header before anything is sent
    result = compatible(tmp_path, fake, compatible_api_key="vllm-key\n").generate([VLLM, OFFLINE], REQUEST)
    assert result.model == OFFLINE and [e.kind for e in result.errors] == ["bad_response"]
    assert fake.requests == []


#: every adapter: (a model it serves, the provider set that reaches the fake through it)
EVERY_ADAPTER = [
    pytest.param(VLLM, compatible, id="compatible"),
    pytest.param(OPENAI, provider_set, id="openai-sdk"),
    pytest.param(GROQ, provider_set, id="groq-sdk"),
]


@pytest.mark.parametrize(("model", "providers"), EVERY_ADAPTER)
def test_every_adapter_gives_up_on_an_answer_that_trickles_past_its_timeout(
    tmp_path: Path, fake: FakeOpenAIServer, model: str, providers: Callable[..., ProviderSet]
) -> None:
    # about 300 bytes, 8 every 0.05 s: the whole answer takes ~2 s, each read waits far less than the 0.3 s timeout
    fake.trickle_next(10, gap_s=0.05)
    ps = providers(tmp_path, fake, provider_timeout_s=0.3, provider_retries=1)
    result = ps.generate([model, OFFLINE], REQUEST)
    assert (result.model, [e.kind for e in result.errors]) == (OFFLINE, ["timeout", "timeout"])
    assert "still arriving" in result.errors[0].message
    # the cut connections were closed, not pooled: the next answer (whole, at once) comes through
    fake.reset()
    assert ps.generate([model, OFFLINE], REQUEST).model == model


@pytest.mark.parametrize("model", [OPENAI, GROQ])
def test_sdk_adapters_refuse_an_oversized_answer_and_keep_an_error_status_whatever_its_body(
    tmp_path: Path, fake: FakeOpenAIServer, model: str
) -> None:
    fake.answer("x" * (1 << 20))
    big = provider_set(tmp_path, fake).generate([model, OFFLINE], REQUEST)
    assert (big.model, [e.kind for e in big.errors]) == (OFFLINE, ["bad_response"])  # not transient: no retry
    assert "larger than" in big.errors[0].message
    fake.reset()
    # a 503 with a body over the answer's cap (a proxy's page): still a transient http_503, retried, then answered
    fake.fail_next(1, status=503, padding=2 * MAX_ANSWER_BYTES)
    result = provider_set(tmp_path, fake, Sleeps()).generate([model, OFFLINE], REQUEST)
    assert (result.model, [e.kind for e in result.errors]) == (model, ["http_503"])
    assert len(fake.requests) == 2 and len(result.errors[0].message) <= MAX_ERROR_BYTES + 100  # the page was cut


@pytest.mark.parametrize(("model", "providers"), EVERY_ADAPTER)
def test_every_adapter_keeps_an_answer_whose_last_piece_arrives_just_past_its_deadline(
    tmp_path: Path, fake: FakeOpenAIServer, model: str, providers: Callable[..., ProviderSet]
) -> None:
    # three pieces 0.5 s apart: each wait is under the 0.8 s timeout, the whole answer is in at 1.0 s, complete
    fake.trickle_next(1, gap_s=0.5, pieces=3)
    result = providers(tmp_path, fake, provider_timeout_s=0.8, provider_retries=0).generate([model, OFFLINE], REQUEST)
    assert (result.model, result.completion.text, result.errors) == (model, fake.behaviour.text, [])


@pytest.mark.parametrize("model", [OPENAI, GROQ])
def test_sdk_adapters_go_through_the_proxy_of_the_environment_and_ask_for_no_compression(
    tmp_path: Path, fake: FakeOpenAIServer, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nothing listens at the provider's address: only through the proxy (the fake, in its forward-proxy role)
    # does the request arrive
    monkeypatch.setenv("HTTP_PROXY", fake.url)
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    closed = f"http://127.0.0.1:{free_port()}"
    ps = provider_set(tmp_path, fake, openai_base_url=f"{closed}/v1", groq_base_url=closed, provider_retries=0)
    result = ps.generate([model, OFFLINE], REQUEST)
    assert (result.model, result.errors) == (model, [])
    [received] = fake.requests
    assert received.proxied and received.accept_encoding == "identity"  # the 1 MiB cap counts what is parsed
