"""The offline provider: deterministic text that follows the prompt's style cues, so variants really differ."""

from __future__ import annotations

import re

from services.router.domain import ContextValue
from services.router.providers import OfflineProvider, ProviderRequest, offline_explanation, style_cues
from shared.prompts import SEED_TEMPLATE, render

CTX: dict[str, ContextValue] = {"rsi": 27.5, "macd": "bullish_crossover", "volume": "high", "sma_50": 182.1}


def request(
    template: str, *, ticker: str = "AAPL", signal: str = "BUY", context: dict[str, ContextValue] | None = None
) -> ProviderRequest:
    ctx = CTX if context is None else context
    return ProviderRequest(render(template, ticker=ticker, signal=signal, context=ctx), ticker, signal, ctx)


def sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s])


def test_same_request_gives_the_same_text() -> None:
    assert offline_explanation(request(SEED_TEMPLATE)) == offline_explanation(request(SEED_TEMPLATE))


def test_seed_prompt_gives_a_few_sentences_leading_with_the_most_important_indicator() -> None:
    text = offline_explanation(request(SEED_TEMPLATE))
    assert text.startswith("AAPL gets a BUY signal mainly because RSI at 27.5 is oversold.")
    assert 3 <= sentences(text) <= 4
    assert not style_cues(request(SEED_TEMPLATE).prompt, "AAPL", CTX)["bullets"]


def test_bullet_cue_gives_bullet_points() -> None:
    text = offline_explanation(request("Use bullet points. {ticker} {signal}\n{indicators}"))
    lines = text.splitlines()
    assert len(lines) >= 3 and all(line.startswith("- ") for line in lines)


def test_concise_cue_gives_one_or_two_sentences() -> None:
    for word in ("concise", "brief", "short"):
        text = offline_explanation(request(f"Be {word}. {{ticker}} {{signal}}\n{{indicators}}"))
        assert 1 <= sentences(text) <= 2, text


def test_risk_cue_adds_a_risk_note() -> None:
    assert "Risk note" in offline_explanation(request("Mention the risk. {ticker} {signal}\n{indicators}"))
    assert "Risk note" not in offline_explanation(request(SEED_TEMPLATE))


def test_plain_language_cue_avoids_jargon() -> None:
    text = offline_explanation(request("Use plain language. {ticker} {signal}\n{indicators}"))
    for jargon in ("RSI", "MACD", "SMA", "oversold", "overbought", "bullish", "bearish"):
        assert jargon not in text, jargon


def test_cues_inside_indicators_or_ticker_do_not_change_the_style() -> None:
    ctx: dict[str, ContextValue] = {"risk_score": 3, "short_interest": "simple"}
    req = request(SEED_TEMPLATE, ticker="SHORT", context=ctx)
    assert style_cues(req.prompt, req.ticker, ctx) == {
        "bullets": False,
        "concise": False,
        "risk": False,
        "plain": False,
    }


def test_no_indicators_still_gives_an_explanation() -> None:
    text = offline_explanation(request(SEED_TEMPLATE, signal="HOLD", context={}))
    assert "HOLD" in text and "no indicators" in text


def test_token_counts_are_estimated_from_words() -> None:
    req = request(SEED_TEMPLATE, signal="SELL")
    out = OfflineProvider().complete("template-v1", req, timeout_s=1)
    assert out.tokens_in == -(-len(req.prompt.split()) * 13 // 10)
    assert out.tokens_out == -(-len(out.text.split()) * 13 // 10)
