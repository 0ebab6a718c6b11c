"""Cross-service contracts: the events and commands that travel over the queue.

Every message carries ids, never objects or blobs; every message has a `message_id`, a timestamp and a
`schema_version`, so a consumer can deduplicate redeliveries and a later schema can be told apart.
Events are past tense and may have many subscribers; commands are imperative and have one handler.
The `type` class variable is the routing key the bus looks up in `shared.bus.SUBSCRIPTIONS`.
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.clock import utcnow

Signal = Literal["BUY", "SELL", "HOLD"]

#: The services of the system. Each has a queue of its own, named after it, and its task names start with it.
SERVICES: tuple[str, ...] = ("router", "feedback", "optimizer", "finetune", "dashboard")

#: A model is named "<provider>/<name>": the router knows how to call each provider; the optimizer refuses
#: an experiment arm whose model no provider could serve.
MODEL_PROVIDERS: tuple[str, ...] = ("openai", "groq", "vllm", "local", "offline")


def model_name_problem(model: str) -> str | None:
    """Why a model name is not '<provider>/<name>' with a known provider, or None when it is."""
    provider, sep, name = model.partition("/")
    if not sep or not name.strip() or provider not in MODEL_PROVIDERS:
        return f"model {model!r} must be '<provider>/<name>' with provider one of {', '.join(MODEL_PROVIDERS)}"
    return None


class _UrandomIds:
    """Random bits for ids from the operating system (`os.urandom`), which no library can reseed: the global
    `random` generator is reseeded by training code (`set_seed(0)`), and ids drawn from it repeated on every
    run. One `os.urandom` call fills a pool of 256 ids (one system call instead of one per id, which keeps the
    feedback hot path as fast as before); the pool is dropped in a forked child, so parent and child never
    hand out the same bytes."""

    POOL_IDS = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pool = b""
        self._pos = 0
        self._lock = threading.Lock()  # a lock held by another thread at fork time is never released in the child

    def next_int(self) -> int:
        with self._lock:
            if self._pos >= len(self._pool):
                self._pool = os.urandom(16 * self.POOL_IDS)
                self._pos = 0
            start = self._pos
            self._pos = start + 16
            return int.from_bytes(self._pool[start : start + 16], "big")


_IDS = _UrandomIds()


def new_id() -> uuid.UUID:
    """A random (version 4) UUID for message and task ids, from the OS's generator (see `_UrandomIds`)."""
    return uuid.UUID(int=_IDS.next_int(), version=4)


def derived_id(*parts: object) -> uuid.UUID:
    """A deterministic id from its parts: the same inputs always give the same id.

    Used for ids that must survive a redelivery (an event published again after a crash keeps its id,
    so every subscriber's idempotency check recognises it).
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, "selflearn:" + ":".join(str(p) for p in parts))


# Every contract model: immutable, no unknown fields, and Infinity and NaN written to JSON as Python's json writes
# them (pydantic's default would write null), so `payload_json()` and `json.dumps(to_payload())` agree.
CONTRACT_CONFIG = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class Message(BaseModel):
    model_config = CONTRACT_CONFIG

    type: ClassVar[str]
    #: The newest schema version this code reads; a message with a later one is refused (dead-lettered by
    #: a worker) rather than half-understood.
    supported_schema_version: ClassVar[int] = 1
    message_id: uuid.UUID = Field(default_factory=new_id)
    occurred_at: datetime = Field(default_factory=utcnow)
    schema_version: int = Field(1, ge=1)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value > cls.supported_schema_version:
            raise ValueError(f"unknown schema version {value} (this code reads up to {cls.supported_schema_version})")
        return value

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def payload_json(self) -> str:
        """`to_payload()` as JSON text (pydantic writes it, without building the dict first)."""
        return self.model_dump_json()

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Any:
        return cls.model_validate(payload)

    def row(self, *fields: str) -> dict[str, Any]:
        """These fields as a row of a store that keeps a copy of them: ids (UUIDs) as text, the rest as they are."""
        return {name: str(value) if isinstance(value := getattr(self, name), uuid.UUID) else value for name in fields}


class Event(Message):
    """Something that happened. Subscribers deduplicate on `message_id`."""


class Command(Message):
    """Something to do, with exactly one handler."""


# ---------------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------------


class ExplanationCreated(Event):
    type: ClassVar[str] = "explanation.created"
    explanation_id: uuid.UUID
    request_key: str  # hash of (ticker, signal, context): the same request gets the same key
    ticker: str
    signal: Signal
    prompt_name: str
    prompt_version: str
    model: str
    provider: str
    experiment_id: str | None = None
    arm_id: str | None = None
    prompt_text: str  # the rendered prompt that produced the text (small, needed for fine-tuning)
    text: str
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: float
    fallback_used: bool = False
    created_at: datetime
    # keyed HMAC of the session the explanation was served to (never the raw id): the unit of assignment and
    # of analysis for experiments, and the only session whose vote on this explanation counts.
    session_key: str | None = None


class FeedbackRecorded(Event):
    type: ClassVar[str] = "feedback.recorded"
    feedback_id: uuid.UUID  # stable per (session, explanation): a replacing vote keeps it
    explanation_id: uuid.UUID
    session_key: str  # keyed HMAC of the session id, never the raw id
    rating: Literal[1, -1]
    stars: int | None = None
    has_comment: bool = False
    replaced: bool = False  # True when this vote replaced an earlier one from the same session
    submitted_at: datetime
    # copied from the feedback service's replica of the explanation, so subscribers need no join
    prompt_name: str
    prompt_version: str
    model: str
    signal: Signal
    ticker: str
    experiment_id: str | None = None
    arm_id: str | None = None


class FeedbackErased(Event):
    type: ClassVar[str] = "feedback.erased"
    session_key: str  # one version of the session's key: an erasure under rotated secrets is one event per version
    feedback_ids: list[uuid.UUID]  # the session's votes the feedback service held
    explanation_ids: list[uuid.UUID]  # the explanations it voted on or was served
    erased_at: datetime


class PromptTemplate(BaseModel):
    model_config = CONTRACT_CONFIG
    name: str
    version: str
    template: str


class ChampionChanged(Event):
    type: ClassVar[str] = "prompt.champion_changed"
    prompt: PromptTemplate
    model: str
    previous_version: str | None = None
    reason: str = ""


class ArmSpec(BaseModel):
    model_config = CONTRACT_CONFIG
    arm_id: str
    prompt: PromptTemplate
    model: str
    weight: float
    is_control: bool = False


class ExperimentStarted(Event):
    type: ClassVar[str] = "experiment.started"
    experiment_id: str
    prompt_name: str
    arms: list[ArmSpec]
    allocation: Literal["fixed", "adaptive"] = "fixed"


class AllocationChanged(Event):
    type: ClassVar[str] = "experiment.allocation_changed"
    experiment_id: str
    weights: dict[str, float]


class ExperimentConcluded(Event):
    type: ClassVar[str] = "experiment.concluded"
    experiment_id: str
    decision: str
    winner_arm_id: str | None = None
    reason: str = ""


class SearchExhausted(Event):
    """The optimizer's variant search for a prompt has nothing left to try on top of its champion (every
    combination tried or ruled out, or the generator's last proposals all rejected): generation stops until
    the champion changes or a version is added by hand."""

    type: ClassVar[str] = "prompt.search_exhausted"
    prompt_name: str
    champion_version: str
    versions_tried: int
    reason: str = ""


class ModelRegistered(Event):
    type: ClassVar[str] = "model.registered"
    model_id: str
    model: str  # the name the router uses, e.g. "local/ft-3f2a"
    base_model: str
    serving_base_url: str | None = None  # OpenAI-compatible endpoint that serves it
    metrics: dict[str, float] = Field(default_factory=dict)
    cost_per_1k_tokens_usd: float = 0.0


class ModelWithdrawn(Event):
    """A registered model may no longer be used: its training data held a session that was erased (or an
    operator withdrew it). The router stops serving it, the optimizer ends every experiment it is in (the
    control serves) and never makes it champion."""

    type: ClassVar[str] = "model.withdrawn"
    model_id: str
    model: str  # the name the router uses, e.g. "local/ft-3f2a"
    reason: str = ""


class FineTuneProgress(Event):
    type: ClassVar[str] = "finetune.progress"
    job_id: str
    state: str
    progress: float = 0.0
    detail: str = ""


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------


class RecordFeedback(Command):
    """Sent by the feedback API once the body is valid; the worker stores it. The raw session id never
    travels: `session_key` is already the keyed hash."""

    type: ClassVar[str] = "feedback.record"
    feedback_id: uuid.UUID
    explanation_id: uuid.UUID
    session_key: str
    rating: Literal[1, -1]
    stars: int | None = Field(default=None, ge=1, le=5)
    comment: str | None = None
    submitted_at: datetime


class ResendExplanations(Command):
    """Sent by the feedback service for explanations it holds votes on but never got the event of: the router
    publishes their `ExplanationCreated` again, with the original message ids (a subscriber that had them
    ignores them). kombu's Redis transport loses a message taken by a worker killed before it was recorded as
    unacknowledged; for an event this is the one way back."""

    type: ClassVar[str] = "router.resend_explanations"
    explanation_ids: list[uuid.UUID] = Field(min_length=1, max_length=500)


class StartFineTune(Command):
    type: ClassVar[str] = "finetune.start_job"
    job_id: str | None = None
    base_model: str | None = None
    method: Literal["sft", "kto", "dpo"] = "sft"
    recipe: dict[str, Any] = Field(default_factory=dict)
    min_examples: int | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        ExplanationCreated,
        FeedbackRecorded,
        FeedbackErased,
        ChampionChanged,
        ExperimentStarted,
        AllocationChanged,
        ExperimentConcluded,
        SearchExhausted,
        ModelRegistered,
        ModelWithdrawn,
        FineTuneProgress,
    )
}
