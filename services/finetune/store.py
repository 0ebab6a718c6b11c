"""The finetune service's own store: training data (explanations and votes replicated from events), erased
sessions, exports with the feedback ids that went into them, jobs and the model registry. No other service
opens it."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, TypedDict, cast

import sqlalchemy as sa

from services.finetune import domain
from shared import db
from shared.contracts import ExplanationCreated, utcnow
from shared.outbox import outbox_table
from shared.privacy import erasure_tag
from shared.votes import NewestInBatch

metadata = sa.MetaData()

explanations = sa.Table(
    "explanations",
    metadata,
    *db.contract_columns("explanation_id", primary_key=True),
    sa.Column("request_key", sa.String(128), nullable=False, index=True),
    *db.contract_columns("ticker", "signal", "prompt_name", "prompt_version", "model", "prompt_text", "text"),
    *db.contract_columns("tokens_in", "tokens_out", default=0),
    *db.contract_columns("created_at"),
    # written by a fallback model in place of the one assigned: not trained on by default
    *db.contract_columns("fallback_used", default=False),
)
#: What this copy keeps of each ExplanationCreated.
EXPLANATION_FIELDS = db.copied_fields(explanations, ExplanationCreated)

votes = sa.Table(
    "votes",
    metadata,
    *db.contract_columns("feedback_id", primary_key=True),
    *db.contract_columns("explanation_id", "session_key", index=True),
    *db.contract_columns("rating", "stars", "submitted_at"),
)

# Keyed by `erasure_tag(session_key)` (in the column named session_key), never by the key itself.
erased_sessions = sa.Table(
    "erased_sessions",
    metadata,
    *db.erasure_columns(),
    # Traceability: which exports (and so which models) had used this session's feedback.
    sa.Column("feedback_ids", sa.JSON, nullable=False),
    sa.Column("export_ids", sa.JSON, nullable=False),
    sa.Column("model_ids", sa.JSON, nullable=False),
)

exports = sa.Table(
    "exports",
    metadata,
    sa.Column("export_id", sa.String(36), primary_key=True),
    sa.Column("format", sa.String(8), nullable=False),
    sa.Column("split", sa.String(8), nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    *db.contract_columns("job_id", index=True, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

export_feedback = sa.Table(
    "export_feedback",
    metadata,
    sa.Column("export_id", sa.String(36), primary_key=True),
    *db.contract_columns("feedback_id", primary_key=True, index=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    *db.contract_columns("job_id", primary_key=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("base_model", sa.Text, nullable=False),
    sa.Column("recipe", sa.JSON, nullable=False),
    sa.Column("min_examples", sa.Integer, nullable=False),
    *db.contract_columns("progress", default=0.0),
    *db.contract_columns("detail", default=""),
    sa.Column("reason", sa.Text),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("train_export_id", sa.String(36)),
    sa.Column("heldout_export_id", sa.String(36)),
    *db.contract_columns("model_id", nullable=True),
    sa.Column("metrics", sa.JSON, nullable=False, default=dict),
)

models = sa.Table(
    "models",
    metadata,
    *db.contract_columns("model_id", primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    *db.contract_columns("job_id", unique=True),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("base_model", sa.Text, nullable=False),
    sa.Column("adapter_path", sa.Text, nullable=False),
    sa.Column("recipe", sa.JSON, nullable=False),
    sa.Column("train_export_id", sa.String(36), nullable=False),
    sa.Column("heldout_export_id", sa.String(36), nullable=False),
    *db.contract_columns("metrics"),
    sa.Column("status", sa.String(16), nullable=False),  # domain.MODEL_STATUSES
    sa.Column("status_reason", sa.Text),
    sa.Column("serving_base_url", sa.Text),
    *db.contract_columns("cost_per_1k_tokens_usd", default=0.0),
    sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
)

processed = db.processed_table(metadata)

outbox = outbox_table(metadata)

JOB_FIELDS = tuple(c.name for c in jobs.columns)


# -- the rows the repository hands to the handlers (one key per column) -----------------------------------


class ErasureRow(TypedDict):
    session_key: str  # the erasure tag (`erasures()` shows a 12-character prefix of it)
    erased_at: datetime
    feedback_ids: list[str]
    export_ids: list[str]
    model_ids: list[str]


class ExportRow(TypedDict):
    export_id: str
    format: str
    split: str
    rows: int
    job_id: str | None
    created_at: datetime
    feedback_ids: list[str]  # the votes it used (from `export_feedback`)


class JobRow(TypedDict):
    job_id: str
    state: str
    method: Literal["sft", "kto", "dpo"]
    base_model: str
    recipe: dict[str, Any]
    min_examples: int
    progress: float
    detail: str
    reason: str | None
    cancel_requested: bool
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    train_export_id: str | None
    heldout_export_id: str | None
    model_id: str | None
    metrics: dict[str, Any]


class ModelRow(TypedDict):
    model_id: str
    name: str
    job_id: str
    method: Literal["sft", "kto", "dpo"]
    base_model: str
    adapter_path: str
    recipe: dict[str, Any]
    train_export_id: str
    heldout_export_id: str
    metrics: dict[str, Any]
    status: str  # domain.MODEL_STATUSES
    status_reason: str | None
    serving_base_url: str | None
    cost_per_1k_tokens_usd: float
    registered_at: datetime


class FinetuneRepository(db.MessageLog):
    processed = processed  # the table MessageLog.seen / mark_seen use
    outbox = outbox  # the table forget_session_messages rewrites

    # -- training data ----------------------------------------------------------------------------------
    def add_explanation(self, values: dict[str, Any]) -> bool:
        return db.insert_new(self.s, explanations, "explanation_id", values)

    def explanations_known(self, explanation_ids: Iterable[str]) -> set[str]:
        """Which of these explanations are kept here (one query per `IN_CHUNK` ids)."""
        return db.existing_keys(self.s, explanations, "explanation_id", explanation_ids)

    def add_explanations(self, rows: list[dict[str, Any]]) -> None:
        """`add_explanation` for many explanations none of which is kept yet: one insert of many rows."""
        if rows:
            self.s.execute(explanations.insert(), rows)

    def vote_submitted_at(self, feedback_id: str) -> datetime | None:
        return db.value_of(self.s, votes, "feedback_id", "submitted_at", feedback_id)

    def upsert_vote(self, values: dict[str, Any], *, replace: bool) -> None:
        db.upsert(self.s, votes, "feedback_id", values, exists=replace)

    def votes_submitted_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]:
        """`vote_submitted_at` for many ids in one query: the stored ones, by feedback id."""
        return db.values_by_key(self.s, votes, "feedback_id", "submitted_at", feedback_ids)

    def write_votes(self, batch: NewestInBatch) -> None:
        """A batch's votes (`shared.votes.NewestInBatch`): each feedback id's newest row."""
        db.write_rows(self.s, votes, "feedback_id", *batch.writes())

    def erased_among(self, session_keys: Iterable[str]) -> set[str]:
        """`is_erased` for many sessions in one query: the erased ones."""
        by_tag = {erasure_tag(k): k for k in set(session_keys)}
        return {by_tag[t] for t in db.existing_keys(self.s, erased_sessions, "session_key", by_tag)}

    def is_erased(self, session_key: str) -> bool:
        return self.erased_at(session_key) is not None

    def erased_at(self, session_key: str) -> datetime | None:
        return db.value_of(self.s, erased_sessions, "session_key", "erased_at", erasure_tag(session_key))

    def erased_at_many(self, session_keys: Iterable[str]) -> dict[str, datetime]:
        """`erased_at` for many sessions in one query: the erased ones, by key."""
        by_tag = {erasure_tag(k): k for k in set(session_keys)}
        erased = db.values_by_key(self.s, erased_sessions, "session_key", "erased_at", by_tag)
        return {by_tag[tag]: at for tag, at in erased.items()}

    def erased_keys(self) -> frozenset[str]:
        """The keys of stored votes whose session was erased (none, unless a vote slipped in: the records keep
        only tags, so this checks each voting session's tag)."""
        tags = {r.session_key for r in self.s.execute(sa.select(erased_sessions.c.session_key))}
        if not tags:
            return frozenset()
        keys = {r.session_key for r in self.s.execute(sa.select(votes.c.session_key).distinct())}
        return frozenset(k for k in keys if erasure_tag(k) in tags)

    def erase(
        self, session_key: str, feedback_ids: Iterable[str], at: datetime, explanation_ids: Iterable[str] = ()
    ) -> ErasureRow:
        """Delete the session's votes (by key and by the ids the event names), blank the prompts and texts of
        the explanations served to it, remember its erasure tag, and record which exports and models had used
        its votes."""
        ids = set(feedback_ids)
        ids |= {
            r.feedback_id
            for r in self.s.execute(sa.select(votes.c.feedback_id).where(votes.c.session_key == session_key))
        }
        self.s.execute(sa.delete(votes).where(sa.or_(votes.c.session_key == session_key, votes.c.feedback_id.in_(ids))))
        served = sorted(set(explanation_ids))
        if served:
            self.s.execute(
                explanations.update().where(explanations.c.explanation_id.in_(served)).values(prompt_text="", text="")
            )
        self.forget_session_messages(session_key)
        export_ids = sorted(
            {
                r.export_id
                for r in self.s.execute(
                    sa.select(export_feedback.c.export_id).where(export_feedback.c.feedback_id.in_(ids))
                )
            }
        )
        model_ids = sorted(
            {
                r.model_id
                for r in self.s.execute(
                    sa.select(models.c.model_id).where(
                        sa.or_(models.c.train_export_id.in_(export_ids), models.c.heldout_export_id.in_(export_ids))
                    )
                )
            }
        )
        tag = erasure_tag(session_key)
        record: ErasureRow = {
            "session_key": tag,
            "erased_at": at,
            "feedback_ids": sorted(ids),
            "export_ids": export_ids,
            "model_ids": model_ids,
        }
        db.upsert(self.s, erased_sessions, "session_key", record)
        return record

    def erasures(self, limit: int = 100) -> list[ErasureRow]:
        rows = self.s.execute(sa.select(erased_sessions).order_by(erased_sessions.c.erased_at.desc()).limit(limit))
        return [
            # a prefix of the tag is enough to trace; never the whole of it
            cast(ErasureRow, {**dict(r._mapping), "session_key": r.session_key[:12]})
            for r in rows
        ]

    def training_explanations(self) -> list[domain.Explanation]:
        """Every explanation that has at least one vote, with its votes."""
        vote_rows = self.s.execute(
            sa.select(votes.c.feedback_id, votes.c.explanation_id, votes.c.session_key, votes.c.rating, votes.c.stars)
        ).all()
        by_explanation: dict[str, list[domain.Vote]] = {}
        for v in vote_rows:
            by_explanation.setdefault(v.explanation_id, []).append(
                domain.Vote(v.feedback_id, v.session_key, int(v.rating), v.stars)
            )
        if not by_explanation:
            return []
        rows = self.s.execute(
            sa.select(
                explanations.c.explanation_id,
                explanations.c.request_key,
                explanations.c.prompt_text,
                explanations.c.text,
                explanations.c.model,
                explanations.c.fallback_used,
            ).where(explanations.c.explanation_id.in_(list(by_explanation)))
        ).all()
        return [
            domain.Explanation(
                r.explanation_id,
                r.request_key,
                r.prompt_text,
                r.text,
                tuple(by_explanation[r.explanation_id]),
                model=r.model,
                fallback_used=bool(r.fallback_used),
            )
            for r in rows
        ]

    def erased_in_exports(self, export_ids: Iterable[str]) -> list[str]:
        """The feedback ids of the given exports that belong to an erased session (whenever it was erased)."""
        used = {
            r.feedback_id
            for r in self.s.execute(
                sa.select(export_feedback.c.feedback_id).where(export_feedback.c.export_id.in_(list(export_ids)))
            )
        }
        erased: set[str] = set()
        for r in self.s.execute(sa.select(erased_sessions.c.feedback_ids)):
            erased |= set(r.feedback_ids or [])
        return sorted(used & erased)

    def mean_tokens(self) -> float:
        value = self.s.execute(sa.select(sa.func.avg(explanations.c.tokens_in + explanations.c.tokens_out))).scalar()
        return float(value or 0.0)

    def counts(self) -> dict[str, int]:
        return {
            "explanations": int(self.s.execute(sa.select(sa.func.count()).select_from(explanations)).scalar_one()),
            "votes": int(self.s.execute(sa.select(sa.func.count()).select_from(votes)).scalar_one()),
            "erased_sessions": int(
                self.s.execute(sa.select(sa.func.count()).select_from(erased_sessions)).scalar_one()
            ),
        }

    # -- exports ----------------------------------------------------------------------------------------
    def record_export(self, export_id: str, export: domain.Export, job_id: str | None) -> None:
        self.s.execute(
            exports.insert().values(
                export_id=export_id,
                format=export.format,
                split=export.split,
                rows=len(export.rows),
                job_id=job_id,
                created_at=utcnow(),
            )
        )
        if export.feedback_ids:
            self.s.execute(
                export_feedback.insert(),
                [{"export_id": export_id, "feedback_id": f} for f in sorted(export.feedback_ids)],
            )

    def export(self, export_id: str) -> ExportRow | None:
        row = db.row_of(self.s, exports, "export_id", export_id)
        if row is None:
            return None
        ids = [
            r.feedback_id
            for r in self.s.execute(
                sa.select(export_feedback.c.feedback_id).where(export_feedback.c.export_id == export_id)
            )
        ]
        return cast(ExportRow, row | {"feedback_ids": sorted(ids)})

    # -- jobs -------------------------------------------------------------------------------------------
    def job(self, job_id: str) -> JobRow | None:
        return cast(JobRow | None, db.row_of(self.s, jobs, "job_id", job_id))

    def add_job(self, values: dict[str, Any]) -> None:
        now = utcnow()
        self.s.execute(
            jobs.insert().values(
                **{"created_at": now, "updated_at": now, "progress": 0.0, "detail": "", "metrics": {}, **values}
            )
        )

    def delete_job(self, job_id: str) -> None:
        self.s.execute(jobs.delete().where(jobs.c.job_id == job_id))

    def update_job(self, job_id: str, **values: Any) -> None:
        self.s.execute(jobs.update().where(jobs.c.job_id == job_id).values(updated_at=utcnow(), **values))

    def list_jobs(self, limit: int = 100) -> list[JobRow]:
        rows = self.s.execute(sa.select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)).mappings()
        return [cast(JobRow, dict(r)) for r in rows]

    def active_jobs(self) -> list[JobRow]:
        rows = self.s.execute(sa.select(jobs).where(jobs.c.state.in_(sorted(domain.ACTIVE_STATES)))).mappings()
        return [cast(JobRow, dict(r)) for r in rows]

    # -- models -----------------------------------------------------------------------------------------
    def add_model(self, values: dict[str, Any]) -> None:
        self.s.execute(models.insert().values(**values))

    def model(self, model_id: str) -> ModelRow | None:
        return cast(ModelRow | None, db.row_of(self.s, models, "model_id", model_id))

    def update_model(self, model_id: str, **values: Any) -> None:
        self.s.execute(models.update().where(models.c.model_id == model_id).values(**values))

    def list_models(self) -> list[ModelRow]:
        rows = self.s.execute(sa.select(models).order_by(models.c.registered_at.desc())).mappings()
        return [cast(ModelRow, dict(r)) for r in rows]


#: The unit of work handlers take: one transaction, `repo` is this service's repository.
SqlUnitOfWork = db.UnitOfWork[FinetuneRepository]


class Store(db.SqlStore[FinetuneRepository]):
    """This service's database: its tables, repository and outbox on the shared store plumbing."""

    def __init__(self, url: str) -> None:
        super().__init__(url, metadata, FinetuneRepository, outbox)
