"""The optimizer's own store: prompt registry, champion history, experiments and their arms, the exposures
and votes each arm collected, variant generations. No other service opens it."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, TypedDict, cast

import sqlalchemy as sa

from services.optimizer import domain
from services.optimizer.stats.results import ArmData
from shared import db
from shared.clock import as_utc
from shared.contracts import ExplanationCreated, utcnow
from shared.outbox import outbox_table
from shared.privacy import erasure_tag
from shared.votes import NewestInBatch, later_erasure

metadata = sa.MetaData()

prompt_versions = sa.Table(
    "prompt_versions",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("version", sa.String(50), primary_key=True),
    *db.contract_columns("template"),
    sa.Column("parent_version", sa.String(50)),
    sa.Column("reason", sa.String(500), nullable=False, default=""),  # why it was made (lineage)
    sa.Column("source", sa.String(32), nullable=False),  # seed | offline | openai | manual
    sa.Column("status", sa.String(16), nullable=False),  # active | candidate | archived
    sa.Column("generation_id", sa.Integer),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

champions = sa.Table(
    "champions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(100), nullable=False, index=True),
    sa.Column("version", sa.String(50), nullable=False),
    *db.contract_columns("model"),
    sa.Column("kind", sa.String(16), nullable=False),  # seed | promotion | rollback
    sa.Column("reason", sa.String(1000), nullable=False, default=""),
    *db.contract_columns("experiment_id", "previous_version"),
    sa.Column("previous_model", sa.String(200)),
    sa.Column("since", sa.DateTime(timezone=True), nullable=False),
)

experiments = sa.Table(
    "experiments",
    metadata,
    *db.contract_columns("experiment_id", primary_key=True),
    *db.contract_columns("prompt_name", index=True),
    sa.Column("status", sa.String(24), nullable=False, index=True),
    *db.contract_columns("allocation"),
    sa.Column("metric", sa.String(32), nullable=False),
    sa.Column("alpha", sa.Float, nullable=False),
    sa.Column("min_duration_s", sa.Float, nullable=False),
    sa.Column("min_feedback_per_arm", sa.Integer, nullable=False),
    sa.Column("max_feedback_per_arm", sa.Integer, nullable=False),
    sa.Column("target_lift", sa.Float, nullable=False),
    sa.Column("futility_alpha", sa.Float),  # null: futility judged on the decision's interval
    sa.Column("feedback_rate_grace_s", sa.Float),  # null: the feedback rate counts every session
    sa.Column("min_lift_to_ship", sa.Float, nullable=False),
    sa.Column("max_cost_ratio", sa.Float),
    sa.Column("max_latency_ratio", sa.Float),
    sa.Column("min_feedback_rate_ratio", sa.Float),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("note", sa.String(500), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    sa.Column("weights", sa.JSON, nullable=False),  # in force now
    sa.Column("allocation_history", sa.JSON, nullable=False),  # [[exposures when it took effect, weights], ...]
    sa.Column("reweighted_at_feedback", sa.Integer, nullable=False, default=0),
    sa.Column("decision", sa.String(24)),  # the final decision once ended
    *db.contract_columns("winner_arm_id"),
    sa.Column("reason", sa.String(2000), nullable=False, default=""),
    sa.Column("last_status", sa.String(24)),  # the latest decision while running
    sa.Column("last_reason", sa.String(2000)),
    sa.Column("last_decided_at", sa.DateTime(timezone=True)),
    sa.Column("promoted_champion_id", sa.Integer),
    sa.Column("rolled_back", sa.Boolean, nullable=False, default=False),
)

arms = sa.Table(
    "arms",
    metadata,
    *db.contract_columns("experiment_id", "arm_id", primary_key=True),
    sa.Column("position", sa.SmallInteger, nullable=False),
    *db.contract_columns("prompt_version", "model"),
    sa.Column("initial_weight", sa.Float, nullable=False),
    *db.contract_columns("is_control"),
)

exposures = sa.Table(
    "exposures",
    metadata,
    *db.contract_columns("explanation_id", primary_key=True),
    *db.contract_columns("experiment_id", index=True),
    *db.contract_columns(
        "arm_id", "prompt_name", "prompt_version", "model", "cost_usd", "latency_ms", "fallback_used", "created_at"
    ),
)
#: What this copy keeps of each ExplanationCreated.
EXPOSURE_FIELDS = db.copied_fields(exposures, ExplanationCreated)

# The session each explanation was served to and its signal: the unit of analysis and the segment. A table of
# its own (not columns of exposures) so that stores made before it gain it by create_all; an exposure without a
# row here (recorded before) is its own session, of signal "unknown".
exposure_units = sa.Table(
    "exposure_units",
    metadata,
    *db.contract_columns("explanation_id", primary_key=True),
    *db.contract_columns("experiment_id", index=True),
    sa.Column("session_key", sa.String(128), nullable=False),  # keyed hash of the session; the explanation id if none
    sa.Column("signal", sa.String(16), nullable=False),
)

votes = sa.Table(
    "votes",
    metadata,
    *db.contract_columns("feedback_id", primary_key=True),  # a replacing vote keeps it: upsert
    *db.contract_columns("explanation_id", "experiment_id", index=True),
    *db.contract_columns("arm_id", "rating", "stars", "submitted_at"),
)

erased_votes = db.erased_votes_table(metadata)

# Sessions erased on request, by `erasure_tag` (never the key), with the anonymous unit their exposures were
# given: an explanation served before the erasure whose event arrives after it joins that unit, without the key.
erased_sessions = sa.Table(
    "erased_sessions",
    metadata,
    sa.Column("tag", sa.String(64), primary_key=True),
    sa.Column("unit", sa.String(128), nullable=False),
    sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
)

generations = sa.Table(
    "generations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    *db.contract_columns("prompt_name", index=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),  # offline | openai
    *db.contract_columns("model"),
    sa.Column("parent_version", sa.String(50), nullable=False),
    sa.Column("requested", sa.Integer, nullable=False),
    sa.Column("accepted", sa.JSON, nullable=False),  # versions added
    sa.Column("rejected", sa.JSON, nullable=False),  # [{reason, preview}]
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("tokens_in", sa.Integer, nullable=False),
    sa.Column("tokens_out", sa.Integer, nullable=False),
)

processed = db.processed_table(metadata)

outbox = outbox_table(metadata)


# -- the rows the repository hands to the handlers (one key per column) -----------------------------------


class PromptVersionRow(TypedDict):
    name: str
    version: str
    template: str
    parent_version: str | None
    reason: str  # why it was made (lineage)
    source: str  # seed | offline | openai | manual
    status: str  # active | candidate | archived
    generation_id: int | None
    created_at: datetime


class ChampionRow(TypedDict):
    id: int
    name: str
    version: str
    model: str
    kind: str  # seed | promotion | rollback
    reason: str
    experiment_id: str | None
    previous_version: str | None
    previous_model: str | None
    since: datetime


class ExperimentRow(domain.StoredDecisionRule):
    """An experiment: its decision rule's columns (`domain.StoredDecisionRule`) and these."""

    experiment_id: str
    prompt_name: str
    status: str
    allocation: Literal["fixed", "adaptive"]
    source: str
    note: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    weights: dict[str, float]  # in force now
    allocation_history: list[Any]  # [[exposures when it took effect, weights], ...]
    reweighted_at_feedback: int
    decision: str | None  # the final decision once ended
    winner_arm_id: str | None
    reason: str
    last_status: str | None  # the latest decision while running
    last_reason: str | None
    last_decided_at: datetime | None
    promoted_champion_id: int | None
    rolled_back: bool


class ArmRow(TypedDict):
    experiment_id: str
    arm_id: str
    position: int
    prompt_version: str
    model: str
    initial_weight: float
    is_control: bool


class GenerationRow(TypedDict):
    id: int
    prompt_name: str
    at: datetime
    source: str  # offline | openai
    model: str
    parent_version: str
    requested: int
    accepted: list[str]  # versions added
    rejected: list[dict[str, str]]  # [{reason, preview}]
    cost_usd: float
    tokens_in: int
    tokens_out: int


class OptimizerRepository(db.MessageLog):
    processed = processed  # the table MessageLog.seen / mark_seen use
    outbox = outbox  # the table forget_session_messages rewrites

    # -- prompt versions --------------------------------------------------------------------------------
    def prompt_names(self) -> list[str]:
        return list(
            self.s.execute(sa.select(prompt_versions.c.name).distinct().order_by(prompt_versions.c.name)).scalars()
        )

    def versions(self, name: str) -> list[PromptVersionRow]:
        rows = self.s.execute(
            sa.select(prompt_versions).where(prompt_versions.c.name == name).order_by(prompt_versions.c.created_at)
        ).mappings()
        return [cast(PromptVersionRow, dict(r)) for r in rows]

    def version(self, name: str, version: str) -> PromptVersionRow | None:
        q = sa.select(prompt_versions).where(prompt_versions.c.name == name, prompt_versions.c.version == version)
        row = self.s.execute(q).mappings().first()
        return cast(PromptVersionRow, dict(row)) if row else None

    def add_version(self, values: dict[str, Any]) -> None:
        self.s.execute(prompt_versions.insert().values(created_at=utcnow(), **values))

    def set_version_status(self, name: str, version: str, status: str) -> None:
        self.s.execute(
            prompt_versions.update()
            .where(prompt_versions.c.name == name, prompt_versions.c.version == version)
            .values(status=status)
        )

    # -- champions --------------------------------------------------------------------------------------
    def champion(self, name: str) -> ChampionRow | None:
        q = sa.select(champions).where(champions.c.name == name).order_by(champions.c.id.desc()).limit(1)
        row = self.s.execute(q).mappings().first()
        return cast(ChampionRow, dict(row)) if row else None

    def champion_by_id(self, champion_id: int) -> ChampionRow | None:
        return cast(ChampionRow | None, db.row_of(self.s, champions, "id", champion_id))

    def champion_history(self, name: str) -> list[ChampionRow]:
        q = sa.select(champions).where(champions.c.name == name).order_by(champions.c.id)
        return [cast(ChampionRow, dict(r)) for r in self.s.execute(q).mappings()]

    def add_champion(self, values: dict[str, Any]) -> int:
        return self._insert(champions.insert().values(since=utcnow(), **values))

    def _insert(self, statement: sa.Insert) -> int:
        """Run an INSERT into a table with an autoincrement key; the key it got."""
        result = cast(sa.CursorResult[Any], self.s.execute(statement))
        assert result.inserted_primary_key is not None  # a single-row INSERT always has one
        return int(result.inserted_primary_key[0])

    # -- experiments ------------------------------------------------------------------------------------
    def add_experiment(self, values: dict[str, Any], arm_rows: list[dict[str, Any]]) -> None:
        self.s.execute(experiments.insert().values(**values))
        for position, arm in enumerate(arm_rows):
            self.s.execute(arms.insert().values(experiment_id=values["experiment_id"], position=position, **arm))

    def experiment(self, experiment_id: str) -> ExperimentRow | None:
        return cast(ExperimentRow | None, db.row_of(self.s, experiments, "experiment_id", experiment_id))

    def experiments(self, status: str | None = None, prompt_name: str | None = None) -> list[ExperimentRow]:
        q = sa.select(experiments).order_by(experiments.c.created_at.desc())
        if status is not None:
            q = q.where(experiments.c.status == status)
        if prompt_name is not None:
            q = q.where(experiments.c.prompt_name == prompt_name)
        return [cast(ExperimentRow, dict(r)) for r in self.s.execute(q).mappings()]

    def active_experiment(self, prompt_name: str) -> ExperimentRow | None:
        q = sa.select(experiments).where(
            experiments.c.prompt_name == prompt_name, experiments.c.status.in_(sorted(domain.ACTIVE_STATES))
        )
        row = self.s.execute(q).mappings().first()
        return cast(ExperimentRow, dict(row)) if row else None

    def update_experiment(self, experiment_id: str, **values: Any) -> None:
        self.s.execute(experiments.update().where(experiments.c.experiment_id == experiment_id).values(**values))

    def arms(self, experiment_id: str) -> list[ArmRow]:
        q = sa.select(arms).where(arms.c.experiment_id == experiment_id).order_by(arms.c.position)
        return [cast(ArmRow, dict(r)) for r in self.s.execute(q).mappings()]

    def rebase_arms(self, experiment_id: str, champion_version: str, champion_model: str) -> None:
        """Point a queued experiment at the champion of the moment: the control becomes the champion and
        every treatment keeps its model with the champion's prompt."""
        for arm in self.arms(experiment_id):
            values = {"prompt_version": champion_version}
            if arm["is_control"]:
                values["model"] = champion_model
            self.s.execute(
                arms.update()
                .where(arms.c.experiment_id == experiment_id, arms.c.arm_id == arm["arm_id"])
                .values(**values)
            )

    def versions_in_active_experiments(self, name: str) -> set[str]:
        q = (
            sa.select(arms.c.prompt_version)
            .join(experiments, experiments.c.experiment_id == arms.c.experiment_id)
            .where(
                experiments.c.prompt_name == name,
                experiments.c.status.in_(sorted(domain.ACTIVE_STATES | {domain.QUEUED})),
            )
        )
        return set(self.s.execute(q).scalars())

    def tested_versions(self, name: str) -> set[str]:
        q = (
            sa.select(arms.c.prompt_version)
            .join(experiments, experiments.c.experiment_id == arms.c.experiment_id)
            .where(experiments.c.prompt_name == name)
        )
        return set(self.s.execute(q).scalars())

    # -- exposures and votes ----------------------------------------------------------------------------
    def votes_without_explanation(self, since: datetime, until: datetime) -> list[uuid.UUID]:
        return db.explanations_voted_but_unknown(self.s, votes, exposures, since, until)

    def add_exposure(self, values: dict[str, Any], *, session_key: str | None = None, signal: str = "unknown") -> bool:
        """Record an explanation an arm served, with the session it was served to (its own id when the event
        carried none: an old message is its own session). False when already recorded."""
        q = sa.select(exposures.c.explanation_id).where(exposures.c.explanation_id == values["explanation_id"])
        if self.s.execute(q).first() is not None:
            return False
        self.s.execute(exposures.insert().values(**values))
        self.s.execute(
            exposure_units.insert().values(
                explanation_id=values["explanation_id"],
                experiment_id=values.get("experiment_id"),
                session_key=session_key or values["explanation_id"],
                signal=signal,
            )
        )
        return True

    def exposures_known(self, explanation_ids: Iterable[str]) -> set[str]:
        """Which of these explanations have an exposure recorded (one query per `IN_CHUNK` ids)."""
        return db.existing_keys(self.s, exposures, "explanation_id", explanation_ids)

    def add_exposures(self, rows: list[tuple[dict[str, Any], str | None, str]]) -> None:
        """`add_exposure` for many explanations none of which is recorded yet, (values, session_key, signal)
        each: one insert of many rows into each table."""
        if not rows:
            return
        self.s.execute(exposures.insert(), [values for values, _, _ in rows])
        self.s.execute(
            exposure_units.insert(),
            [
                {
                    "explanation_id": values["explanation_id"],
                    "experiment_id": values.get("experiment_id"),
                    "session_key": session_key or values["explanation_id"],
                    "signal": signal,
                }
                for values, session_key, signal in rows
            ],
        )

    def vote_submitted_at(self, feedback_id: uuid.UUID) -> datetime | None:
        return db.value_of(self.s, votes, "feedback_id", "submitted_at", str(feedback_id))

    def votes_submitted_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]:
        """`vote_submitted_at` for many ids in one query: the stored ones, by feedback id."""
        return db.values_by_key(self.s, votes, "feedback_id", "submitted_at", feedback_ids)

    def votes_erased_at(self, feedback_ids: Iterable[str]) -> dict[str, datetime]:
        """`vote_erased_at` for many ids in one query: the erased ones, by feedback id."""
        return db.values_by_key(self.s, erased_votes, "feedback_id", "erased_at", feedback_ids)

    def write_votes(self, batch: NewestInBatch) -> None:
        """A batch's votes (`shared.votes.NewestInBatch`): each feedback id's newest row."""
        db.write_rows(self.s, votes, "feedback_id", *batch.writes())

    def upsert_vote(self, values: dict[str, Any], *, replace: bool) -> None:
        db.upsert(self.s, votes, "feedback_id", values, exists=replace)

    def delete_votes(self, feedback_ids: list[str]) -> int:
        if not feedback_ids:
            return 0
        return db.rowcount(self.s.execute(sa.delete(votes).where(votes.c.feedback_id.in_(feedback_ids))))

    def remember_erased(self, feedback_ids: list[str], erased_at: datetime) -> None:
        for fid in feedback_ids:
            remembered = db.value_of(self.s, erased_votes, "feedback_id", "erased_at", fid)
            if later_erasure(remembered, erased_at):
                row = {"feedback_id": fid, "erased_at": as_utc(erased_at)}
                db.upsert(self.s, erased_votes, "feedback_id", row, exists=remembered is not None)

    def erase_session(self, session_key: str, feedback_ids: list[str], explanation_ids: list[str], at: datetime) -> int:
        """Forget an erased session: its votes (the ids the event names, and any vote on an explanation served to
        it: only its own vote on those can count) are deleted and remembered as erased; its exposures stay (they
        were served and paid for: the arm's exposure, cost, latency and sample-ratio figures do not change) but
        their unit becomes an anonymous one, the same for all of them, so the session is still one unit and
        can no longer be joined with its key. Returns how many votes were deleted."""
        served = {
            r.explanation_id
            for r in self.s.execute(
                sa.select(exposure_units.c.explanation_id).where(exposure_units.c.session_key == session_key)
            )
        } | set(explanation_ids)
        ids = set(feedback_ids)
        if served:
            ids |= {
                r.feedback_id
                for r in self.s.execute(
                    sa.select(votes.c.feedback_id).where(votes.c.explanation_id.in_(sorted(served)))
                )
            }
        self.remember_erased(sorted(ids), at)
        removed = self.delete_votes(sorted(ids))
        tag = erasure_tag(session_key)
        known = self.s.execute(
            sa.select(erased_sessions.c.unit, erased_sessions.c.erased_at).where(erased_sessions.c.tag == tag)
        ).first()
        unit = known.unit if known else f"erased-{uuid.uuid4().hex}"
        if known:
            if as_utc(at) > as_utc(known.erased_at):  # an older erasure arriving late does not move it back
                self.s.execute(erased_sessions.update().where(erased_sessions.c.tag == tag).values(erased_at=at))
        else:
            self.s.execute(erased_sessions.insert().values(tag=tag, unit=unit, erased_at=at))
        self.s.execute(
            exposure_units.update().where(exposure_units.c.session_key == session_key).values(session_key=unit)
        )
        self.forget_session_messages(session_key)
        return removed

    def erased_session(self, session_key: str) -> tuple[datetime, str] | None:
        """(when, the anonymous unit) if this session was erased, else None."""
        row = self.s.execute(
            sa.select(erased_sessions.c.erased_at, erased_sessions.c.unit).where(
                erased_sessions.c.tag == erasure_tag(session_key)
            )
        ).first()
        return (row.erased_at, row.unit) if row else None

    def erased_sessions(self, session_keys: Iterable[str]) -> dict[str, tuple[datetime, str]]:
        """`erased_session` for many sessions in one query: (when, the anonymous unit) of the erased ones, by key."""
        by_tag = {erasure_tag(k): k for k in set(session_keys)}
        q = sa.select(erased_sessions.c.tag, erased_sessions.c.erased_at, erased_sessions.c.unit)
        return {
            by_tag[r.tag]: (r.erased_at, r.unit) for r in db.select_in(self.s, q, erased_sessions.c.tag, sorted(by_tag))
        }

    def vote_erased_at(self, feedback_id: uuid.UUID) -> datetime | None:
        return db.value_of(self.s, erased_votes, "feedback_id", "erased_at", str(feedback_id))

    def count_feedback(self, experiment_id: str) -> int:
        q = sa.select(sa.func.count()).select_from(votes).where(votes.c.experiment_id == experiment_id)
        return int(self.s.execute(q).scalar_one())

    def count_exposures(self, experiment_id: str) -> int:
        q = sa.select(sa.func.count()).select_from(exposures).where(exposures.c.experiment_id == experiment_id)
        return int(self.s.execute(q).scalar_one())

    def session_rows(self, experiment_id: str, started_at: datetime | None) -> list[domain.SessionRow]:
        """Per (arm, session, signal): own-model explanations, fallbacks, cost, latency, first served, and the
        votes on its own-model explanations. A vote whose explanation is not recorded (yet) counts on its arm as
        its own session (the events do not arrive in order)."""
        unit = sa.func.coalesce(exposure_units.c.session_key, exposures.c.explanation_id)
        signal = sa.func.coalesce(exposure_units.c.signal, "unknown")
        own = sa.case((exposures.c.fallback_used.is_(False), 1), else_=0)
        exp_q = (
            sa.select(
                exposures.c.arm_id,
                unit.label("unit"),
                signal.label("signal"),
                sa.func.sum(own).label("own"),
                sa.func.count().label("served"),
                sa.func.coalesce(sa.func.sum(exposures.c.cost_usd), 0.0).label("cost"),
                sa.func.coalesce(sa.func.sum(exposures.c.latency_ms), 0.0).label("latency"),
                sa.func.min(exposures.c.created_at).label("first"),
            )
            .select_from(
                exposures.outerjoin(exposure_units, exposure_units.c.explanation_id == exposures.c.explanation_id)
            )
            .where(exposures.c.experiment_id == experiment_id)
            .group_by(exposures.c.arm_id, unit, signal)
        )
        v_unit = sa.func.coalesce(exposure_units.c.session_key, votes.c.explanation_id)
        v_signal = sa.func.coalesce(exposure_units.c.signal, "unknown")
        vote_q = (
            sa.select(
                votes.c.arm_id,
                v_unit.label("unit"),
                v_signal.label("signal"),
                sa.func.count().label("n"),
                sa.func.coalesce(sa.func.sum(sa.case((votes.c.rating == 1, 1), else_=0)), 0).label("pos"),
                sa.func.count(votes.c.stars).label("star_n"),
                sa.func.coalesce(sa.func.sum(votes.c.stars), 0).label("star_sum"),
                sa.func.coalesce(sa.func.sum(votes.c.stars * votes.c.stars), 0).label("star_sumsq"),
                sa.func.min(votes.c.submitted_at).label("first"),
            )
            .select_from(
                votes.outerjoin(exposures, exposures.c.explanation_id == votes.c.explanation_id).outerjoin(
                    exposure_units, exposure_units.c.explanation_id == votes.c.explanation_id
                )
            )
            .where(
                votes.c.experiment_id == experiment_id, sa.func.coalesce(exposures.c.fallback_used, False).is_(False)
            )
            .group_by(votes.c.arm_id, v_unit, v_signal)
        )

        def _secs(at: datetime | None) -> float | None:
            if at is None or started_at is None:
                return None
            return (as_utc(at) - as_utc(started_at)).total_seconds()

        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        for r in self.s.execute(exp_q):
            rows[(r.arm_id, r.unit, r.signal)] = {
                "explanations": int(r.own or 0),
                "fallbacks": int(r.served) - int(r.own or 0),
                "cost_usd": float(r.cost),
                "latency_ms": float(r.latency),
                "first_seen": _secs(r.first),
            }
        for r in self.s.execute(vote_q):
            row = rows.setdefault((r.arm_id, r.unit, r.signal), {"first_seen": _secs(r.first)})
            row |= {
                "votes": int(r.n),
                "positives": int(r.pos),
                "star_n": int(r.star_n),
                "star_sum": float(r.star_sum),
                "star_sumsq": float(r.star_sumsq),
            }
        return [
            domain.SessionRow(arm_id=arm, unit=unit_key, signal=sig, **values)
            for (arm, unit_key, sig), values in rows.items()
            if arm is not None
        ]

    def arm_data(self, experiment_id: str, arm_ids: list[str]) -> list[ArmData]:
        """What each arm collected: exposures with cost and latency, thumbs, stars (sum and sum of squares)."""
        exp_rows = {
            r.arm_id: r
            for r in self.s.execute(
                sa.select(
                    exposures.c.arm_id,
                    sa.func.count().label("n"),
                    sa.func.coalesce(sa.func.sum(exposures.c.cost_usd), 0.0).label("cost"),
                    sa.func.coalesce(sa.func.sum(exposures.c.latency_ms), 0.0).label("latency"),
                )
                .where(exposures.c.experiment_id == experiment_id)
                .group_by(exposures.c.arm_id)
            )
        }
        vote_rows = {
            r.arm_id: r
            for r in self.s.execute(
                sa.select(
                    votes.c.arm_id,
                    sa.func.count().label("n"),
                    sa.func.coalesce(sa.func.sum(sa.case((votes.c.rating == 1, 1), else_=0)), 0).label("pos"),
                    sa.func.count(votes.c.stars).label("star_n"),
                    sa.func.coalesce(sa.func.sum(votes.c.stars), 0).label("star_sum"),
                    sa.func.coalesce(sa.func.sum(votes.c.stars * votes.c.stars), 0).label("star_sumsq"),
                )
                .where(votes.c.experiment_id == experiment_id)
                .group_by(votes.c.arm_id)
            )
        }
        out = []
        for arm_id in arm_ids:
            e, v = exp_rows.get(arm_id), vote_rows.get(arm_id)
            out.append(
                ArmData(
                    arm_id=arm_id,
                    exposures=int(e.n) if e else 0,
                    n=int(v.n) if v else 0,
                    positives=int(v.pos) if v else 0,
                    star_n=int(v.star_n) if v else 0,
                    star_sum=float(v.star_sum) if v else 0.0,
                    star_sumsq=float(v.star_sumsq) if v else 0.0,
                    cost_usd_sum=float(e.cost) if e else 0.0,
                    latency_ms_sum=float(e.latency) if e else 0.0,
                )
            )
        return out

    # -- generations ------------------------------------------------------------------------------------
    def last_generation(self, name: str) -> GenerationRow | None:
        q = sa.select(generations).where(generations.c.prompt_name == name).order_by(generations.c.id.desc()).limit(1)
        row = self.s.execute(q).mappings().first()
        return cast(GenerationRow, dict(row)) if row else None

    def add_generation(self, values: dict[str, Any]) -> int:
        return self._insert(generations.insert().values(**values))

    def finish_generation(self, generation_id: int, accepted: list[str], rejected: list[dict[str, str]]) -> None:
        self.s.execute(
            generations.update().where(generations.c.id == generation_id).values(accepted=accepted, rejected=rejected)
        )

    def generations(self, name: str | None = None, limit: int = 50) -> list[GenerationRow]:
        q = sa.select(generations).order_by(generations.c.id.desc()).limit(limit)
        if name is not None:
            q = q.where(generations.c.prompt_name == name)
        return [cast(GenerationRow, dict(r)) for r in self.s.execute(q).mappings()]


#: The unit of work handlers take: one transaction, `repo` is this service's repository.
SqlUnitOfWork = db.UnitOfWork[OptimizerRepository]


class Store(db.SqlStore[OptimizerRepository]):
    """This service's database: its tables, repository and outbox on the shared store plumbing."""

    def __init__(self, url: str) -> None:
        super().__init__(url, metadata, OptimizerRepository, outbox)
