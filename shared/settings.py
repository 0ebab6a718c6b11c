"""Settings shared by every service. Each service subclasses `ServiceSettings` with its own env prefix for
its own options; the options below are read without a prefix because every process of one deployment
shares them (one Redis, one admin token, one session-hash key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _common(name: str, default: Any = ..., **kw: Any) -> Any:
    """A field read from the environment variable `name`, with no prefix. Typed `Any`, as `Field` is, so the
    annotation of the field it is assigned to is its type."""
    return Field(default, validation_alias=AliasChoices(name), **kw)


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    #: The service these settings are of: a subclass names it (its store's SQLite file is `<service>.db`).
    service: ClassVar[str]
    # The service's store, read with the service's env prefix (FEEDBACK_DATABASE_URL, ...); unset: `sqlite_url`.
    database_url: str | None = None

    redis_url: str = _common("REDIS_URL", "redis://127.0.0.1:6379/0")
    # Secrets have no default: a service refuses to start without them (`make run` generates them).
    admin_token: SecretStr | None = _common("ADMIN_TOKEN", None)
    session_hash_key: SecretStr | None = _common("SESSION_HASH_KEY", None)
    # Versioned keys for rotation, newest first: "v2:newsecret,v1:oldsecret". New sessions are hashed with the
    # first; lookups and erasure try every version (SESSION_HASH_KEY, if set and not listed, is the oldest).
    session_hash_keys: SecretStr | None = _common("SESSION_HASH_KEYS", None)
    data_dir: Path = _common("DATA_DIR", Path("data"))
    visibility_timeout_s: float = _common("BROKER_VISIBILITY_TIMEOUT", 3600.0)
    broker_pool_limit: int = _common("BROKER_POOL_LIMIT", 16)
    log_level: str = _common("LOG_LEVEL", "INFO")
    gateway_url: str = _common("GATEWAY_URL", "http://127.0.0.1:8000")
    # A task's transient failure is retried this many times, after 1, 2, 4 ... seconds (with jitter, capped),
    # then its message goes to the dead-letter store (see shared.bus.ReliableTask).
    task_max_retries: int = _common("TASK_MAX_RETRIES", 6)
    task_retry_backoff_s: float = _common("TASK_RETRY_BACKOFF_S", 1.0)
    task_retry_backoff_max_s: float = _common("TASK_RETRY_BACKOFF_MAX_S", 60.0)
    # Doors of the public routes (shared/web.py, shared/ratelimit.py). Origins allowed to call the API from a
    # browser besides the page's own (comma-separated, e.g. "https://app.example.com"); "*" allows any.
    allowed_origins: str = _common("ALLOWED_ORIGINS", "")
    # Per-client and per-session rate limits (each service's own settings say how many); off only for tests.
    rate_limits_enabled: bool = _common("RATE_LIMITS_ENABLED", True)

    def allowed_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip()]

    def sqlite_url(self, service: str) -> str:
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    @property
    def db_url(self) -> str:
        """The URL of the service's store: its DATABASE_URL, else its SQLite file under DATA_DIR."""
        return self.database_url or self.sqlite_url(self.service)

    def require_admin_token(self) -> str:
        if self.admin_token is None or not self.admin_token.get_secret_value():
            raise RuntimeError("ADMIN_TOKEN is not set: admin routes cannot be protected (make run sets one)")
        return self.admin_token.get_secret_value()

    def require_session_hash_key(self) -> bytes:
        """The current secret: the one new session keys are written under."""
        return self.session_hash_secrets()[0]

    def session_hash_secrets(self) -> tuple[bytes, ...]:
        """Every version of the session-hash secret, newest first (see shared.privacy.parse_hash_keys)."""
        from shared.privacy import parse_hash_keys

        versioned = self.session_hash_keys.get_secret_value() if self.session_hash_keys else ""
        legacy = self.session_hash_key.get_secret_value() if self.session_hash_key else None
        try:
            pairs = parse_hash_keys(versioned, legacy)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
        if not pairs:
            raise RuntimeError(
                "SESSION_HASH_KEY (or SESSION_HASH_KEYS) is not set: session ids cannot be hashed (make run sets one)"
            )
        return tuple(secret for _, secret in pairs)
