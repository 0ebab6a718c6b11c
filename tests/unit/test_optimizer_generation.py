"""Variant generators: the offline rewriter's style traits and the OpenAI answer parser."""

from __future__ import annotations

import itertools

import pytest
from pydantic import SecretStr

from services.optimizer import domain
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import (
    GenerationFailed,
    OfflineGenerator,
    OpenAIGenerator,
    make_generator,
    parse_variants,
    price_usd,
    traits_of,
)
from shared.prompts import SEED_TEMPLATE, check_template


def test_offline_generator_adds_one_style_trait_per_variant() -> None:
    result = OfflineGenerator().generate(SEED_TEMPLATE, 3)
    assert result.source == "offline" and result.cost_usd == 0.0
    assert [sorted(traits_of(c.template)) for c in result.candidates] == [["bullets"], ["risk"], ["concise"]]


def test_offline_generator_is_deterministic_and_builds_on_the_champion() -> None:
    first = OfflineGenerator().generate(SEED_TEMPLATE, 3)
    assert first == OfflineGenerator().generate(SEED_TEMPLATE, 3)
    bullets = first.candidates[0].template
    second = OfflineGenerator().generate(bullets, 3)
    assert [sorted(traits_of(c.template)) for c in second.candidates] == [
        ["bullets", "risk"],
        ["bullets", "concise"],
        ["bullets", "plain"],
    ]


def test_every_offline_rewrite_keeps_the_template_contract_and_is_no_near_duplicate() -> None:
    seen: dict[frozenset[str], str] = {frozenset(): SEED_TEMPLATE}
    frontier = [SEED_TEMPLATE]
    while frontier:
        template = frontier.pop()
        for cand in OfflineGenerator().generate(template, 4).candidates:
            check_template(cand.template)
            key = frozenset(traits_of(cand.template))
            if key not in seen:
                seen[key] = cand.template
                frontier.append(cand.template)
    assert len(seen) == 16  # every combination of the four traits
    worst = max(domain.similarity(a, b) for a, b in itertools.combinations(seen.values(), 2))
    assert worst < 0.9


def test_offline_generator_has_nothing_left_when_every_trait_is_present() -> None:
    template = SEED_TEMPLATE
    for _ in range(4):
        template = OfflineGenerator().generate(template, 1).candidates[0].template
    assert traits_of(template) == {"bullets", "risk", "concise", "plain"}
    assert OfflineGenerator().generate(template, 3).candidates == ()


def test_openai_answer_is_parsed_from_json_or_a_fenced_block() -> None:
    body = '{"variants": [{"template": "A {ticker} {signal} {indicators}", "rationale": "shorter"}, "B {ticker}"]}'
    assert [c.template for c in parse_variants(body)] == ["A {ticker} {signal} {indicators}", "B {ticker}"]
    fenced = "Here you go:\n```json\n" + body + "\n```"
    assert parse_variants(fenced)[0].rationale == "shorter"


def test_unreadable_openai_answer_fails_loudly() -> None:
    with pytest.raises(GenerationFailed):
        parse_variants("I cannot help with that.")
    with pytest.raises(GenerationFailed):
        parse_variants('{"something": 1}')


def test_generation_cost_uses_the_models_token_prices() -> None:
    assert price_usd("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert price_usd("unknown-model", 1000, 0) == pytest.approx(0.00015)


def test_generator_is_openai_only_with_a_key() -> None:
    assert isinstance(make_generator(OptimizerSettings(openai_api_key=None)), OfflineGenerator)
    assert isinstance(make_generator(OptimizerSettings(openai_api_key=SecretStr("sk-test"))), OpenAIGenerator)


def test_seed_model_follows_the_routers_default_rule() -> None:
    assert OptimizerSettings(openai_api_key=None, groq_api_key=None).seed_model() == "offline/template-v1"
    assert (
        OptimizerSettings(openai_api_key=None, groq_api_key=SecretStr("g")).seed_model() == "groq/llama-3.1-8b-instant"
    )
    assert (
        OptimizerSettings(openai_api_key=SecretStr("o"), groq_api_key=SecretStr("g")).seed_model()
        == "openai/gpt-4o-mini"
    )
