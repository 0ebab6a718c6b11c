"""Settings of the optimizer service (env prefix OPTIMIZER_; provider keys are read without a prefix)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings

WEEK_S = 7 * 86400.0


class OptimizerSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="OPTIMIZER_", extra="ignore", populate_by_name=True, env_parse_none_str="null"
    )

    service = "optimizer"

    # -- promotion --------------------------------------------------------------------------------------
    # auto: a `ship` decision promotes the winner at once; approve: it waits for POST .../promote.
    promotion_mode: Literal["auto", "approve"] = "auto"

    # -- experiment defaults (a POST /api/experiments body may override each) ------------------------------
    min_duration_s: float = Field(WEEK_S, ge=0)  # the plan's 7-day minimum; seconds in tests and demos
    min_feedback_per_arm: int = Field(100, ge=1)
    max_feedback_per_arm: int = Field(20000, ge=1)  # sample cap: no winner by then -> inconclusive
    alpha: float = Field(0.05, gt=0, lt=1)
    target_lift: float = Field(0.10, gt=0)
    # futility (a round ends, an arm stops being served, once its always-valid interval lies below the target
    # lift) is judged on the interval at this level, per treatment: futility never ships, so a looser level than
    # the decision's only costs power (an arm truly at the target is dropped with probability at most this over
    # the whole experiment) and spends fewer votes on rounds that cannot win; None: the decision's interval
    futility_alpha: float | None = Field(0.2, gt=0, lt=1)
    # the feedback-rate guardrail counts only the sessions first served at least this long ago: a vote travels
    # one more hop than its explanation's event, and an arm whose traffic grows (adaptive allocation) would
    # otherwise look under-voted by the votes still on their way; a winner waits until both arms have such sessions
    feedback_rate_grace_s: float = Field(600.0, ge=0, le=365 * 86400)
    metric: Literal["positive_rate", "avg_stars"] = "positive_rate"

    # -- adaptive allocation (Thompson leader vs the control at the square-root share, 1% floor, futile arms
    #    get nothing; reweighted in batches; two arms: an even split) -------------------------------------
    adaptive_floor: float = Field(0.01, ge=0, le=0.5)
    adaptive_min_feedback_per_arm: int = Field(100, ge=1)  # no reweighting before every arm has this much
    adaptive_batch: int = Field(50, ge=1)  # new feedback events (all arms) between two reweightings
    # a fixed split stops serving an arm whose always-valid interval lies below the target lift (it cannot
    # win); the other arms keep their proportions. False: a fixed split stays as it was created
    drop_futile_arms: bool = True

    # -- the automatic loop: generate variants, start the next experiment ---------------------------------
    auto_experiment: bool = True
    auto_allocation: Literal["fixed", "adaptive"] = "fixed"
    generation_min_interval_s: float = Field(WEEK_S, ge=0)  # the plan: variant generation at most weekly
    generation_count: int = Field(3, ge=1, le=10)
    generation_model: str = "gpt-4o-mini"
    generation_timeout_s: float = 60.0
    max_variant_chars: int = Field(2000, ge=50)
    min_variant_chars: int = Field(40, ge=1)
    near_duplicate_ratio: float = Field(0.9, gt=0, le=1)
    # the search is exhausted (announced once, generation stops) after this many generations in a row for
    # the same champion that added no candidate; the offline generator also knows when its space is spent
    generation_patience: int = Field(3, ge=1)
    # a round that reached its sample cap with a leader whose always-valid interval still reaches the target
    # lift gives that leader this many more rounds against the same champion (each beside the next proposals)
    # before it counts as lost; 0: an inconclusive round is final
    retest_rounds: int = Field(1, ge=0, le=3)

    # -- fine-tuned models (finetune service): ship only with a relative lift >= this ---------------------
    finetune_min_lift: float = Field(0.10, ge=0)

    # -- the default model of the seed champion (same rule as the router) ---------------------------------
    default_model: str | None = None
    openai_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=AliasChoices("OPENAI_BASE_URL"))
    groq_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("GROQ_API_KEY"))

    def has_openai(self) -> bool:
        return self.openai_api_key is not None and bool(self.openai_api_key.get_secret_value())

    def seed_model(self) -> str:
        """openai/gpt-4o-mini with an OpenAI key, groq/llama-3.1-8b-instant with a Groq key, else offline."""
        if self.default_model:
            return self.default_model
        if self.has_openai():
            return "openai/gpt-4o-mini"
        if self.groq_api_key is not None and self.groq_api_key.get_secret_value():
            return "groq/llama-3.1-8b-instant"
        return "offline/template-v1"


@lru_cache
def get_settings() -> OptimizerSettings:
    return OptimizerSettings()
