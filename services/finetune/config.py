"""Settings of the finetune service (env prefix FINETUNE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class FinetuneSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", extra="ignore", populate_by_name=True)

    database_url: str | None = None
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
    # A running job writes a heartbeat every heartbeat_interval_s; the watchdog fails a job whose heartbeat is
    # older than heartbeat_timeout_s ("worker lost").
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_timeout_s: float = Field(120.0, gt=0)
    torch_threads: int = Field(1, ge=1)
    # An OpenAI-compatible endpoint serving the adapters (e.g. vLLM from serving.vllm_command); unset: the
    # transformers fallback server mounted under this service at /api/finetune/v1.
    serving_base_url: str | None = None
    cost_per_1k_tokens_usd: float = Field(0.0, ge=0)

    @property
    def db_url(self) -> str:
        return self.database_url or self.sqlite_url("finetune")

    @property
    def adapters_dir(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "finetune" / "adapters").resolve()

    @property
    def public_serving_url(self) -> str:
        return (self.serving_base_url or self.gateway_url.rstrip("/") + "/api/finetune/v1").rstrip("/")


@lru_cache
def get_settings() -> FinetuneSettings:
    return FinetuneSettings()
