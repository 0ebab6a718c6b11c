"""Variant generation: new versions of a prompt template, from OpenAI (the plan's meta-prompt) when a key is
set, else from a deterministic offline rewriter. Guardrails and the rate limit are applied by the handler
(`registry.generate_variants`); a generator only proposes.

Only `OpenAIGenerator.generate` imports openai, so the service runs without it when no key is set.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from services.optimizer.config import OptimizerSettings


@dataclass(frozen=True)
class Candidate:
    template: str
    rationale: str


@dataclass(frozen=True)
class GenerationResult:
    source: str  # "offline" | "openai"
    model: str
    candidates: tuple[Candidate, ...]
    cost_usd: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0


class GenerationFailed(RuntimeError):
    """The generator could not produce anything (provider down, unreadable answer)."""


class VariantGenerator(Protocol):
    def generate(self, template: str, count: int) -> GenerationResult: ...


# --------------------------------------------------------------------------------------------------------
# Offline: deterministic rewrites
# --------------------------------------------------------------------------------------------------------

# Style traits, in the order the offline generator tries them, with the cue a template carries once it has
# the trait (the router's offline provider honours the same cues, so users can tell the variants apart).
TRAITS: tuple[tuple[str, str, str], ...] = (
    ("bullets", "bullet", "format as bullet points, one per key indicator"),
    ("risk", "risk note", "add a risk note: what would make the signal wrong"),
    ("concise", "concise", "more concise"),
    ("plain", "plain language", "plain language for a beginner"),
)

_LEAD_DEFAULT = (
    "Explain in 3-4 sentences why the indicators support a {signal} signal for {ticker}. "
    "Mention the most important indicator first."
)
_LEADS = {
    frozenset(): _LEAD_DEFAULT,
    frozenset({"bullets"}): (
        "Answer with exactly 3 bullet points, one per key indicator (strongest first), each showing how it "
        "backs the {signal} call on {ticker}."
    ),
    frozenset({"concise"}): (
        "Be concise: two short sentences at most on what drives the {signal} call on {ticker}, strongest "
        "indicator first, no filler."
    ),
    frozenset({"bullets", "concise"}): (
        "Be concise: 3 terse bullet points of at most 12 words, one per key indicator, on why {ticker} is a {signal}."
    ),
}
_PLAIN = (
    "Use plain language a beginner understands: no jargon, and say in everyday words what each indicator "
    "means for the price."
)
_RISK = (
    "Close with a one-line risk note naming the main thing that would have to happen for this {signal} call "
    "to turn out wrong."
)


def traits_of(template: str) -> set[str]:
    low = template.lower()
    return {name for name, cue, _ in TRAITS if cue in low}


def _split(template: str) -> tuple[str, str]:
    """(data block up to and including the indicators, instructions after it)."""
    idx = template.find("{indicators}")
    if idx < 0:
        return template.rstrip() + "\n", ""
    end = template.find("\n", idx)
    if end < 0:
        return template + "\n", ""
    return template[: end + 1], template[end + 1 :].strip()


def render_with_traits(template: str, traits: set[str]) -> str:
    """The template with its instructions rewritten for these style traits (the data block is kept)."""
    head, _ = _split(template)
    parts = [_LEADS[frozenset(traits & {"bullets", "concise"})]]
    if "plain" in traits:
        parts.append(_PLAIN)
    if "risk" in traits:
        parts.append(_RISK)
    return head + "\n" + " ".join(parts)


class OfflineGenerator:
    """Adds one style trait per variant to the champion's traits (bullets, risk note, concise, plain
    language, in that order, skipping those it already has). Free, deterministic, needs no key."""

    source = "offline"

    def generate(self, template: str, count: int) -> GenerationResult:
        have = traits_of(template)
        out = []
        for name, _, why in TRAITS:
            if len(out) >= count:
                break
            if name in have:
                continue
            out.append(Candidate(render_with_traits(template, have | {name}), why))
        return GenerationResult(source=self.source, model="offline/rewriter-v1", candidates=tuple(out))


# --------------------------------------------------------------------------------------------------------
# OpenAI: the plan's meta-prompt
# --------------------------------------------------------------------------------------------------------

META_SYSTEM = (
    "You improve prompt templates for an assistant that explains trading signals (BUY/SELL/HOLD) to retail "
    "investors. You answer with JSON only."
)
META_USER = (
    "Here is the current prompt template, between the markers:\n<<<\n{template}\n>>>\n\n"
    "Generate {count} variants of this prompt template that are clearer or more concise, each trying a "
    "different idea (for example bullet points, a short risk note, plain language, a tighter length limit). "
    "Every variant must keep the placeholders {{ticker}}, {{signal}} and {{indicators}} exactly as written, "
    "use no other curly-brace placeholders, and stay under {max_chars} characters.\n"
    'Answer as JSON: {{"variants": [{{"template": "...", "rationale": "one line: what changed and why"}}]}}'
)

# USD per 1M tokens (input, output); unknown models are priced like gpt-4o-mini.
PRICES_PER_M: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}


def price_usd(model: str, tokens_in: int, tokens_out: int) -> float:
    p_in, p_out = PRICES_PER_M.get(model, PRICES_PER_M["gpt-4o-mini"])
    return (tokens_in * p_in + tokens_out * p_out) / 1_000_000


def parse_variants(content: str) -> list[Candidate]:
    """Read the model's answer: the JSON asked for, or JSON inside a code fence."""
    text = content.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fence:
        text = fence.group(1).strip()
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GenerationFailed(f"the generator's answer is not JSON: {exc}") from exc
    items = data.get("variants") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise GenerationFailed("the generator's answer has no list of variants")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Candidate(item, "generated"))
        elif isinstance(item, dict) and isinstance(item.get("template"), str):
            out.append(Candidate(item["template"], str(item.get("rationale") or "generated")[:300]))
    return out


class OpenAIGenerator:
    source = "openai"

    def __init__(
        self, api_key: str, *, model: str, base_url: str | None = None, timeout_s: float = 60.0, max_chars: int = 2000
    ) -> None:
        self.api_key = api_key
        self.model = model
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_chars = max_chars

    def generate(self, template: str, count: int) -> GenerationResult:
        import openai  # the only place the optimizer touches the OpenAI SDK

        client = openai.OpenAI(api_key=self.api_key, base_url=self.base_url, timeout=self.timeout_s, max_retries=1)
        try:
            response = client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": META_SYSTEM},
                    {
                        "role": "user",
                        "content": META_USER.format(template=template, count=count, max_chars=self.max_chars),
                    },
                ],
                response_format={"type": "json_object"},
                temperature=0.8,
            )
        except openai.OpenAIError as exc:
            raise GenerationFailed(f"OpenAI variant generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            client.close()
        usage = response.usage
        tokens_in = int(usage.prompt_tokens) if usage else 0
        tokens_out = int(usage.completion_tokens) if usage else 0
        content = response.choices[0].message.content or "" if response.choices else ""
        return GenerationResult(
            source=self.source,
            model=self.model,
            candidates=tuple(parse_variants(content)[:count]),
            cost_usd=price_usd(self.model, tokens_in, tokens_out),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )


def make_generator(settings: OptimizerSettings) -> VariantGenerator:
    """OpenAI when OPENAI_API_KEY is set, the offline rewriter otherwise."""
    if settings.has_openai():
        assert settings.openai_api_key is not None
        return OpenAIGenerator(
            settings.openai_api_key.get_secret_value(),
            model=settings.generation_model,
            base_url=settings.openai_base_url,
            timeout_s=settings.generation_timeout_s,
            max_chars=settings.max_variant_chars,
        )
    return OfflineGenerator()
