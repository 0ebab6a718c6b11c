"""Settings of the router service (env prefix ROUTER_; provider keys keep their usual unprefixed names)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shared.ratelimit import check_rate
from shared.settings import ServiceSettings

OFFLINE_MODEL = "offline/template-v1"
OPENAI_DEFAULT_MODEL = "openai/gpt-4o-mini"
GROQ_DEFAULT_MODEL = "groq/llama-3.1-8b-instant"

#: USD per 1M tokens, {"input": ..., "output": ...}. ROUTER_PRICES (JSON) overrides entries one by one.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    OPENAI_DEFAULT_MODEL: {"input": 0.15, "output": 0.60},
    "openai/gpt-4o": {"input": 2.50, "output": 10.00},
    GROQ_DEFAULT_MODEL: {"input": 0.05, "output": 0.08},
    "groq/llama-3.3-70b-versatile": {"input": 0.59, "output": 0.79},
    OFFLINE_MODEL: {"input": 0.0, "output": 0.0},
}


def _plain(name: str, default: Any = None) -> Any:
    return Field(default, validation_alias=AliasChoices(name))


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTER_", extra="ignore", populate_by_name=True)

    service = "router"

    # Providers. Keys are read under their usual names (OPENAI_API_KEY ...), as every SDK user expects.
    openai_api_key: SecretStr | None = _plain("OPENAI_API_KEY")
    openai_base_url: str | None = _plain("OPENAI_BASE_URL")
    groq_api_key: SecretStr | None = _plain("GROQ_API_KEY")
    groq_base_url: str | None = _plain("GROQ_BASE_URL")
    # Any OpenAI-compatible server (vLLM, the finetune service's server) for "vllm/<name>" and "local/<name>".
    compatible_base_url: str | None = None
    compatible_api_key: SecretStr | None = None
    # The model used when nothing else chose one; empty means: openai if its key is set, else groq, else offline.
    default_model: str | None = None

    provider_timeout_s: float = Field(10.0, gt=0)  # one attempt
    request_deadline_s: float = Field(30.0, gt=0)  # all hosted attempts of one request; offline still answers after
    provider_retries: int = Field(2, ge=0, le=10)  # retries after the first try, on transient errors only
    retry_backoff_s: float = Field(0.25, ge=0)  # first pause; doubles on every retry
    retry_backoff_max_s: float = Field(4.0, ge=0)
    offline_fallback: bool = True
    max_tokens: int = Field(300, ge=1, le=4096)
    temperature: float = Field(0.3, ge=0, le=2)

    prices: dict[str, dict[str, float]] = Field(default_factory=dict)

    # Doors. A daily budget for paid providers (USD, UTC day; empty: none); once spent, a request whose
    # assigned model is paid gets 503 and no provider is called. The offline writer costs $0.
    daily_budget_usd: float | None = Field(25.0, ge=0)
    # Explanations per client (IP) and per session, "<n>/<period>" as the `limits` library reads it; empty: no limit.
    explanations_per_client: str = "600/minute"
    explanations_per_session: str = "60/minute"

    @field_validator("explanations_per_client", "explanations_per_session")
    @classmethod
    def _check_limit(cls, value: str) -> str:
        return check_rate(value)

    @field_validator("daily_budget_usd", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("prices")
    @classmethod
    def _check_prices(cls, value: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for model, price in value.items():
            unknown = set(price) - {"input", "output"}
            if unknown or any(p < 0 for p in price.values()):
                raise ValueError(
                    f"ROUTER_PRICES[{model!r}] must be {{'input': usd_per_1m, 'output': usd_per_1m}} with values >= 0"
                )
        return value

    def price_table(self) -> dict[str, dict[str, float]]:
        table = {model: dict(price) for model, price in DEFAULT_PRICES.items()}
        for model, price in self.prices.items():
            table[model] = {**table.get(model, {"input": 0.0, "output": 0.0}), **price}
        return table

    def resolved_default_model(self) -> str:
        if self.default_model:
            return self.default_model
        if _has(self.openai_api_key):
            return OPENAI_DEFAULT_MODEL
        if _has(self.groq_api_key):
            return GROQ_DEFAULT_MODEL
        return OFFLINE_MODEL


def _has(secret: SecretStr | None) -> bool:
    return secret is not None and bool(secret.get_secret_value())


@lru_cache
def get_settings() -> RouterSettings:
    return RouterSettings()
