"""Settings of the feedback service (env prefix FEEDBACK_)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from shared.ratelimit import check_rate
from shared.settings import ServiceSettings


class FeedbackSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FEEDBACK_", extra="ignore", populate_by_name=True)

    service = "feedback"
    max_comment_chars: int = 2000
    max_session_id_chars: int = 200
    # When the local replica does not know an explanation id yet, ask the router (its published HTTP
    # contract) whether it was ever issued: 404 there means 404 here.
    verify_unknown_with_router: bool = True
    router_check_timeout_s: float = 1.0
    # Every accepted vote is also journalled until the worker has stored it; a vote still in the journal
    # after this long (it was lost between the queue and a killed worker) is sent again. See IntakeJournal.
    journal_grace_s: float = 300.0
    # A vote held in the quarantine this long (its explanation's event has not arrived) makes the sweep ask the
    # router to publish that event again (ResendExplanations); it asks again at every sweep for up to
    # `quarantine_resend_window_s`, then gives up on that vote (a vote on an id the router never issued).
    quarantine_resend_after_s: float = Field(30.0, ge=0)
    quarantine_resend_window_s: float = Field(3600.0, gt=0)

    # Doors. Rate limits per client (IP) and per session, "<n>/<period>" as the `limits` library reads them;
    # empty: no limit. Generous for people; a frontend that proxies many users from one IP raises the client's.
    votes_per_client: str = "1200/minute"
    votes_per_session: str = "120/minute"
    erasures_per_client: str = "60/hour"
    erasures_per_session: str = "10/hour"
    # Backpressure: while more votes than this wait to be stored (queue or intake journal), new votes get 503
    # with Retry-After instead of growing Redis without limit; 0: no bound.
    max_backlog: int = Field(100_000, ge=0)
    backlog_retry_after_s: int = Field(5, ge=1)
    # An erasure of a session this service holds nothing of is remembered this long (for votes in flight),
    # then purged: such requests leave no permanent row. Longer than the broker's visibility timeout.
    erasure_tombstone_s: float = Field(2 * 86_400, gt=0)

    @field_validator("votes_per_client", "votes_per_session", "erasures_per_client", "erasures_per_session")
    @classmethod
    def _check_limit(cls, value: str) -> str:
        return check_rate(value)


@lru_cache
def get_settings() -> FeedbackSettings:
    return FeedbackSettings()
