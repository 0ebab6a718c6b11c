"""Routing rules: input checks, sticky assignment, cost, fallback order."""

from __future__ import annotations

import math

import pytest

from services.router import domain
from services.router.domain import Arm, Experiment, Routing, Template

T1 = Template("explain_signal", "v1.0", "t1 {ticker} {signal} {indicators}")
T2 = Template("explain_signal", "v1.1", "t2 {ticker} {signal} {indicators}")


def arms(*weights: float) -> tuple[Arm, ...]:
    return tuple(Arm(f"arm{i}", T1 if i == 0 else T2, "offline/template-v1", w, i == 0) for i, w in enumerate(weights))


def test_lowercase_ticker_is_normalised_to_upper_case() -> None:
    assert domain.normalise_ticker(" brk.b ") == "BRK.B"


@pytest.mark.parametrize("bad", ["", "A" * 13, "AA PL", "AAPL$", "ÄPFEL"])
def test_ticker_outside_the_allowed_alphabet_is_refused(bad: str) -> None:
    with pytest.raises(domain.InvalidRequest, match="ticker must be 1-12"):
        domain.normalise_ticker(bad)


def test_context_accepts_numbers_strings_and_booleans() -> None:
    ctx = {"rsi": 28, "macd": -0.5, "trend": "up", "breakout": True}
    assert domain.check_context(ctx) == ctx


@pytest.mark.parametrize(
    ("ctx", "message"),
    [
        ({"a": None}, "number, string or boolean, not null"),
        ({"a": [1]}, "not list"),
        ({"a": {"b": 1}}, "not dict"),
        ({"a": float("nan")}, "finite"),
        ({"a": 10**400}, "fits in 64 bits"),
        ({"a": -(2**63) - 1}, "fits in 64 bits"),
        ({"a": "x" * 201}, "at most 200"),
        ({"a": "line\nbreak"}, "without line breaks"),
        ({"": 1}, "context key"),
        ({"k" * 65: 1}, "context key"),
        ({f"k{i}": i for i in range(51)}, "at most 50"),
    ],
)
def test_context_that_breaks_a_rule_is_refused_with_the_reason(ctx: dict, message: str) -> None:
    with pytest.raises(domain.InvalidRequest, match=message):
        domain.check_context(ctx)


def test_request_key_ignores_context_key_order_but_not_values() -> None:
    a = domain.request_key("AAPL", "BUY", {"rsi": 28, "macd": 1})
    b = domain.request_key("AAPL", "BUY", {"macd": 1, "rsi": 28})
    c = domain.request_key("AAPL", "BUY", {"macd": 1, "rsi": 29})
    assert a == b != c
    assert len(a) == 64


def test_unit_interval_is_stable_and_in_range() -> None:
    points = [domain.unit_interval(f"session-{i}", "exp-1") for i in range(1000)]
    assert all(0 <= p < 1 for p in points)
    assert domain.unit_interval("session-1", "exp-1") == points[1]
    assert domain.unit_interval("session-1", "exp-2") != points[1]


def test_assign_arm_follows_cumulative_weights() -> None:
    a = arms(1, 3)  # shares 0.25 / 0.75
    assert domain.assign_arm(a, 0.0).arm_id == "arm0"
    assert domain.assign_arm(a, 0.2499).arm_id == "arm0"
    assert domain.assign_arm(a, 0.25).arm_id == "arm1"
    assert domain.assign_arm(a, 0.999999).arm_id == "arm1"


def test_assignment_shares_match_the_weights_over_many_sessions() -> None:
    a = arms(0.2, 0.3, 0.5)
    n = 20_000
    counts = {arm.arm_id: 0 for arm in a}
    for i in range(n):
        counts[domain.assign_arm(a, domain.unit_interval(f"s{i}", "exp-7")).arm_id] += 1
    for arm, expected in zip(a, (0.2, 0.3, 0.5), strict=True):
        # binomial standard error at n=20000 is <= 0.0036: allow 4 of them
        assert abs(counts[arm.arm_id] / n - expected) < 0.015


def test_zero_or_negative_weights_mean_equal_shares() -> None:
    assert domain.normalised_weights(arms(0, 0)) == [0.5, 0.5]
    assert domain.normalised_weights(arms(-1, 1)) == [0.0, 1.0]


def test_same_session_always_gets_the_same_variant() -> None:
    routing = Routing(T1, "offline/template-v1", Experiment("exp-1", arms(1, 1)))
    first = domain.choose_variant(routing, "session-abc")
    assert all(domain.choose_variant(routing, "session-abc") == first for _ in range(20))
    assert first.experiment_id == "exp-1" and first.arm_id in {"arm0", "arm1"}


def test_without_an_experiment_the_champion_serves() -> None:
    v = domain.choose_variant(Routing(T2, "groq/llama-3.1-8b-instant"), "s")
    assert (v.prompt, v.model, v.experiment_id, v.arm_id) == (T2, "groq/llama-3.1-8b-instant", None, None)


def test_split_model_names_provider_and_model() -> None:
    assert domain.split_model("local/ft-3f2a") == ("local", "ft-3f2a")
    assert domain.split_model("vllm/org/model-7b") == ("vllm", "org/model-7b")
    for bad in ("gpt-4o", "azure/gpt-4o", "openai/"):
        with pytest.raises(ValueError):
            domain.split_model(bad)


def test_cost_is_tokens_times_price_per_million() -> None:
    # 1000 in at $0.15/1M + 500 out at $0.60/1M = 0.00015 + 0.0003
    assert math.isclose(domain.cost_usd(1000, 500, {"input": 0.15, "output": 0.60}), 0.00045)
    assert domain.cost_usd(1000, 500, None) == 0.0


def test_price_override_beats_registered_price_beats_default() -> None:
    defaults = {"openai/gpt-4o-mini": {"input": 0.15, "output": 0.6}}
    assert domain.price_for("openai/gpt-4o-mini", defaults=defaults, overrides={}) == {"input": 0.15, "output": 0.6}
    assert domain.price_for(
        "openai/gpt-4o-mini", defaults=defaults, overrides={"openai/gpt-4o-mini": {"output": 1.0}}
    ) == {"input": 0.15, "output": 1.0}
    assert domain.price_for("local/ft", defaults=defaults, overrides={}, registered_per_1k=0.0002) == {
        "input": 0.2,
        "output": 0.2,
    }
    assert domain.price_for("local/unknown", defaults=defaults, overrides={}) == {"input": 0.0, "output": 0.0}


def test_fallback_chain_is_assigned_then_champion_then_others_then_offline_without_repeats() -> None:
    chain = domain.fallback_chain(
        "local/ft-1",
        "openai/gpt-4o-mini",
        ["openai/gpt-4o-mini", "groq/llama-3.1-8b-instant"],
        offline_model="offline/template-v1",
        offline_fallback=True,
    )
    assert chain == ["local/ft-1", "openai/gpt-4o-mini", "groq/llama-3.1-8b-instant", "offline/template-v1"]
    no_offline = domain.fallback_chain("a/x", "a/x", [], offline_model="offline/template-v1", offline_fallback=False)
    assert no_offline == ["a/x"]


def test_backoff_doubles_and_is_capped() -> None:
    assert domain.backoff_delays(4, 0.25, 1.0) == [0.25, 0.5, 1.0, 1.0]
    assert domain.backoff_delays(0, 0.25, 1.0) == []


def test_token_estimate_is_words_times_1_3_rounded_up() -> None:
    assert domain.estimate_tokens("one two three") == 4  # 3.9 -> 4
    assert domain.estimate_tokens(" ".join(["w"] * 10)) == 13  # float ceil(10 * 1.3) would say 14
    assert domain.estimate_tokens("") == 0


def test_budget_day_and_reset_are_utc() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from services.router.domain import budget_day, budget_left, is_free, seconds_until_reset

    late = datetime(2026, 12, 1, 23, 59, 30, tzinfo=UTC)
    assert budget_day(late) == "2026-12-01"
    assert budget_day(late.astimezone(timezone(timedelta(hours=5)))) == "2026-12-01"
    assert seconds_until_reset(late) == 30
    assert seconds_until_reset(datetime(2026, 12, 2, tzinfo=UTC)) == 86_400
    assert budget_left(None, 1e9) and budget_left(1.0, 0.99) and not budget_left(1.0, 1.0)
    assert is_free({"input": 0.0, "output": 0.0}) and not is_free({"input": 0.0, "output": 0.1})


def test_unsafe_text_is_named() -> None:
    from shared.text import unsafe_text_reason

    assert unsafe_text_reason("plain ünïcode 😀") is None
    assert "surrogate" in (unsafe_text_reason("a\ud800") or "")
    assert "bidirectional" in (unsafe_text_reason("a\u202eb") or "")
    assert "bidirectional" in (unsafe_text_reason("\u061c") or "")
