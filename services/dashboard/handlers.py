"""Dashboard use cases: events update the read model (each idempotent on the event id, in one unit of work),
and the reads compose the figures from the read model through the pure functions in `domain`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from services.dashboard import domain, forecast
from services.dashboard.store import (
    BY_ARM,
    BY_TICKER,
    BY_TIME,
    EXPLANATION_FIELDS,
    DashboardRepository,
    ExplanationExportRow,
    SqlUnitOfWork,
)
from shared import votes
from shared.clock import as_utc
from shared.contracts import (
    ChampionChanged,
    Event,
    ExperimentConcluded,
    ExperimentStarted,
    ExplanationCreated,
    FeedbackErased,
    FeedbackRecorded,
    FineTuneProgress,
    ModelRegistered,
    SearchExhausted,
    derived_id,
    utcnow,
)
from shared.db import first_of_each, handle_many_once, handle_once

log = logging.getLogger(__name__)


def _once(event: Event, uow: SqlUnitOfWork, apply: Callable[[SqlUnitOfWork], Any]) -> Any:
    """Apply an event exactly once (`shared.db.handle_once`), moving the read model's revision on."""

    def apply_and_bump(uow: SqlUnitOfWork) -> Any:
        result = apply(uow)
        uow.repo.bump_revision()
        return result

    return handle_once(uow, event.message_id, apply_and_bump)


def _store_once(event: Event, uow: SqlUnitOfWork, write: Callable[[DashboardRepository], object]) -> str:
    """Apply an event that only writes its row to the read model (`write(repo)`), once (`_once`): 'stored'."""

    def apply(uow: SqlUnitOfWork) -> str:
        write(uow.repo)
        return "stored"

    return _once(event, uow, apply)


# ---------------------------------------------------------------------------------------------------------
# Events -> read model
# ---------------------------------------------------------------------------------------------------------


def on_explanation_created(event: ExplanationCreated, uow: SqlUnitOfWork) -> str:
    """Add the explanation to the read model, with the votes that arrived before it. Returns stored, known (an
    explanation the read model has, under another message id) or duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        return "stored" if uow.repo.add_explanation(_explanation_row(event)) else "known"

    return _once(event, uow, apply)


def on_explanation_created_batch(events: list[ExplanationCreated], uow: SqlUnitOfWork) -> list[str]:
    """`on_explanation_created` for a batch, set-based (the same outcomes, rows, vote totals and revision as one
    by one): one query each for the handled ids and the explanations the read model has, one insert of many
    rows, their vote totals recounted in one grouped query and one update; the revision moved on once."""

    def apply(uow: SqlUnitOfWork, fresh: list[ExplanationCreated]) -> list[str]:
        known = uow.repo.explanations_known(str(e.explanation_id) for e in fresh)
        flags, new = first_of_each(fresh, lambda e: str(e.explanation_id), known)
        uow.repo.add_explanations([_explanation_row(e) for e in new])
        uow.repo.bump_revision(len(fresh))
        return ["stored" if is_new else "known" for is_new in flags]

    return handle_many_once(uow, events, apply)


def _explanation_row(event: ExplanationCreated) -> dict[str, Any]:
    return event.row(*EXPLANATION_FIELDS) | {
        "day": domain.day_of(event.created_at),
        "created_at": as_utc(event.created_at),
    }


#: What the read model keeps of a vote besides `shared.votes.VOTE_FIELDS`.
VOTE_COLUMNS = ("has_comment", "prompt_name", "prompt_version", "model", "signal", "ticker")


def on_feedback_recorded(event: FeedbackRecorded, uow: SqlUnitOfWork) -> str:
    """Upsert the vote by feedback_id: the newer `submitted_at` wins, so a replaced vote counts once.
    Returns stored, replaced, stale, erased or duplicate."""

    def apply(uow: SqlUnitOfWork) -> str:
        repo = uow.repo
        if votes.erased_before(repo.erased_at(event.feedback_id), event.submitted_at):
            return "erased"
        row = votes.vote_row(event, *VOTE_COLUMNS)
        return votes.keep_newest(repo, row)

    return _once(event, uow, apply)


def on_feedback_recorded_batch(events: list[FeedbackRecorded], uow: SqlUnitOfWork) -> list[str]:
    """`on_feedback_recorded` for a batch, set-based (the same outcomes, votes, vote totals and revision as one
    by one): one query each for the handled ids, the erased votes and the stored votes; one write of many rows
    each for the votes and the totals of the explanations they are on; the revision moved on once."""

    def apply(uow: SqlUnitOfWork, fresh: list[FeedbackRecorded]) -> list[str]:
        outcomes, newest = votes.keep_newest_of_batch(uow.repo, fresh, *VOTE_COLUMNS)
        uow.repo.write_votes(newest)
        uow.repo.bump_revision(len(fresh))
        return outcomes

    return handle_many_once(uow, events, apply)


def on_feedback_erased(event: FeedbackErased, uow: SqlUnitOfWork) -> int | str:
    """Remove the erased votes (and the session's messages kept here); returns how many votes were removed."""

    def apply(u: SqlUnitOfWork) -> int:
        u.repo.forget_session_messages(event.session_key)
        return u.repo.erase_votes([str(f) for f in event.feedback_ids], event.erased_at)

    return _once(event, uow, apply)


def on_champion_changed(event: ChampionChanged, uow: SqlUnitOfWork) -> str:
    row = {
        "message_id": str(event.message_id),
        "prompt_name": event.prompt.name,
        "version": event.prompt.version,
        "model": event.model,
        "previous_version": event.previous_version,
        "reason": event.reason,
        "changed_at": as_utc(event.occurred_at),
    }
    return _store_once(event, uow, lambda repo: repo.add_champion_change(row))


def on_experiment_started(event: ExperimentStarted, uow: SqlUnitOfWork) -> str:
    def apply(uow: SqlUnitOfWork) -> str:
        existing = uow.repo.experiment(event.experiment_id)
        values: dict[str, Any] = {
            "prompt_name": event.prompt_name,
            "allocation": event.allocation,
            "arms": [
                {
                    "arm_id": a.arm_id,
                    "prompt_version": a.prompt.version,
                    "model": a.model,
                    "weight": a.weight,
                    "is_control": a.is_control,
                }
                for a in event.arms
            ],
            "started_at": as_utc(event.occurred_at),
        }
        if existing is None or existing["status"] != "concluded":  # the conclusion may have arrived first
            values["status"] = "running"
        uow.repo.upsert_experiment(event.experiment_id, values)
        return "stored"

    return _once(event, uow, apply)


def on_experiment_concluded(event: ExperimentConcluded, uow: SqlUnitOfWork) -> str:
    values = {
        "status": "concluded",
        "decision": event.decision,
        "winner_arm_id": event.winner_arm_id,
        "reason": event.reason,
        "concluded_at": as_utc(event.occurred_at),
    }
    return _store_once(event, uow, lambda repo: repo.upsert_experiment(event.experiment_id, values))


def on_model_registered(event: ModelRegistered, uow: SqlUnitOfWork) -> str:
    row = {
        "model_id": event.model_id,
        "model": event.model,
        "base_model": event.base_model,
        "serving_base_url": event.serving_base_url,
        "metrics": dict(event.metrics),
        "cost_per_1k_tokens_usd": event.cost_per_1k_tokens_usd,
        "registered_at": as_utc(event.occurred_at),
    }
    return _store_once(event, uow, lambda repo: repo.add_model(row))


def on_finetune_progress(event: FineTuneProgress, uow: SqlUnitOfWork) -> str:
    def apply(uow: SqlUnitOfWork) -> str:
        newer = uow.repo.upsert_finetune_job(
            {
                "job_id": event.job_id,
                "state": event.state,
                "progress": event.progress,
                "detail": event.detail,
                "updated_at": as_utc(event.occurred_at),
            }
        )
        return "stored" if newer else "stale"

    return _once(event, uow, apply)


def on_search_exhausted(event: SearchExhausted, uow: SqlUnitOfWork) -> str:
    """The optimizer's variant search has nothing left to try: an alert, so an operator knows the loop
    stopped generating (and why) instead of finding out from a flat learning curve."""

    def apply(uow: SqlUnitOfWork) -> str:
        added = uow.repo.add_alert(
            {
                "alert_id": str(derived_id("dashboard.alert", event.message_id)),
                "created_at": as_utc(event.occurred_at),
                "scope": f"prompt {event.prompt_name}",
                "kind": "search_exhausted",
                "message": (
                    f"variant search for {event.prompt_name} exhausted at champion {event.champion_version} "
                    f"({event.versions_tried} versions tried); generation stopped: {event.reason}"
                ),
                "recent_votes": 0,
                "baseline_votes": 0,
            }
        )
        return "stored" if added else "known"

    return _once(event, uow, apply)


# ---------------------------------------------------------------------------------------------------------
# Anomaly alerts (run by beat)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnomalyPolicy:
    window_s: float
    baseline_windows: int
    min_votes: int
    alpha: float
    min_drop: float
    # The forecast detector (services/dashboard/forecast.py): windows of history it learns trend and cycle
    # from, and the cycle's length in windows (7 daily windows: the weekday). 0 history: two-window test only.
    history_windows: int = 28
    season_windows: int = 7


def _totals(rows: list[tuple[str, str, int, int]], key: tuple[str, str] | None) -> tuple[int, int]:
    """(positives, votes) of the rows of one scope (None: all)."""
    picked = [r for r in rows if key is None or (r[0], r[1]) == key]
    return sum(r[3] for r in picked), sum(r[2] for r in picked)


def _judge(
    scope: str,
    key: tuple[str, str] | None,
    recent: list[tuple[str, str, int, int]],
    history: list[list[tuple[str, str, int, int]]],
    policy: AnomalyPolicy,
) -> domain.AnomalyCheck | forecast.ForecastCheck:
    """The forecast detector when the scope has the history for it, else the two-window test. `history` holds
    at least max(history_windows, baseline_windows) windows, oldest first."""
    if policy.history_windows:
        check = forecast.forecast_check(
            scope,
            [_totals(rows, key) for rows in history[-policy.history_windows :]],
            [_totals(recent, key)],
            period=policy.season_windows,
            alpha=policy.alpha,
            min_votes=policy.min_votes,
            min_drop=policy.min_drop,
        )
        if check.status != forecast.INSUFFICIENT_HISTORY:
            return check
    baseline_rows = [r for rows in history[-policy.baseline_windows :] for r in rows]
    return domain.check_anomaly(
        scope,
        _totals(recent, key),
        _totals(baseline_rows, key),
        alpha=policy.alpha,
        min_votes=policy.min_votes,
        min_drop=policy.min_drop,
    )


def check_anomalies(uow: SqlUnitOfWork, policy: AnomalyPolicy, now: datetime | None = None) -> list[dict[str, Any]]:
    """Judge the last window's positive rate, overall and per prompt version: against the forecast from trend and
    cycle (weekday) where there is history enough, else against the windows before it. Store an alert for each
    material, significant drop (at most one per scope and window). Returns the checks."""
    now = as_utc(now or utcnow())
    window = timedelta(seconds=policy.window_s)
    recent_start = now - window
    bucket = domain.window_bucket(now, policy.window_s)
    n_history = max(policy.history_windows, policy.baseline_windows)
    with uow:
        recent = uow.repo.vote_counts(recent_start, now)
        # Oldest first: window i ends where window i + 1 starts; the last ends where the recent one starts.
        history = [
            uow.repo.vote_counts(recent_start - window * (k + 1), recent_start - window * k)
            for k in reversed(range(n_history))
        ]
        scopes: list[tuple[str, tuple[str, str] | None]] = [("overall", None)]
        for name, version in sorted({(r[0], r[1]) for r in recent}):
            scopes.append((f"prompt {name} {version}", (name, version)))
        checks = []
        raised = False
        for scope, key in scopes:
            check = _judge(scope, key, recent, history, policy)
            checks.append(check)
            if check.status == "ANOMALY":
                if isinstance(check, forecast.ForecastCheck):
                    kind, baseline_rate, baseline_votes = "positive_rate_below_forecast", check.forecast_rate, 0
                else:
                    kind, baseline_rate, baseline_votes = (
                        "positive_rate_drop",
                        check.baseline_rate,
                        check.baseline_votes,
                    )
                added = uow.repo.add_alert(
                    {
                        "alert_id": str(derived_id("dashboard.alert", scope, bucket)),
                        "created_at": now,
                        "scope": scope,
                        "kind": kind,
                        "message": check.message(),
                        "recent_rate": check.recent_rate,
                        "baseline_rate": baseline_rate,
                        "recent_votes": check.recent_votes,
                        "baseline_votes": baseline_votes,
                        "p_value": check.p_value,
                    }
                )
                raised = raised or added
                if added:
                    log.warning("anomaly: %s", check.message())
        if raised:
            uow.repo.bump_revision()
        uow.commit()
    return [
        {
            "scope": c.scope,
            "status": c.status,
            "recent_rate": c.recent_rate,
            "baseline_rate": c.forecast_rate if isinstance(c, forecast.ForecastCheck) else c.baseline_rate,
            "method": "forecast" if isinstance(c, forecast.ForecastCheck) else "two-window",
        }
        for c in checks
    ]


# ---------------------------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadPolicy:
    ticker_min_votes: int = 5
    ticker_top_n: int = 10
    heatmap_max_tickers: int = 20


def since_day(days: int, today: date) -> str:
    """The first day of a `days`-day window ending today (days=1 is today only)."""
    return (today - timedelta(days=max(1, days) - 1)).isoformat()


def stats(uow: SqlUnitOfWork, days: int, policy: ReadPolicy, now: datetime | None = None) -> dict[str, Any]:
    """Every figure of the dashboard over the last `days` days."""
    now = as_utc(now or utcnow())
    today = now.date()
    since = since_day(days, today)
    with uow:
        repo = uow.repo
        revision = repo.revision()
        cells = repo.cells(since, by=BY_TIME)
        ticker_cells = repo.cells(since, by=BY_TICKER)
        experiment_cells = repo.cells(None, by=BY_ARM, experiments_only=True)
        infos = repo.experiment_infos()
        pending = repo.pending_votes()
        first_voted = repo.first_voted_at(since)
        width = domain.curve_width(first_voted, now)
        curve = [] if first_voted is None else repo.curve_buckets(since, _floor(first_voted, width), width)
        alerts = repo.recent_alerts()
        champions = repo.champion_history()
        models = repo.model_list()
        jobs = repo.finetune_job_list()

    def rows(key: Callable[[domain.Cell], Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
        grouped = domain.group(cells, key)
        out = [
            {**dict(zip(names, k if isinstance(k, tuple) else (k,), strict=True)), **f.as_dict()}
            for k, f in grouped.items()
        ]
        return sorted(out, key=lambda r: tuple(str(r[n]) for n in names))

    return {
        "generated_at": now.isoformat(),
        "revision": revision,
        "days": days,
        "since": since,
        "totals": domain.figures(cells).as_dict(),
        "pending_votes": pending,
        "daily": domain.daily(cells, today),
        "learning_curve": domain.learning_curve(curve, width if first_voted else None, now),
        "per_prompt_version": rows(lambda c: (c.prompt_name, c.prompt_version), ("prompt_name", "prompt_version")),
        "per_model": rows(lambda c: c.model, ("model",)),
        "per_signal": rows(lambda c: c.signal, ("signal",)),
        "tickers": domain.ticker_league(ticker_cells, min_votes=policy.ticker_min_votes, n=policy.ticker_top_n),
        "cost_vs_quality": domain.cost_vs_quality(cells),
        "experiments": domain.experiments(experiment_cells, infos),
        "heatmap": domain.heatmap(ticker_cells, max_tickers=policy.heatmap_max_tickers),
        "alerts": alerts,
        "champions": champions,
        "models": models,
        "finetune_jobs": jobs,
    }


def _floor(ts: datetime, width_s: int) -> datetime:
    """The start of the `width_s`-second window (aligned to the epoch) that holds `ts`."""
    epoch = int(as_utc(ts).timestamp())
    return datetime.fromtimestamp(epoch - epoch % width_s, as_utc(ts).tzinfo)


def revision(uow: SqlUnitOfWork) -> int:
    with uow:
        return uow.repo.revision()


EXPORT_TABLES = ("daily", "prompt_versions", "models", "signals", "tickers", "cost_vs_quality", "arms", "explanations")


def export_rows(
    uow: SqlUnitOfWork,
    table: str,
    days: int,
    policy: ReadPolicy,
    *,
    limit: int = 100_000,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Flat rows (one dict per row, the same keys in every row) of one dashboard table, for CSV / JSON."""
    now = as_utc(now or utcnow())
    if table == "explanations":
        with uow:
            return [_public(r) for r in uow.repo.explanation_rows(since_day(days, now.date()), limit)]
    if table not in EXPORT_TABLES:
        raise ValueError(f"unknown table {table!r}; one of {', '.join(EXPORT_TABLES)}")
    snapshot = stats(uow, days, policy, now=now)
    if table == "tickers":  # every ticker, not only the top and bottom ten
        with uow:
            cells = uow.repo.cells(since_day(days, now.date()), by=BY_TICKER)
        rows = [{"ticker": t, **f.as_dict()} for t, f in sorted(domain.group(cells, lambda c: c.ticker).items())]
    elif table == "arms":
        rows = [
            {"experiment_id": e["experiment_id"], "status": e["status"], **arm}
            for e in snapshot["experiments"]
            for arm in e["arms"]
        ]
    else:
        key = {
            "daily": "daily",
            "prompt_versions": "per_prompt_version",
            "models": "per_model",
            "signals": "per_signal",
            "cost_vs_quality": "cost_vs_quality",
        }[table]
        rows = snapshot[key]
    return [_flat(r) for r in rows]


def explanation_pages(
    reader: Callable[[], SqlUnitOfWork], days: int, *, page_size: int = 1000, now: datetime | None = None
) -> Iterator[list[dict[str, Any]]]:
    """The explanations export in pages of `page_size` rows, each read in its own short read transaction
    (keyset paging): a long export never holds one read open for its whole length, nor all rows in memory."""
    since = since_day(days, as_utc(now or utcnow()).date())
    after = None
    while True:
        with reader() as uow:
            page = list(uow.repo.explanation_rows(since, page_size, after))
        if not page:
            return
        after = page[-1]["_cursor"]
        yield [_public(r) for r in page]
        if len(page) < page_size:
            return


def _public(row: ExplanationExportRow) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "_cursor"}


class SnapshotCache:
    """The dashboard figures, computed once per change of the read model: each read first asks for the
    revision (one row), and only a new revision (or a snapshot older than `max_age_s`, so "today" moves on)
    computes the figures again. The admin JSON, the live stream and the Prometheus gauges all read from it,
    so a scrape or a reload costs one small read, not a recomputation."""

    def __init__(self, max_age_s: float = 60.0) -> None:
        import threading

        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, ReadPolicy], tuple[int, float, dict[str, Any]]] = {}
        self.computed = 0  # how many times the figures were computed (for tests and /metrics)

    def get(self, reader: Callable[[], SqlUnitOfWork], days: int, policy: ReadPolicy) -> dict[str, Any]:
        import time

        key = (days, policy)
        current = revision(reader())
        entry = self._entries.get(key)
        if entry is not None and entry[0] == current and time.monotonic() - entry[1] < self.max_age_s:
            return entry[2]
        with self._lock:  # one computation at a time; a waiter then finds it done
            entry = self._entries.get(key)
            if entry is not None and entry[0] >= current and time.monotonic() - entry[1] < self.max_age_s:
                return entry[2]
            snapshot = stats(reader(), days, policy)
            self._entries[key] = (snapshot["revision"], time.monotonic(), snapshot)
            self.computed += 1
            return snapshot


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Intervals become two columns, so every value is a scalar."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k.endswith("_ci"):
            out[k + "_low"], out[k + "_high"] = (v[0], v[1]) if v else (None, None)
        else:
            out[k] = v
    return out
