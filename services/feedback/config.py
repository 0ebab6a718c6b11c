"""Settings of the feedback service (env prefix FEEDBACK_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class FeedbackSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FEEDBACK_", extra="ignore", populate_by_name=True)

    database_url: str | None = None
    max_comment_chars: int = 2000
    max_session_id_chars: int = 200
    # When the local replica does not know an explanation id yet, ask the router (its published HTTP
    # contract) whether it was ever issued: 404 there means 404 here.
    verify_unknown_with_router: bool = True
    router_check_timeout_s: float = 1.0
    # Every accepted vote is also journalled until the worker has stored it; a vote still in the journal
    # after this long (it was lost between the queue and a killed worker) is sent again. See IntakeJournal.
    journal_grace_s: float = 300.0

    @property
    def db_url(self) -> str:
        return self.database_url or self.sqlite_url("feedback")


@lru_cache
def get_settings() -> FeedbackSettings:
    return FeedbackSettings()
