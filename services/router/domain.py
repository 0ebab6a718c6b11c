"""Routing rules, free of any framework.

- The routing state is the champion (prompt template + model) and at most one running experiment (arms, each a
  prompt template + model with a weight).
- Assignment is sticky per anonymous session: the session's keyed hash and the experiment id are hashed to a
  point in [0, 1), and the point falls into one arm's slice of the cumulative weights. The same session gets the
  same arm for as long as the weights stay the same; a new experiment reshuffles sessions independently.
- Costs come from a price table in USD per 1M input / output tokens.
- A failing model falls back: the assigned model, then the champion's, then the other configured providers,
  finally the offline writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.contracts import MODEL_PROVIDERS
from shared.text import unsafe_text_reason

TICKER_RE = re.compile(r"^[A-Z0-9.\-]{1,12}$")
PROVIDERS = MODEL_PROVIDERS
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

ContextValue = str | int | float | bool

MAX_CONTEXT_KEYS = 50
MAX_CONTEXT_KEY_CHARS = 64
MAX_CONTEXT_VALUE_CHARS = 200
MAX_CONTEXT_INT = 2**63 - 1


class InvalidRequest(ValueError):
    """Input that breaks a rule; the message says which."""


# ---------------------------------------------------------------------------------------------------------
# Input rules
# ---------------------------------------------------------------------------------------------------------


def normalise_ticker(raw: str) -> str:
    """Tickers are case-insensitive on input and stored upper case ("aapl" -> "AAPL"); 1-12 of [A-Z0-9.-]."""
    ticker = raw.strip().upper()
    if unsafe_text_reason(raw) or not TICKER_RE.fullmatch(ticker):
        raise InvalidRequest("ticker must be 1-12 characters of A-Z, 0-9, '.' or '-' (e.g. AAPL, BRK.B)")
    return ticker


def check_context(
    context: Mapping[str, Any],
    *,
    max_keys: int = MAX_CONTEXT_KEYS,
    max_key_chars: int = MAX_CONTEXT_KEY_CHARS,
    max_value_chars: int = MAX_CONTEXT_VALUE_CHARS,
) -> dict[str, ContextValue]:
    """Indicators: a flat object of at most `max_keys` names mapped to a number, string or boolean."""
    if len(context) > max_keys:
        raise InvalidRequest(f"context has {len(context)} indicators; at most {max_keys} are allowed")
    clean: dict[str, ContextValue] = {}
    for key, value in context.items():
        reason = unsafe_text_reason(key) or (unsafe_text_reason(value) if isinstance(value, str) else None)
        if reason:
            # Before anything is stored or a provider is paid: such text cannot be encoded or misleads readers.
            raise InvalidRequest(f"context[{key.encode('unicode_escape').decode()[:40]!r}] {reason}")
        if not key.strip() or len(key) > max_key_chars or _CONTROL.search(key):
            raise InvalidRequest(
                f"context key {key[:40]!r} must be 1-{max_key_chars} printable characters without line breaks"
            )
        if isinstance(value, bool):
            clean[key] = value
        elif isinstance(value, int | float):
            # JSON allows integers of any size; beyond 64 bits they overflow float formatting and the stores.
            if (isinstance(value, float) and not math.isfinite(value)) or (
                isinstance(value, int) and not -MAX_CONTEXT_INT <= value <= MAX_CONTEXT_INT
            ):
                raise InvalidRequest(f"context[{key!r}] must be a finite number that fits in 64 bits")
            clean[key] = value
        elif isinstance(value, str):
            if len(value) > max_value_chars or _CONTROL.search(value):
                raise InvalidRequest(
                    f"context[{key!r}] must be at most {max_value_chars} printable characters without line breaks"
                )
            clean[key] = value
        else:
            raise InvalidRequest(
                f"context[{key!r}] must be a number, string or boolean, not {type(value).__name__ if value is not None else 'null'}"
            )
    return clean


def request_key(ticker: str, signal: str, context: Mapping[str, Any]) -> str:
    """The same (ticker, signal, indicators) always gives the same key, whatever the key order."""
    canonical = json.dumps([ticker, signal, context], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Routing state and assignment
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    text: str


@dataclass(frozen=True)
class Arm:
    arm_id: str
    prompt: Template
    model: str
    weight: float
    is_control: bool = False


@dataclass(frozen=True)
class Experiment:
    experiment_id: str
    arms: tuple[Arm, ...]


@dataclass(frozen=True)
class Routing:
    champion_prompt: Template
    champion_model: str
    experiment: Experiment | None = None


@dataclass(frozen=True)
class Variant:
    """What serves one request."""

    prompt: Template
    model: str
    experiment_id: str | None = None
    arm_id: str | None = None


def unit_interval(session_key: str, experiment_id: str) -> float:
    """A point in [0, 1) from the session and experiment: uniform, stable, independent across experiments."""
    digest = hashlib.sha256(f"{experiment_id}:{session_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def normalised_weights(arms: Sequence[Arm], weights: Mapping[str, float] | None = None) -> list[float]:
    """Non-negative weights summing to 1; all zero (or missing) means equal shares."""
    raw = [max(0.0, float((weights or {}).get(a.arm_id, a.weight))) for a in arms]
    raw = [w if math.isfinite(w) else 0.0 for w in raw]
    total = sum(raw)
    if total <= 0:
        return [1.0 / len(arms)] * len(arms)
    return [w / total for w in raw]


def assign_arm(arms: Sequence[Arm], point: float) -> Arm:
    """The arm whose slice of the cumulative weights holds `point` (in [0, 1))."""
    if not arms:
        raise ValueError("an experiment needs at least one arm")
    cumulative = 0.0
    for arm, share in zip(arms, normalised_weights(arms), strict=True):
        cumulative += share
        if point < cumulative:
            return arm
    return arms[-1]  # rounding: the cumulative sum may end a hair below 1


def choose_variant(routing: Routing, session_key: str) -> Variant:
    exp = routing.experiment
    if exp is None or not exp.arms:
        return Variant(prompt=routing.champion_prompt, model=routing.champion_model)
    arm = assign_arm(exp.arms, unit_interval(session_key, exp.experiment_id))
    return Variant(prompt=arm.prompt, model=arm.model, experiment_id=exp.experiment_id, arm_id=arm.arm_id)


# ---------------------------------------------------------------------------------------------------------
# Models, cost, fallback
# ---------------------------------------------------------------------------------------------------------


def split_model(model: str) -> tuple[str, str]:
    """ "openai/gpt-4o-mini" -> ("openai", "gpt-4o-mini"). The provider is everything before the first '/'."""
    provider, sep, name = model.partition("/")
    if not sep or not name or provider not in PROVIDERS:
        raise ValueError(f"model {model!r} must be '<provider>/<name>' with provider one of {', '.join(PROVIDERS)}")
    return provider, name


def cost_usd(tokens_in: int, tokens_out: int, price: Mapping[str, float] | None) -> float:
    """USD for one call at `price` = {"input": usd per 1M tokens, "output": usd per 1M tokens}."""
    if not price:
        return 0.0
    usd = tokens_in * price.get("input", 0.0) / 1e6 + tokens_out * price.get("output", 0.0) / 1e6
    return round(usd, 10)


def estimate_tokens(text: str) -> int:
    """Rough token count for providers that report none: words * 1.3."""
    return -(-len(text.split()) * 13 // 10)  # ceil(words * 1.3) in integers: 10 words is 13, not 14


def fallback_chain(
    assigned: str, champion: str, configured_defaults: Iterable[str], *, offline_model: str, offline_fallback: bool
) -> list[str]:
    """The models to try, in order, each once: assigned, champion, other configured providers, offline."""
    chain = [assigned, champion, *configured_defaults]
    if offline_fallback:
        chain.append(offline_model)
    return list(dict.fromkeys(chain))


def backoff_delays(retries: int, base_s: float, cap_s: float) -> list[float]:
    """Pauses before each retry: base, 2*base, 4*base ... capped."""
    return [min(cap_s, base_s * 2**i) for i in range(retries)]


def price_for(
    model: str,
    *,
    defaults: Mapping[str, Mapping[str, float]],
    overrides: Mapping[str, Mapping[str, float]],
    registered_per_1k: float | None = None,
) -> dict[str, float]:
    """USD per 1M tokens for `model`: an explicit override (ROUTER_PRICES) wins, then the price a
    ModelRegistered event gave (per 1k tokens, in and out alike), then the built-in table; unknown is free."""
    if model in overrides:
        return {"input": 0.0, "output": 0.0, **defaults.get(model, {}), **overrides[model]}
    if registered_per_1k is not None:
        return {"input": registered_per_1k * 1000, "output": registered_per_1k * 1000}
    return dict(defaults.get(model, {"input": 0.0, "output": 0.0}))


# ---------------------------------------------------------------------------------------------------------
# The daily provider budget
# ---------------------------------------------------------------------------------------------------------


def is_free(price: Mapping[str, float]) -> bool:
    """A model whose calls cost nothing (the offline writer, a local model with no registered price)."""
    return not any(v > 0 for v in price.values())


def budget_day(now: datetime) -> str:
    """The budget's day (UTC), e.g. "2026-12-01": the spend resets at 00:00 UTC."""
    return now.astimezone(UTC).strftime("%Y-%m-%d")


def seconds_until_reset(now: datetime) -> int:
    """Whole seconds (at least 1) until the next 00:00 UTC, when the daily budget starts again."""
    now = now.astimezone(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


def budget_left(budget_usd: float | None, spent_usd: float) -> bool:
    """True while paid calls may be made today; a budget of None means no budget."""
    return budget_usd is None or spent_usd < budget_usd
