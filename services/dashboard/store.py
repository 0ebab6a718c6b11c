"""The dashboard's read model: its tables, repository and unit of work. Fed only by events; no other service
opens it, and it opens no other service's store."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, TypedDict, cast

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.orm import Session

from services.dashboard.domain import Cell, ExperimentInfo
from shared import db
from shared.clock import as_utc
from shared.contracts import ExplanationCreated
from shared.rows import from_row
from shared.votes import NewestInBatch, later_erasure

metadata = sa.MetaData()

explanations = sa.Table(
    "explanations",
    metadata,
    *db.contract_columns("explanation_id", primary_key=True),
    sa.Column("day", sa.String(10), nullable=False, index=True),  # UTC day of created_at, YYYY-MM-DD
    *db.contract_columns("created_at", "ticker", "signal", "prompt_name", "prompt_version", "model"),
    sa.Column("provider", sa.String(50), nullable=False),
    *db.contract_columns("experiment_id", index=True),
    *db.contract_columns("arm_id", "tokens_in", "tokens_out", "cost_usd", "latency_ms", "fallback_used"),
    # This explanation's current votes, kept in step with `votes` by `refresh_vote_totals` in the same
    # transaction as every vote change, so the figures are one scan of this table (no join at read time).
    sa.Column("votes", sa.Integer, nullable=False, default=0),
    sa.Column("positives", sa.Integer, nullable=False, default=0),
    sa.Column("stars_sum", sa.Integer, nullable=False, default=0),
    sa.Column("stars_n", sa.Integer, nullable=False, default=0),
)
#: What this copy keeps of each ExplanationCreated.
EXPLANATION_FIELDS = db.copied_fields(explanations, ExplanationCreated)

#: The parameters of the update that sets an explanation's vote totals (`refresh_vote_totals_of`).
TOTALS = ("k_id", "v_votes", "v_positives", "v_stars_sum", "v_stars_n")

# One row per feedback_id (one per session and explanation): a replacing vote overwrites it.
votes = sa.Table(
    "votes",
    metadata,
    *db.contract_columns("feedback_id", primary_key=True),
    *db.contract_columns("explanation_id", index=True),
    *db.contract_columns("rating", "stars", "has_comment"),
    *db.contract_columns("submitted_at", index=True),
    *db.contract_columns("prompt_name", "prompt_version", "model", "signal", "ticker"),
)

erased_votes = db.erased_votes_table(metadata)

experiments = sa.Table(
    "experiments",
    metadata,
    *db.contract_columns("experiment_id", primary_key=True),
    *db.contract_columns("prompt_name", "allocation", nullable=True),
    sa.Column("arms", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("decision", sa.String(64)),
    *db.contract_columns("winner_arm_id"),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("concluded_at", sa.DateTime(timezone=True)),
)

champions = sa.Table(
    "champion_changes",
    metadata,
    sa.Column("message_id", sa.String(36), primary_key=True),
    *db.contract_columns("prompt_name"),
    sa.Column("version", sa.String(50), nullable=False),
    *db.contract_columns("model", "previous_version"),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False, index=True),
)

models = sa.Table(
    "models",
    metadata,
    *db.contract_columns("model_id", primary_key=True),
    *db.contract_columns("model", "base_model", "serving_base_url", "metrics", "cost_per_1k_tokens_usd"),
    sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
)

finetune_jobs = sa.Table(
    "finetune_jobs",
    metadata,
    *db.contract_columns("job_id", primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    *db.contract_columns("progress", "detail"),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("alert_id", sa.String(36), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("scope", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("recent_rate", sa.Float),
    sa.Column("baseline_rate", sa.Float),
    sa.Column("recent_votes", sa.Integer, nullable=False),
    sa.Column("baseline_votes", sa.Integer, nullable=False),
    sa.Column("p_value", sa.Float),
)


# -- the rows the repository hands to the handlers; times as ISO 8601 text where the figures show them ----


class ExperimentRow(TypedDict):
    experiment_id: str
    prompt_name: str | None  # None until its start arrives (a conclusion can come first)
    allocation: str | None
    arms: list[dict[str, Any]]
    status: str
    decision: str | None
    winner_arm_id: str | None
    reason: str
    started_at: datetime | None
    concluded_at: datetime | None


class AlertRow(TypedDict):
    alert_id: str
    created_at: str | None
    scope: str
    kind: str
    message: str
    recent_rate: float | None
    baseline_rate: float | None
    recent_votes: int
    baseline_votes: int
    p_value: float | None


class ChampionChangeRow(TypedDict):
    prompt_name: str
    version: str
    model: str
    previous_version: str | None
    reason: str
    changed_at: str | None


class ModelRow(TypedDict):
    model_id: str
    model: str
    base_model: str
    serving_base_url: str | None
    metrics: dict[str, Any]
    cost_per_1k_tokens_usd: float
    registered_at: str | None


class FinetuneJobRow(TypedDict):
    job_id: str
    state: str
    progress: float
    detail: str
    updated_at: str | None


class ExplanationExportRow(TypedDict):
    """One explanation with its vote counts, as the export writes it (`_cursor`: where the next page starts)."""

    explanation_id: str
    created_at: str | None
    ticker: str
    signal: str
    prompt_name: str
    prompt_version: str
    model: str
    provider: str
    experiment_id: str | None
    arm_id: str | None
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: float
    fallback_used: bool
    votes: int
    positives: int
    avg_stars: float | None
    _cursor: tuple[datetime, str]


# A counter bumped by every change, so the live stream can tell cheaply whether anything changed.
meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(32), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)

processed = db.processed_table(metadata)


DIMENSIONS = ("day", "signal", "ticker", "prompt_name", "prompt_version", "model", "experiment_id", "arm_id")
#: The groupings the dashboard reads. One cube over every dimension would have about one cell per
#: explanation (day x ticker x ...), so each figure family reads the smallest grouping that serves it.
BY_TIME = ("day", "signal", "prompt_name", "prompt_version", "model", "experiment_id", "arm_id")
BY_TICKER = ("signal", "ticker")
BY_ARM = ("experiment_id", "arm_id", "prompt_name", "prompt_version", "model")


_BLANK: dict[str, str | None] = {d: "" for d in DIMENSIONS} | {"experiment_id": None, "arm_id": None}


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else as_utc(ts).isoformat()


class DashboardRepository(db.MessageLog):
    processed = processed  # the table MessageLog.seen / mark_seen use

    # -- idempotency and change counter -----------------------------------------------------------------
    def bump_revision(self, changes: int = 1) -> None:
        self.s.execute(meta.update().where(meta.c.key == "revision").values(value=meta.c.value + changes))

    def revision(self) -> int:
        row = self.s.execute(sa.select(meta.c.value).where(meta.c.key == "revision")).first()
        return int(row.value) if row else 0

    # -- explanations -----------------------------------------------------------------------------------
    def add_explanation(self, values: dict[str, Any]) -> bool:
        if not db.insert_new(self.s, explanations, "explanation_id", values):
            return False
        self.refresh_vote_totals(values["explanation_id"])  # votes that arrived first count now
        return True

    def explanations_known(self, explanation_ids: Iterable[str]) -> set[str]:
        """Which of these explanations the read model has (one query per `IN_CHUNK` ids)."""
        return db.existing_keys(self.s, explanations, "explanation_id", explanation_ids)

    def add_explanations(self, rows: list[dict[str, Any]]) -> None:
        """`add_explanation` for many explanations none of which is in the read model yet: one insert of many
        rows, then their vote totals, for the votes that arrived first (`refresh_vote_totals_of`)."""
        if not rows:
            return
        self.s.execute(explanations.insert(), rows)
        self.refresh_vote_totals_of(r["explanation_id"] for r in rows)

    # -- votes ------------------------------------------------------------------------------------------
    def votes_without_explanation(self, since: datetime, until: datetime) -> list[uuid.UUID]:
        return db.explanations_voted_but_unknown(self.s, votes, explanations, since, until)

    def vote_submitted_at(self, feedback_id: uuid.UUID) -> datetime | None:
        return db.value_of(self.s, votes, "feedback_id", "submitted_at", str(feedback_id))

    def erased_at(self, feedback_id: uuid.UUID) -> datetime | None:
        return db.value_of(self.s, erased_votes, "feedback_id", "erased_at", str(feedback_id))

    def upsert_vote(self, values: dict[str, Any], *, replace: bool) -> None:
        db.upsert(self.s, votes, "feedback_id", values, exists=replace)
        self.refresh_vote_totals(values["explanation_id"])

    def votes_submitted_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]:
        """`vote_submitted_at` for many ids in one query: the stored ones, by feedback id."""
        return db.values_by_key(self.s, votes, "feedback_id", "submitted_at", feedback_ids)

    def votes_erased_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]:
        """`erased_at` for many ids in one query: the erased ones, by feedback id."""
        return db.values_by_key(self.s, erased_votes, "feedback_id", "erased_at", feedback_ids)

    def write_votes(self, batch: NewestInBatch) -> None:
        """A batch's votes (`shared.votes.NewestInBatch`): each feedback id's newest row, then the vote totals
        of the explanations they are on, recounted once each (`refresh_vote_totals_of`)."""
        new, replacing = batch.writes()
        db.write_rows(self.s, votes, "feedback_id", new, replacing)
        self.refresh_vote_totals_of({row["explanation_id"] for row, _ in (*new, *replacing)})

    def refresh_vote_totals_of(self, explanation_ids: Iterable[str]) -> None:
        """`refresh_vote_totals` for many explanations: one grouped recount, one update of many rows."""
        ids = sorted(set(explanation_ids))
        if not ids:
            return
        q = sa.select(
            votes.c.explanation_id,
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((votes.c.rating == 1, 1), else_=0)), 0),
            sa.func.coalesce(sa.func.sum(votes.c.stars), 0),
            sa.func.count(votes.c.stars),
        ).group_by(votes.c.explanation_id)
        totals = {r[0]: r[1:] for r in db.select_in(self.s, q, votes.c.explanation_id, ids)}
        self.s.execute(
            explanations.update()
            .where(explanations.c.explanation_id == sa.bindparam("k_id"))
            .values(
                votes=sa.bindparam("v_votes"),
                positives=sa.bindparam("v_positives"),
                stars_sum=sa.bindparam("v_stars_sum"),
                stars_n=sa.bindparam("v_stars_n"),
            ),
            [dict(zip(TOTALS, (e, *totals.get(e, (0, 0, 0, 0))), strict=True)) for e in ids],
        )

    def refresh_vote_totals(self, explanation_id: str) -> None:
        """Recount one explanation's votes from the vote rows (a recount, not an increment: a replaced,
        duplicated or erased vote can never be counted twice)."""
        self.refresh_vote_totals_of([explanation_id])

    def erase_votes(self, feedback_ids: list[str], at: datetime) -> int:
        removed = 0
        for fid in feedback_ids:
            owner = db.value_of(self.s, votes, "feedback_id", "explanation_id", fid)
            removed += db.rowcount(self.s.execute(sa.delete(votes).where(votes.c.feedback_id == fid)))
            if owner is not None:
                self.refresh_vote_totals(owner)
            remembered = db.value_of(self.s, erased_votes, "feedback_id", "erased_at", fid)
            if later_erasure(remembered, at):
                row = {"feedback_id": fid, "erased_at": as_utc(at)}
                db.upsert(self.s, erased_votes, "feedback_id", row, exists=remembered is not None)
        return removed

    # -- experiments, champions, models, fine-tune jobs -------------------------------------------------
    def experiment(self, experiment_id: str) -> ExperimentRow | None:
        return cast(ExperimentRow | None, db.row_of(self.s, experiments, "experiment_id", experiment_id))

    def upsert_experiment(self, experiment_id: str, values: dict[str, Any]) -> None:
        if self.experiment(experiment_id) is None:
            self.s.execute(
                experiments.insert().values(
                    experiment_id=experiment_id, **{"arms": [], "status": "unknown", "reason": "", **values}
                )
            )
        else:
            self.s.execute(experiments.update().where(experiments.c.experiment_id == experiment_id).values(**values))

    def add_champion_change(self, values: dict[str, Any]) -> None:
        self.s.execute(champions.insert().values(**values))

    def add_model(self, values: dict[str, Any]) -> None:
        db.upsert(self.s, models, "model_id", values)

    def upsert_finetune_job(self, values: dict[str, Any]) -> bool:
        row = self.s.execute(
            sa.select(finetune_jobs.c.updated_at).where(finetune_jobs.c.job_id == values["job_id"])
        ).first()
        if row is None:
            self.s.execute(finetune_jobs.insert().values(**values))
            return True
        if as_utc(values["updated_at"]) < as_utc(row.updated_at):
            return False  # an older progress report arrived late
        self.s.execute(finetune_jobs.update().where(finetune_jobs.c.job_id == values["job_id"]).values(**values))
        return True

    # -- alerts -----------------------------------------------------------------------------------------
    def add_alert(self, values: dict[str, Any]) -> bool:
        return db.insert_new(self.s, alerts, "alert_id", values)

    # -- reads ------------------------------------------------------------------------------------------
    def cells(
        self, since_day: str | None = None, *, by: tuple[str, ...] = DIMENSIONS, experiments_only: bool = False
    ) -> list[Cell]:
        """Explanations grouped by the dimensions `by` (the others are left blank), with their votes summed.
        A vote counts once its explanation is here (`add_explanation` recounts the votes that came first)."""
        e = explanations
        dims = [e.c[d] for d in by]
        q = sa.select(
            *dims,
            sa.func.count().label("explanations"),
            sa.func.coalesce(sa.func.sum(sa.case((e.c.votes > 0, 1), else_=0)), 0).label("with_feedback"),
            sa.func.coalesce(sa.func.sum(e.c.votes), 0).label("votes"),
            sa.func.coalesce(sa.func.sum(e.c.positives), 0).label("positives"),
            sa.func.coalesce(sa.func.sum(e.c.stars_sum), 0).label("stars_sum"),
            sa.func.coalesce(sa.func.sum(e.c.stars_n), 0).label("stars_n"),
            sa.func.coalesce(sa.func.sum(e.c.cost_usd), 0.0).label("cost_usd"),
            sa.func.coalesce(sa.func.sum(e.c.latency_ms), 0.0).label("latency_ms"),
        ).group_by(*dims)
        if since_day is not None:
            q = q.where(e.c.day >= since_day)
        if experiments_only:
            q = q.where(e.c.experiment_id.is_not(None))

        def dimensions(r: RowMapping) -> dict[str, Any]:  # the grouped ones from the row, the others blank
            return {d: r[d] if d in by else _BLANK[d] for d in DIMENSIONS}

        return [
            Cell(
                **dimensions(r),
                explanations=int(r["explanations"]),
                with_feedback=int(r["with_feedback"]),
                votes=int(r["votes"]),
                positives=int(r["positives"]),
                stars_sum=int(r["stars_sum"]),
                stars_n=int(r["stars_n"]),
                cost_usd=float(r["cost_usd"]),
                latency_ms=float(r["latency_ms"]),
            )
            for r in self.s.execute(q).mappings()
        ]

    def first_voted_at(self, since_day: str) -> datetime | None:
        """When the first explanation of the window that has a vote was created (where the curve starts)."""
        e = explanations
        q = sa.select(sa.func.min(e.c.created_at)).where(e.c.day >= since_day, e.c.votes > 0)
        first = self.s.execute(q).scalar_one_or_none()
        return None if first is None else as_utc(first)

    def curve_buckets(self, since_day: str, start: datetime, width_s: int) -> list[tuple[int, int, int, int]]:
        """(window index since the epoch, explanations, votes, positives) per `width_s`-second window of
        creation time, for the explanations of the window created at `start` or later."""
        e = explanations
        if self.s.get_bind().dialect.name == "sqlite":  # stored as UTC text; integer division floors
            index = sa.cast(sa.func.strftime("%s", e.c.created_at), sa.Integer) // width_s
        else:
            index = sa.cast(sa.func.floor(sa.func.extract("epoch", e.c.created_at) / width_s), sa.Integer)
        bucket = index.label("bucket")
        q = (
            sa.select(
                bucket,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(e.c.votes), 0),
                sa.func.coalesce(sa.func.sum(e.c.positives), 0),
            )
            .where(e.c.day >= since_day, e.c.created_at >= as_utc(start))
            .group_by(bucket)
        )
        return [(int(b), int(n), int(v), int(p)) for b, n, v, p in self.s.execute(q).all()]

    def pending_votes(self) -> int:
        """Votes whose explanation the dashboard has not seen yet (counted once it arrives)."""
        known = sa.select(explanations.c.explanation_id).where(explanations.c.explanation_id == votes.c.explanation_id)
        return int(self.s.execute(sa.select(sa.func.count()).select_from(votes).where(~known.exists())).scalar_one())

    def vote_counts(self, start: datetime, end: datetime) -> list[tuple[str, str, int, int]]:
        """(prompt_name, prompt_version, votes, positives) of the votes submitted in (start, end]."""
        q = (
            sa.select(
                votes.c.prompt_name,
                votes.c.prompt_version,
                sa.func.count(),
                sa.func.sum(sa.case((votes.c.rating == 1, 1), else_=0)),
            )
            .where(votes.c.submitted_at > as_utc(start), votes.c.submitted_at <= as_utc(end))
            .group_by(votes.c.prompt_name, votes.c.prompt_version)
        )
        return [(n, v, int(c), int(p or 0)) for n, v, c, p in self.s.execute(q).all()]

    def experiment_infos(self) -> list[ExperimentInfo]:
        return [
            from_row(
                ExperimentInfo,
                r,
                reason=r["reason"] or "",
                started_at=_iso(r["started_at"]),
                concluded_at=_iso(r["concluded_at"]),
                arms=list(r["arms"] or []),
            )
            for r in self.s.execute(sa.select(experiments)).mappings()
        ]

    def recent_alerts(self, limit: int = 50) -> list[AlertRow]:
        rows = self.s.execute(sa.select(alerts).order_by(alerts.c.created_at.desc()).limit(limit)).mappings()
        return [cast(AlertRow, {**dict(r), "created_at": _iso(r["created_at"])}) for r in rows]

    def champion_history(self, limit: int = 50) -> list[ChampionChangeRow]:
        rows = self.s.execute(
            sa.select(champions.c.prompt_name, champions.c.version, champions.c.model, champions.c.previous_version)
            .add_columns(champions.c.reason, champions.c.changed_at)
            .order_by(champions.c.changed_at.desc())
            .limit(limit)
        ).mappings()
        return [cast(ChampionChangeRow, {**dict(r), "changed_at": _iso(r["changed_at"])}) for r in rows]

    def model_list(self) -> list[ModelRow]:
        rows = self.s.execute(sa.select(models).order_by(models.c.registered_at.desc())).mappings()
        return [cast(ModelRow, {**dict(r), "registered_at": _iso(r["registered_at"])}) for r in rows]

    def finetune_job_list(self, limit: int = 20) -> list[FinetuneJobRow]:
        rows = self.s.execute(
            sa.select(finetune_jobs).order_by(finetune_jobs.c.updated_at.desc()).limit(limit)
        ).mappings()
        return [cast(FinetuneJobRow, {**dict(r), "updated_at": _iso(r["updated_at"])}) for r in rows]

    def explanation_rows(
        self, since_day: str | None, limit: int, after: tuple[Any, str] | None = None
    ) -> Iterator[ExplanationExportRow]:
        """One row per explanation with its vote counts (for the export), in (created_at, id) order; `after`
        (the last row's created_at and id) starts the next page there (keyset paging)."""
        e = explanations
        avg_stars = sa.case((e.c.stars_n > 0, e.c.stars_sum * 1.0 / e.c.stars_n), else_=None).label("avg_stars")
        q = (
            sa.select(
                e.c.explanation_id,
                e.c.created_at,
                e.c.ticker,
                e.c.signal,
                e.c.prompt_name,
                e.c.prompt_version,
                e.c.model,
                e.c.provider,
                e.c.experiment_id,
                e.c.arm_id,
                e.c.tokens_in,
                e.c.tokens_out,
                e.c.cost_usd,
                e.c.latency_ms,
                e.c.fallback_used,
                e.c.votes,
                e.c.positives,
                avg_stars,
            )
            .order_by(e.c.created_at, e.c.explanation_id)
            .limit(limit)
        )
        if since_day is not None:
            q = q.where(e.c.day >= since_day)
        if after is not None:
            at, eid = after
            q = q.where(sa.or_(e.c.created_at > at, sa.and_(e.c.created_at == at, e.c.explanation_id > eid)))
        for r in self.s.execute(q).mappings():
            cursor = (r["created_at"], r["explanation_id"])
            yield cast(ExplanationExportRow, {**dict(r), "created_at": _iso(r["created_at"]), "_cursor": cursor})


#: The unit of work handlers take: one transaction, `repo` is this service's repository.
SqlUnitOfWork = db.UnitOfWork[DashboardRepository]


def _seed(session: Session) -> None:
    if session.execute(sa.select(meta.c.key).where(meta.c.key == "revision")).first() is None:
        session.execute(meta.insert().values(key="revision", value=0))


class Store(db.SqlStore[DashboardRepository]):
    """This service's database: its tables and repository on the shared store plumbing. No outbox: the
    dashboard only reads the other services' events and publishes none."""

    def __init__(self, url: str) -> None:
        super().__init__(url, metadata, DashboardRepository, None, seed=_seed)
