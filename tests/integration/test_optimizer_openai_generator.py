"""The optimizer's OpenAI variant generator against a local server that speaks the protocol (the real SDK over
real HTTP): what it sends, what it reads, and an answer that is too slow or too large."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from services.optimizer.generation import GenerationFailed, OpenAIGenerator
from tests.fakes.openai_server import FakeOpenAIServer

TEMPLATE = "Explain {signal} for {ticker}.\n{indicators}"
VARIANTS = {"variants": [{"template": "Briefly: {signal} on {ticker}.\n{indicators}", "rationale": "shorter"}]}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(fake: FakeOpenAIServer) -> None:
    fake.reset()
    fake.answer(json.dumps(VARIANTS), prompt_tokens=1000, completion_tokens=200)


def _generator(fake: FakeOpenAIServer, timeout_s: float = 5.0) -> OpenAIGenerator:
    return OpenAIGenerator("sk-test", model="gpt-4o-mini", base_url=fake.openai_base_url, timeout_s=timeout_s)


def test_the_generator_sends_the_champion_and_reads_the_variants_and_their_cost(fake: FakeOpenAIServer) -> None:
    result = _generator(fake).generate(TEMPLATE, 2)
    assert [(c.template, c.rationale) for c in result.candidates] == [
        ("Briefly: {signal} on {ticker}.\n{indicators}", "shorter")
    ]
    assert (result.source, result.model, result.tokens_in, result.tokens_out) == ("openai", "gpt-4o-mini", 1000, 200)
    assert result.cost_usd > 0
    [received] = fake.requests
    assert received.model == "gpt-4o-mini" and received.authorization == "Bearer sk-test"
    assert [m["role"] for m in received.messages] == ["system", "user"] and TEMPLATE in received.messages[1]["content"]


def test_an_answer_that_trickles_past_the_timeout_fails_the_generation(fake: FakeOpenAIServer) -> None:
    # 8 bytes every 0.05 s: each wait is far under the 0.3 s timeout, the whole answer would take seconds
    fake.trickle_next(2, gap_s=0.05)
    with pytest.raises(GenerationFailed, match="still arriving after 0.3 s"):
        _generator(fake, timeout_s=0.3).generate(TEMPLATE, 2)


def test_an_oversized_answer_fails_the_generation(fake: FakeOpenAIServer) -> None:
    fake.answer("x" * (1 << 20))
    with pytest.raises(GenerationFailed, match="larger than"):
        _generator(fake).generate(TEMPLATE, 2)
