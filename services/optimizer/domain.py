"""Optimizer rules, free of any framework: prompt versions and lineage, experiment validation, variant
guardrails, and how a decision becomes an action.

- A prompt version is immutable once added: a name plus `vMAJOR.MINOR`; variants get the next minor number
  of their parent's major line, and remember the parent and why they were made (lineage).
- An experiment has two or more arms (prompt version x model), exactly one control, no duplicate arm,
  weights in (0, 1] that sum to 1 (fixed allocation; adaptive may leave them out: equal to start with), and
  at most one experiment runs per prompt name at a time.
- A variant is accepted only if it keeps the template contract (shared.prompts.check_template), fits the
  length limits, and is not a near-duplicate of any version the prompt already has.
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, TypeVar

from services.optimizer.stats.decision import DecisionConfig
from services.optimizer.stats.results import METRIC_POSITIVE_RATE, METRICS, ArmData
from shared.contracts import model_name_problem
from shared.prompts import TemplateError, check_template

# Experiment states. running: traffic is split; awaiting_approval: a winner waits for POST promote (traffic
# still split); paused: unhealthy (sample-ratio mismatch), traffic back to the champion; queued: waits for
# the running experiment of its prompt to end; concluded: decided; stopped: ended by an operator.
RUNNING = "running"
AWAITING_APPROVAL = "awaiting_approval"
PAUSED = "paused"
QUEUED = "queued"
CONCLUDED = "concluded"
STOPPED = "stopped"
ACTIVE_STATES = frozenset({RUNNING, AWAITING_APPROVAL})
ALL_STATES = (RUNNING, AWAITING_APPROVAL, PAUSED, QUEUED, CONCLUDED, STOPPED)

# Prompt version states.
VERSION_ACTIVE = "active"  # the champion, or in an experiment
VERSION_CANDIDATE = "candidate"  # generated or hand-written, not tested yet
VERSION_ARCHIVED = "archived"  # lost an experiment or was replaced; still restorable by rollback

ALLOCATIONS = ("fixed", "adaptive")
WEIGHT_TOLERANCE = 1e-6
MAX_DURATION_S = 366 * 86400.0  # a year: longer is a typo, and the projected-days arithmetic stays finite
MAX_FEEDBACK_PER_ARM = 1_000_000_000  # far above any real sample cap; keeps counts inside a 64-bit column
_VERSION = re.compile(r"^v(\d+)\.(\d+)$")


class OptimizerError(Exception):
    """Base of the errors a use case reports to its caller (the API turns each into a 4xx)."""

    status = 400


class InvalidRequest(OptimizerError):
    status = 422


class NotFound(OptimizerError):
    status = 404


RowT = TypeVar("RowT")


def known(row: RowT | None, what: str) -> RowT:
    """The row a lookup found, or NotFound naming `what` is unknown (a lookup by id or name finds nothing)."""
    if row is None:
        raise NotFound(f"unknown {what}")
    return row


class Conflict(OptimizerError):
    status = 409


class RateLimited(OptimizerError):
    status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --------------------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------------------


def parse_version(version: str) -> tuple[int, int] | None:
    m = _VERSION.match(version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def next_version(existing: Iterable[str], parent: str | None) -> str:
    """The next free minor version on the parent's major line (v1.0 -> v1.1, v1.2, ...)."""
    parsed = [p for p in (parse_version(v) for v in existing) if p is not None]
    base = parse_version(parent) if parent else None
    major = base[0] if base else max((p[0] for p in parsed), default=1)
    minor = max((p[1] for p in parsed if p[0] == major), default=-1)
    return f"v{major}.{minor + 1}"


def similarity(a: str, b: str) -> float:
    """difflib's ratio 2M/T of two templates (1.0 = identical)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def variant_problem(
    template: str,
    existing: Sequence[str],
    *,
    min_chars: int,
    max_chars: int,
    duplicate_ratio: float,
) -> str | None:
    """Why this variant must be rejected, or None when it passes every guardrail."""
    try:
        check_template(template)
    except TemplateError as exc:
        return str(exc)
    if len(template) > max_chars:
        return f"variant is {len(template)} characters, over the limit of {max_chars}"
    if len(template.strip()) < min_chars:
        return f"variant is {len(template.strip())} characters, under the minimum of {min_chars}"
    for other in existing:
        ratio = similarity(template, other)
        if ratio > duplicate_ratio:
            return f"near-duplicate of an existing version (similarity {ratio:.2f} > {duplicate_ratio:g})"
    return None


# --------------------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmIn:
    prompt_version: str
    model: str
    weight: float | None = None
    is_control: bool = False


@dataclass(frozen=True)
class ExperimentSpec:
    prompt_name: str
    arms: tuple[ArmIn, ...]
    allocation: str = "fixed"
    metric: str = METRIC_POSITIVE_RATE
    alpha: float = 0.05
    min_duration_s: float = 7 * 86400.0
    min_feedback_per_arm: int = 100
    max_feedback_per_arm: int = 20000
    target_lift: float = 0.10
    futility_alpha: float | None = None  # None: futility on the decision's own interval
    feedback_rate_grace_s: float = 0.0  # the feedback rate counts sessions first served at least this long ago
    min_lift_to_ship: float = 0.0
    max_cost_ratio: float | None = 1.5
    max_latency_ratio: float | None = 2.0
    min_feedback_rate_ratio: float | None = 0.8
    source: str = "manual"  # manual | auto | finetune
    note: str = ""


@dataclass(frozen=True)
class PlannedArm:
    arm_id: str
    prompt_version: str
    model: str
    weight: float
    is_control: bool


def new_experiment_id() -> str:
    return "exp-" + uuid.uuid4().hex[:12]


def arm_ids(count: int) -> list[str]:
    """The control is "control"; treatments are t1, t2, ... in the order given."""
    return ["control"] + [f"t{i}" for i in range(1, count)]


def plan_arms(spec: ExperimentSpec, versions: Mapping[str, str]) -> list[PlannedArm]:
    """Validate an experiment against the prompt's versions (version -> status); return its arms with ids
    and weights, the control first. Raises InvalidRequest with a message a person can act on."""
    if spec.allocation not in ALLOCATIONS:
        raise InvalidRequest(f"allocation must be one of {', '.join(ALLOCATIONS)}")
    if spec.metric not in METRICS:
        raise InvalidRequest(f"metric must be one of {', '.join(METRICS)}")
    if not 0 < spec.alpha <= 0.5:
        raise InvalidRequest("alpha must be in (0, 0.5]")
    if not (math.isfinite(spec.min_duration_s) and 0 <= spec.min_duration_s <= MAX_DURATION_S):
        raise InvalidRequest(f"min_duration_s must be between 0 and {MAX_DURATION_S:.0f} (a year)")
    if spec.min_feedback_per_arm < 1:
        raise InvalidRequest("min_feedback_per_arm must be at least 1")
    if spec.max_feedback_per_arm > MAX_FEEDBACK_PER_ARM:
        raise InvalidRequest(f"max_feedback_per_arm must be at most {MAX_FEEDBACK_PER_ARM}")
    if spec.max_feedback_per_arm < spec.min_feedback_per_arm:
        raise InvalidRequest("max_feedback_per_arm must be at least min_feedback_per_arm")
    if not (math.isfinite(spec.min_lift_to_ship) and math.isfinite(spec.target_lift)) or (
        spec.min_lift_to_ship < 0 or spec.target_lift <= 0
    ):
        raise InvalidRequest("target_lift must be positive and min_lift_to_ship zero or more")
    if not (math.isfinite(spec.feedback_rate_grace_s) and 0 <= spec.feedback_rate_grace_s <= MAX_DURATION_S):
        raise InvalidRequest(f"feedback_rate_grace_s must be between 0 and {MAX_DURATION_S:.0f} (a year)")
    if spec.futility_alpha is not None and not 0 < spec.futility_alpha < 1:
        raise InvalidRequest("futility_alpha must be in (0, 1), or null to judge futility on the decision's interval")
    for name in ("max_cost_ratio", "max_latency_ratio", "min_feedback_rate_ratio"):
        ratio = getattr(spec, name)
        if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
            raise InvalidRequest(f"{name} must be a finite number above 0, or null to disable that guardrail")
    arms = list(spec.arms)
    if len(arms) < 2:
        raise InvalidRequest("an experiment needs at least two arms: a control and a treatment")
    controls = [a for a in arms if a.is_control]
    if len(controls) != 1:
        raise InvalidRequest(f"exactly one arm must be the control (is_control: true); got {len(controls)}")
    seen: set[tuple[str, str]] = set()
    for a in arms:
        if not a.model.strip():
            raise InvalidRequest("every arm needs a model")
        problem = model_name_problem(a.model)
        if problem:
            raise InvalidRequest(problem)
        key = (a.prompt_version, a.model)
        if key in seen:
            raise InvalidRequest(f"duplicate arm: {a.prompt_version} x {a.model} appears twice")
        seen.add(key)
        status = versions.get(a.prompt_version)
        if status is None:
            raise InvalidRequest(f"unknown prompt version {a.prompt_version} of prompt {spec.prompt_name!r}")
        if status == VERSION_ARCHIVED:
            raise InvalidRequest(f"prompt version {a.prompt_version} is archived; add it again as a new version")
    weights = [a.weight for a in arms]
    if all(w is None for w in weights):  # equal split to start with, for either allocation
        final = [1.0 / len(arms)] * len(arms)
    elif any(w is None for w in weights):
        raise InvalidRequest("give a weight for every arm, or for none (equal split)")
    else:
        ws = [float(w) for w in weights if w is not None]  # none is None here
        if any(not math.isfinite(w) or w <= 0 or w > 1 for w in ws):
            raise InvalidRequest("every weight must be in (0, 1]")
        if abs(sum(ws) - 1.0) > WEIGHT_TOLERANCE:
            raise InvalidRequest(f"weights must sum to 1 (they sum to {sum(ws):g})")
        final = ws
    ordered = sorted(zip(arms, final, strict=True), key=lambda p: not p[0].is_control)
    ids = arm_ids(len(ordered))
    return [
        PlannedArm(arm_id=i, prompt_version=a.prompt_version, model=a.model, weight=w, is_control=a.is_control)
        for i, (a, w) in zip(ids, ordered, strict=True)
    ]


class StoredDecisionRule(TypedDict):
    """The decision rule as an experiment's row stores it (the store's `ExperimentRow` has these columns)."""

    alpha: float
    metric: str
    min_duration_s: float
    min_feedback_per_arm: int
    max_feedback_per_arm: int
    target_lift: float
    futility_alpha: float | None  # None (experiments created before it existed): the decision's interval
    feedback_rate_grace_s: float | None  # None (likewise): the feedback rate counts every session
    min_lift_to_ship: float
    max_cost_ratio: float | None
    max_latency_ratio: float | None
    min_feedback_rate_ratio: float | None


def decision_config(row: StoredDecisionRule) -> DecisionConfig:
    """The stats engine's decision rule from an experiment's stored configuration."""
    return DecisionConfig(
        alpha=float(row["alpha"]),
        metric=str(row["metric"]),
        min_duration_s=float(row["min_duration_s"]),
        min_feedback_per_arm=int(row["min_feedback_per_arm"]),
        max_feedback_per_arm=int(row["max_feedback_per_arm"]),
        target_lift=float(row["target_lift"]),
        futility_alpha=_opt_float(row["futility_alpha"]),
        min_lift_to_ship=float(row["min_lift_to_ship"]),
        max_cost_ratio=_opt_float(row["max_cost_ratio"]),
        max_latency_ratio=_opt_float(row["max_latency_ratio"]),
        min_feedback_rate_ratio=_opt_float(row["min_feedback_rate_ratio"]),
    )


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclass
class AllocationHistory:
    """The weights in force over an experiment's life, each with the session count when it took effect (the
    exposure count in histories written before sessions were the unit); the sample-ratio check compares the
    sessions each arm was assigned with the session-weighted average of the weights, i.e. every session is
    tested against the weights of its moment (their sum of multinomials is less dispersed than that average
    multinomial, so the test stays conservative)."""

    periods: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def average(self, total: int) -> dict[str, float]:
        if not self.periods:
            return {}
        if total <= 0 or len(self.periods) == 1:
            return dict(self.periods[-1][1])
        acc: dict[str, float] = {}
        for k, (start, weights) in enumerate(self.periods):
            end = self.periods[k + 1][0] if k + 1 < len(self.periods) else total
            span = max(0, min(end, total) - min(start, total))
            for arm, w in weights.items():
                acc[arm] = acc.get(arm, 0.0) + w * span
        mass = sum(acc.values())
        return {a: w / mass for a, w in acc.items()} if mass > 0 else dict(self.periods[-1][1])


def weights_changed(old: Mapping[str, float], new: Mapping[str, float], tolerance: float = 0.005) -> bool:
    return any(abs(float(old.get(k, 0.0)) - v) > tolerance for k, v in new.items())


# --------------------------------------------------------------------------------------------------------
# Per-session aggregates: the unit of analysis
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRow:
    """What one session did on one arm within one signal: explanations its arm's own model wrote, those a
    fallback wrote, their cost and latency, when it was first served, and the votes on its own-model
    explanations (votes on fallback-served ones are not counted)."""

    arm_id: str
    unit: str  # the session's key (an explanation's own id when the event carried none)
    signal: str
    explanations: int = 0
    fallbacks: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    first_seen: float | None = None  # seconds since the experiment started
    votes: int = 0
    positives: int = 0
    star_n: int = 0
    star_sum: float = 0.0
    star_sumsq: float = 0.0


@dataclass(frozen=True)
class ArmSnapshot:
    """An experiment's data for the analysis: every arm's totals, the same over the sessions first served in
    the recent half (the novelty check), and per signal (segments)."""

    total: list[ArmData]
    recent: list[ArmData]
    segments: dict[str, list[ArmData]]


class _Acc:
    """Sums over sessions of per-session totals and of their squares and cross products, each under the name of
    the `ArmData` field it becomes."""

    #: The sums that are counts (the others are kept as floats).
    COUNTS = frozenset({"exposures", "fallbacks", "sessions", "n", "positives", "star_n"})

    def __init__(self) -> None:
        self.v = dict.fromkeys(
            (
                "exposures",
                "fallbacks",
                "cost_usd_sum",
                "latency_ms_sum",
                "sessions",
                "n",
                "positives",
                "star_n",
                "star_sum",
                "star_sumsq",
                "n_sq",
                "pos_sq",
                "pos_cross",
                "star_n_sq",
                "star_sum_sq",
                "star_cross",
            ),
            0.0,
        )

    def add(self, s: SessionRow) -> None:
        v = self.v
        v["exposures"] += s.explanations
        v["fallbacks"] += s.fallbacks
        v["cost_usd_sum"] += s.cost_usd
        v["latency_ms_sum"] += s.latency_ms
        v["sessions"] += 1
        v["n"] += s.votes
        v["positives"] += s.positives
        v["star_n"] += s.star_n
        v["star_sum"] += s.star_sum
        v["star_sumsq"] += s.star_sumsq
        v["n_sq"] += s.votes * s.votes
        v["pos_sq"] += s.positives * s.positives
        v["pos_cross"] += s.positives * s.votes
        v["star_n_sq"] += s.star_n * s.star_n
        v["star_sum_sq"] += s.star_sum * s.star_sum
        v["star_cross"] += s.star_n * s.star_sum

    def arm(self, arm_id: str) -> ArmData:
        sums: dict[str, Any] = {k: int(x) if k in self.COUNTS else x for k, x in self.v.items()}
        return ArmData(arm_id=arm_id, **sums)


def _merge(rows: Iterable[SessionRow]) -> SessionRow:
    rows = list(rows)
    seen = [r.first_seen for r in rows if r.first_seen is not None]
    return SessionRow(
        arm_id=rows[0].arm_id,
        unit=rows[0].unit,
        signal="*",
        explanations=sum(r.explanations for r in rows),
        fallbacks=sum(r.fallbacks for r in rows),
        cost_usd=sum(r.cost_usd for r in rows),
        latency_ms=sum(r.latency_ms for r in rows),
        first_seen=min(seen) if seen else None,
        votes=sum(r.votes for r in rows),
        positives=sum(r.positives for r in rows),
        star_n=sum(r.star_n for r in rows),
        star_sum=sum(r.star_sum for r in rows),
        star_sumsq=sum(r.star_sumsq for r in rows),
    )


def arm_snapshot(
    rows: Iterable[SessionRow], arm_ids: Sequence[str], recent_since: float | None, settled_until: float | None = None
) -> ArmSnapshot:
    """Fold per-(arm, session, signal) rows into the analysis's inputs. A session is one unit on its arm
    whatever signals it asked about; within a segment, its explanations of that signal are the unit.
    `recent_since` (seconds since the start): sessions first served at or after it form the recent part.
    `settled_until` (seconds since the start): the feedback rate counts only the sessions first served at or
    before it (`ArmData.feedback_exposures`, `feedback_n`); None: every session."""
    by_session: dict[tuple[str, str], list[SessionRow]] = {}
    segments: dict[str, dict[str, _Acc]] = {}
    for r in rows:
        by_session.setdefault((r.arm_id, r.unit), []).append(r)
        segments.setdefault(r.signal, {}).setdefault(r.arm_id, _Acc()).add(r)
    total = {a: _Acc() for a in arm_ids}
    recent = {a: _Acc() for a in arm_ids}
    settled = dict.fromkeys(arm_ids, (0, 0))  # (exposures, votes) of the sessions the feedback rate counts
    for (arm_id, _), parts in by_session.items():
        if arm_id not in total:
            continue
        s = _merge(parts)
        total[arm_id].add(s)
        if recent_since is not None and s.first_seen is not None and s.first_seen >= recent_since:
            recent[arm_id].add(s)
        if settled_until is not None and s.first_seen is not None and s.first_seen <= settled_until:
            exposures, votes = settled[arm_id]
            settled[arm_id] = (exposures + s.explanations, votes + s.votes)

    def with_feedback_counts(data: ArmData) -> ArmData:
        if settled_until is None:
            return data
        exposures, votes = settled[data.arm_id]
        return replace(data, feedback_exposures=exposures, feedback_n=votes)

    return ArmSnapshot(
        total=[with_feedback_counts(total[a].arm(a)) for a in arm_ids],
        recent=[recent[a].arm(a) for a in arm_ids],
        segments={sig: [accs.get(a, _Acc()).arm(a) for a in arm_ids] for sig, accs in sorted(segments.items())},
    )
