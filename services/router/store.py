"""The router's own store: explanations it issued and its replica of the routing state (champion, running
experiment, known models), kept up to date by events. No other service opens it."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict, cast

import sqlalchemy as sa

from services.router.domain import Arm, Experiment, Routing, Template
from shared import db
from shared.clock import as_utc
from shared.contracts import Signal
from shared.outbox import outbox_table
from shared.rows import from_row

metadata = sa.MetaData()

explanations = sa.Table(
    "explanations",
    metadata,
    *db.contract_columns("explanation_id", primary_key=True),
    sa.Column("request_key", sa.String(64), nullable=False, index=True),
    *db.contract_columns("session_key", index=True),
    sa.Column("ticker", sa.String(12), nullable=False),
    *db.contract_columns("signal"),
    sa.Column("context", sa.JSON, nullable=False),
    *db.contract_columns("prompt_name", "prompt_version", "prompt_text"),
    sa.Column("requested_model", sa.String(200), nullable=False),
    *db.contract_columns("model"),
    sa.Column("provider", sa.String(32), nullable=False),
    *db.contract_columns(
        "experiment_id", "arm_id", "text", "tokens_in", "tokens_out", "cost_usd", "latency_ms", "fallback_used"
    ),
    *db.contract_columns("created_at", index=True),
)

#: One row (id=1): the prompt template and model that serve traffic outside experiments.
champion = sa.Table(
    "champion",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    *db.contract_columns("prompt_name", "prompt_version", "template", "model"),
    sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.String(500), nullable=False, default=""),
)

experiments = sa.Table(
    "experiments",
    metadata,
    *db.contract_columns("experiment_id", primary_key=True),
    *db.contract_columns("prompt_name", "allocation"),
    sa.Column("status", sa.String(16), nullable=False),  # running | concluded
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("weights_at", sa.DateTime(timezone=True)),
    sa.Column("concluded_at", sa.DateTime(timezone=True)),
    sa.Column("decision", sa.String(64)),
    *db.contract_columns("winner_arm_id"),
)

arms = sa.Table(
    "arms",
    metadata,
    *db.contract_columns("experiment_id", "arm_id", primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    *db.contract_columns("prompt_name", "prompt_version", "template", "model", "weight", "is_control"),
)

models = sa.Table(
    "models",
    metadata,
    *db.contract_columns("model", primary_key=True),
    *db.contract_columns("model_id", "base_model", "serving_base_url", "cost_per_1k_tokens_usd"),
    sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
)

#: One row (id=1): a counter that every change of the routing state (champion, experiments, arms, models) raises
#: in the change's own transaction. The request path keeps the routing state in memory and reloads it only when
#: this number moved (`RoutingCache`): one small read instead of the whole state on every request.
routing_version = sa.Table(
    "routing_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
)

processed = db.processed_table(metadata)


# -- the rows the repository hands to the handlers (one key per column) -----------------------------------


class ExplanationRow(TypedDict):
    explanation_id: str
    request_key: str
    session_key: str  # ERASED_SESSION once its session was erased
    ticker: str
    signal: Signal
    context: dict[str, Any]
    prompt_name: str
    prompt_version: str
    prompt_text: str
    requested_model: str  # the model the variant assigned; `model` answered (a fallback when they differ)
    model: str
    provider: str
    experiment_id: str | None
    arm_id: str | None
    text: str
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: float
    fallback_used: bool
    created_at: datetime


class ChampionRow(TypedDict):
    prompt_name: str
    prompt_version: str
    template: str
    model: str
    changed_at: datetime
    reason: str


class ExperimentRow(TypedDict):
    experiment_id: str
    prompt_name: str
    allocation: str
    status: str
    started_at: datetime | None
    weights_at: datetime | None
    concluded_at: datetime | None
    decision: str | None
    winner_arm_id: str | None


class ArmRow(TypedDict):
    experiment_id: str
    arm_id: str
    position: int
    prompt_name: str
    prompt_version: str
    template: str
    model: str
    weight: float
    is_control: bool


class ModelRow(TypedDict):
    model: str
    model_id: str
    base_model: str
    serving_base_url: str | None
    cost_per_1k_tokens_usd: float
    registered_at: datetime


#: `explanations.session_key` of an explanation whose session was erased (its context and texts are blanked).
ERASED_SESSION = ""

outbox = outbox_table(metadata)


def _as_utc_or_none(ts: datetime | None) -> datetime | None:
    return None if ts is None else as_utc(ts)


class RouterRepository(db.MessageLog):
    processed = processed  # the table MessageLog.seen / mark_seen use
    outbox = outbox  # the table forget_session_messages rewrites

    # -- explanations -----------------------------------------------------------------------------------
    def add_explanation(self, row: ExplanationRow) -> None:
        self.s.execute(explanations.insert(), dict(row))  # one statement, compiled once; the row as parameters

    def cost_since(self, since: datetime) -> float:
        """USD spent on explanations created at or after `since` (the budget's fallback when Redis is away)."""
        total = self.s.execute(
            sa.select(sa.func.coalesce(sa.func.sum(explanations.c.cost_usd), 0.0)).where(
                explanations.c.created_at >= since
            )
        ).scalar_one()
        return float(total)

    def explanation(self, explanation_id: uuid.UUID) -> ExplanationRow | None:
        row = db.row_of(self.s, explanations, "explanation_id", str(explanation_id))
        if row is None:
            return None
        return cast(ExplanationRow, row | {"created_at": as_utc(row["created_at"])})

    def explanations(self, explanation_ids: list[uuid.UUID]) -> list[ExplanationRow]:
        ids = [str(e) for e in explanation_ids]
        rows = self.s.execute(sa.select(explanations).where(explanations.c.explanation_id.in_(ids))).mappings().all()
        return [cast(ExplanationRow, dict(r) | {"created_at": as_utc(r["created_at"])}) for r in rows]

    def erase_session(self, session_key: str, explanation_ids: list[str]) -> int:
        """Keep what the cost and quality figures need of the session's explanations (ids, variant, model,
        tokens, cost, latency, time) and drop what was the session's: its key, the context it sent, the prompt
        rendered from it and the text written for it. Its events in the outbox are rewritten the same way.
        Returns how many explanations were erased."""
        condition = explanations.c.session_key == session_key
        if explanation_ids:
            condition = condition | explanations.c.explanation_id.in_(explanation_ids)
        erased = db.rowcount(
            self.s.execute(
                explanations.update()
                .where(condition, explanations.c.session_key != ERASED_SESSION)
                .values(session_key=ERASED_SESSION, context={}, prompt_text="", text="")
            )
        )
        self.forget_session_messages(session_key)
        return erased

    # -- champion ---------------------------------------------------------------------------------------
    def champion(self) -> ChampionRow | None:
        columns = [c for c in champion.c if c.name != "id"]
        row = self.s.execute(sa.select(*columns).where(champion.c.id == 1)).mappings().first()
        if row is None:
            return None
        out = cast(ChampionRow, dict(row))
        out["changed_at"] = as_utc(out["changed_at"])
        return out

    def set_champion(self, values: ChampionRow) -> None:
        self.routing_changed()
        db.upsert(self.s, champion, "id", {"id": 1, **values})

    # -- experiments ------------------------------------------------------------------------------------
    def experiment(self, experiment_id: str) -> ExperimentRow | None:
        row = db.row_of(self.s, experiments, "experiment_id", experiment_id)
        if row is None:
            return None
        return cast(
            ExperimentRow, row | {k: _as_utc_or_none(row[k]) for k in ("started_at", "weights_at", "concluded_at")}
        )

    def add_experiment(self, values: dict[str, Any], arm_rows: list[dict[str, Any]]) -> None:
        self.routing_changed()
        self.s.execute(experiments.insert().values(**values))
        for position, arm in enumerate(arm_rows):
            self.s.execute(arms.insert().values(experiment_id=values["experiment_id"], position=position, **arm))

    def update_experiment(self, experiment_id: str, **values: Any) -> None:
        self.routing_changed()
        self.s.execute(experiments.update().where(experiments.c.experiment_id == experiment_id).values(**values))

    def set_weight(self, experiment_id: str, arm_id: str, weight: float) -> bool:
        self.routing_changed()
        result = self.s.execute(
            arms.update().where(arms.c.experiment_id == experiment_id, arms.c.arm_id == arm_id).values(weight=weight)
        )
        return bool(db.rowcount(result))

    def arms_of(self, experiment_id: str) -> list[ArmRow]:
        rows = self.s.execute(
            sa.select(arms).where(arms.c.experiment_id == experiment_id).order_by(arms.c.position)
        ).mappings()
        return [cast(ArmRow, dict(r)) for r in rows]

    def running_experiment_id(self) -> str | None:
        row = self.s.execute(
            sa.select(experiments.c.experiment_id)
            .where(experiments.c.status == "running")
            .order_by(experiments.c.started_at.desc())
            .limit(1)
        ).first()
        return row.experiment_id if row else None

    # -- models -----------------------------------------------------------------------------------------
    def upsert_model(self, values: ModelRow) -> None:
        self.routing_changed()
        db.upsert(self.s, models, "model", values)

    def delete_model(self, model: str) -> None:
        self.routing_changed()
        self.s.execute(models.delete().where(models.c.model == model))

    def models(self) -> list[ModelRow]:
        return [
            cast(ModelRow, dict(r))
            for r in self.s.execute(sa.select(models).order_by(models.c.registered_at)).mappings()
        ]

    # -- the whole routing state ------------------------------------------------------------------------
    def routing_changed(self) -> None:
        """Raise the routing version, in this transaction: every process that caches the state reloads it."""
        bumped = self.s.execute(
            routing_version.update().where(routing_version.c.id == 1).values(version=routing_version.c.version + 1)
        )
        if not db.rowcount(bumped):
            self.s.execute(routing_version.insert().values(id=1, version=1))

    def routing_version(self) -> int:
        return int(self.s.execute(sa.select(routing_version.c.version).where(routing_version.c.id == 1)).scalar() or 0)

    def snapshot(self) -> RoutingSnapshot:
        return RoutingSnapshot(self.routing(), {m["model"]: m for m in self.models()})

    def routing(self) -> Routing | None:
        champ = self.champion()
        if champ is None:
            return None
        experiment = None
        exp_id = self.running_experiment_id()
        if exp_id is not None:
            rows = self.arms_of(exp_id)
            if rows:
                experiment = Experiment(
                    experiment_id=exp_id,
                    arms=tuple(
                        from_row(Arm, r, prompt=Template(r["prompt_name"], r["prompt_version"], r["template"]))
                        for r in rows
                    ),
                )
        return Routing(
            champion_prompt=Template(champ["prompt_name"], champ["prompt_version"], champ["template"]),
            champion_model=champ["model"],
            experiment=experiment,
        )


@dataclass(frozen=True)
class RoutingSnapshot:
    """What serving an explanation reads: the routing state (None before the store is seeded) and the
    registered models by name (their prices and serving addresses)."""

    routing: Routing | None
    models: dict[str, ModelRow]


#: The unit of work handlers take: one transaction, `repo` is this service's repository.
SqlUnitOfWork = db.UnitOfWork[RouterRepository]


class Store(db.SqlStore[RouterRepository]):
    """This service's database: its tables, repository and outbox on the shared store plumbing."""

    def __init__(self, url: str) -> None:
        super().__init__(url, metadata, RouterRepository, outbox)


class RoutingCache:
    """The routing state for the request path, held in memory. Each `current()` reads only the routing version
    (one indexed row, in a read transaction that takes no lock); the whole state is read again only when the
    version moved, that is when an event handler (in any process: the worker applies them) changed the champion,
    an experiment, its weights or the models. A request therefore never serves a state older than the last one
    committed before it began: the same promise as reading the state on every request."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._cached: tuple[int, RoutingSnapshot] | None = None

    def version(self) -> int:
        # On every request: a pooled DB-API connection and one statement (`fetch_one_raw`).
        row = db.fetch_one_raw(self.store.engine, "SELECT version FROM routing_version WHERE id = 1")
        return int(row[0]) if row else 0

    def current(self) -> RoutingSnapshot:
        cached = self._cached
        if cached is not None and cached[0] == self.version():
            return cached[1]
        with self._lock:  # one reload at a time; the others then find it done
            cached = self._cached
            if cached is not None and cached[0] == self.version():
                return cached[1]
            reader = self.store.reader()
            with reader:  # the version and the state from the same read transaction: never a mismatched pair
                loaded = (reader.repo.routing_version(), reader.repo.snapshot())
            self._cached = loaded
            return loaded[1]
