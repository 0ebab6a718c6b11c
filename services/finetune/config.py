"""Settings of the finetune service (env prefix FINETUNE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class FinetuneSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", extra="ignore", populate_by_name=True)

    service = "finetune"
    # Where adapters are written (default: DATA_DIR/finetune/adapters).
    artifacts_dir: Path | None = None
    # A local Hugging Face model directory used when a job names none (the plan names llama-2-7b-chat).
    base_model: str | None = None
    # The plan's threshold: 500+ top-rated explanations before fine-tuning is worth it.
    min_examples: int = Field(500, ge=0)
    # Export rules. A vote is "top-rated" for SFT with stars >= sft_min_stars, or (without stars) a thumbs up
    # when sft_accept_thumbs_up is set.
    sft_min_stars: int = Field(5, ge=1, le=5)
    sft_accept_thumbs_up: bool = True
    heldout_percent: int = Field(10, ge=1, le=50)
    # Not trained on: explanations of these models (the offline template writer) and, when set, those a fallback
    # model wrote in place of the one assigned.
    exclude_model_prefixes: list[str] = Field(default_factory=lambda: ["offline/"])
    exclude_fallback: bool = True
    # A running job writes a heartbeat every heartbeat_interval_s; the watchdog fails a job whose heartbeat is
    # older than heartbeat_timeout_s ("worker lost").
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_timeout_s: float = Field(120.0, gt=0)
    torch_threads: int = Field(1, ge=1)  # training on the worker, and generation of the built-in model server
    # A training job that reports no progress (no step, no evaluation) for this long stops beating, so the watchdog
    # fails it; one that runs longer than job_time_limit_s is stopped and failed ("time limit").
    progress_timeout_s: float = Field(900.0, gt=0)
    job_time_limit_s: float = Field(6 * 3600.0, gt=0)
    # While a job runs on a worker, another job sent to it waits queued and is retried after this many seconds.
    busy_retry_s: float = Field(15.0, gt=0)
    # "cuda": a worker without a GPU leaves training jobs queued for one that has it (compose's gpu profile).
    training_device: Literal["any", "cuda"] = "any"
    # An OpenAI-compatible endpoint serving the adapters (e.g. vLLM from serving.vllm_command); unset: the
    # transformers fallback server mounted under this service at /api/finetune/v1.
    serving_base_url: str | None = None
    # The key the serving engine requires (vLLM's --api-key; the fallback server checks it too). Unset: derived
    # from ADMIN_TOKEN (shared.serving.serving_api_key), which the router derives the same way.
    serving_api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("SERVING_API_KEY"))
    # How often the service checks that the serving engine has every registered adapter (re-loads after a restart).
    serving_sync_interval_s: float = Field(30.0, gt=0)
    # The fallback server: a ceiling on max_tokens (also capped to the model's context) and its generation threads.
    serving_max_tokens: int = Field(512, ge=1)
    cost_per_1k_tokens_usd: float = Field(0.0, ge=0)

    @property
    def adapters_dir(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "finetune" / "adapters").resolve()

    def serving_key(self) -> str | None:
        from shared.serving import serving_api_key

        explicit = self.serving_api_key.get_secret_value() if self.serving_api_key else None
        admin = self.admin_token.get_secret_value() if self.admin_token else None
        return serving_api_key(explicit, admin)

    @property
    def public_serving_url(self) -> str:
        return (self.serving_base_url or self.gateway_url.rstrip("/") + "/api/finetune/v1").rstrip("/")


@lru_cache
def get_settings() -> FinetuneSettings:
    return FinetuneSettings()
