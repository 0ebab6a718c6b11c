"""The read model, event by event: fake events in, figures out. Each test has its own SQLite file (fast)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from services.dashboard import handlers
from services.dashboard.store import Store
from shared import contracts
from tests.support import disposed_after, explanation_created, feedback_recorded

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
POLICY = handlers.ReadPolicy(ticker_min_votes=2, ticker_top_n=10, heatmap_max_tickers=20)


@pytest.fixture
def store(store_url: Callable[[str], str]) -> Iterator[Store]:
    yield from disposed_after(Store(store_url("dashboard")))


def explanation(
    *,
    ticker: str = "AAPL",
    signal: str = "BUY",
    version: str = "v1.0",
    model: str = "offline",
    cost: float = 0.002,
    latency: float = 100.0,
    created_at: datetime = NOW,
    experiment_id: str | None = None,
    arm_id: str | None = None,
) -> contracts.ExplanationCreated:
    return explanation_created(
        None,
        None,
        ticker=ticker,
        signal=signal,
        prompt_name="explain",
        prompt_version=version,
        model=model,
        experiment_id=experiment_id,
        arm_id=arm_id,
        tokens_in=10,
        tokens_out=20,
        cost_usd=cost,
        latency_ms=latency,
        created_at=created_at,
    )


def vote(
    ex: contracts.ExplanationCreated,
    rating: int,
    *,
    stars: int | None = None,
    feedback_id: uuid.UUID | None = None,
    at: datetime = NOW,
) -> contracts.FeedbackRecorded:
    return feedback_recorded(ex, rating, stars=stars, feedback_id=feedback_id or uuid.uuid4(), submitted_at=at)


def totals(store: Store, days: int = 30) -> dict:
    return handlers.stats(store.uow(), days, POLICY, now=NOW)["totals"]


def test_totals_and_rates_from_events(store: Store) -> None:
    a, b, c = explanation(), explanation(cost=0.004, latency=300), explanation()
    for ev in (a, b, c):
        handlers.on_explanation_created(ev, store.uow())
    handlers.on_feedback_recorded(vote(a, 1, stars=5), store.uow())
    handlers.on_feedback_recorded(vote(a, -1, stars=2), store.uow())  # another session on the same explanation
    handlers.on_feedback_recorded(vote(b, 1), store.uow())
    t = totals(store)
    assert t["explanations"] == 3
    assert t["votes"] == 3
    assert t["feedback_rate"] == pytest.approx(2 / 3)
    assert t["positive_rate"] == pytest.approx(2 / 3)
    assert t["avg_rating"] == pytest.approx(3.5)
    assert t["cost_per_explanation"] == pytest.approx(0.008 / 3)
    assert t["avg_latency_ms"] == pytest.approx(500 / 3)


def test_empty_read_model_has_no_division_errors(store: Store) -> None:
    s = handlers.stats(store.uow(), 30, POLICY, now=NOW)
    assert s["totals"]["explanations"] == 0
    assert s["totals"]["positive_rate"] is None
    assert s["daily"] == [] and s["per_prompt_version"] == [] and s["experiments"] == []
    assert s["learning_curve"]["points"] == []


def test_replaced_vote_counts_once_with_the_newer_rating(store: Store) -> None:
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    fid = uuid.uuid4()
    assert handlers.on_feedback_recorded(vote(ex, 1, feedback_id=fid, at=NOW), store.uow()) == "stored"
    newer = vote(ex, -1, feedback_id=fid, at=NOW + timedelta(seconds=5))
    assert handlers.on_feedback_recorded(newer, store.uow()) == "replaced"
    t = totals(store)
    assert t["votes"] == 1
    assert t["positive_rate"] == 0.0


def test_older_vote_arriving_after_the_newer_one_is_ignored(store: Store) -> None:
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    fid = uuid.uuid4()
    handlers.on_feedback_recorded(vote(ex, -1, feedback_id=fid, at=NOW + timedelta(seconds=5)), store.uow())
    assert handlers.on_feedback_recorded(vote(ex, 1, feedback_id=fid, at=NOW), store.uow()) == "stale"
    t = totals(store)
    assert (t["votes"], t["positives"]) == (1, 0)


def test_redelivered_event_is_counted_once(store: Store) -> None:
    ex = explanation()
    v = vote(ex, 1)
    for _ in range(3):
        handlers.on_explanation_created(ex, store.uow())
        handlers.on_feedback_recorded(v, store.uow())
    t = totals(store)
    assert (t["explanations"], t["votes"]) == (1, 1)


def test_vote_before_its_explanation_counts_once_the_explanation_arrives(store: Store) -> None:
    ex = explanation()
    handlers.on_feedback_recorded(vote(ex, 1, stars=4), store.uow())
    s = handlers.stats(store.uow(), 30, POLICY, now=NOW)
    assert s["totals"]["votes"] == 0  # not counted against an explanation it cannot see
    assert s["pending_votes"] == 1
    handlers.on_explanation_created(ex, store.uow())
    s = handlers.stats(store.uow(), 30, POLICY, now=NOW)
    assert s["pending_votes"] == 0
    assert (s["totals"]["votes"], s["totals"]["positive_rate"], s["totals"]["avg_rating"]) == (1, 1.0, 4.0)


def test_erased_votes_are_removed_and_do_not_come_back(store: Store) -> None:
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    kept, erased = vote(ex, 1), vote(ex, -1)
    handlers.on_feedback_recorded(kept, store.uow())
    handlers.on_feedback_recorded(erased, store.uow())
    erasure = contracts.FeedbackErased(
        session_key="s" * 64,
        feedback_ids=[erased.feedback_id],
        explanation_ids=[ex.explanation_id],
        erased_at=NOW + timedelta(seconds=1),
    )
    assert handlers.on_feedback_erased(erasure, store.uow()) == 1
    # the same vote redelivered late (a new message id, submitted before the erasure) stays erased
    late = vote(ex, -1, feedback_id=erased.feedback_id, at=NOW)
    assert handlers.on_feedback_recorded(late, store.uow()) == "erased"
    t = totals(store)
    assert (t["votes"], t["positive_rate"], t["feedback_rate"]) == (1, 1.0, 1.0)
    # a vote cast after the erasure counts again
    after = vote(ex, -1, feedback_id=erased.feedback_id, at=NOW + timedelta(seconds=2))
    assert handlers.on_feedback_recorded(after, store.uow()) == "stored"
    assert totals(store)["votes"] == 2


def test_erasure_before_the_vote_event_arrives_drops_it(store: Store) -> None:
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    v = vote(ex, 1)
    handlers.on_feedback_erased(
        contracts.FeedbackErased(
            session_key="s" * 64,
            feedback_ids=[v.feedback_id],
            explanation_ids=[ex.explanation_id],
            erased_at=NOW + timedelta(seconds=1),
        ),
        store.uow(),
    )
    assert handlers.on_feedback_recorded(v, store.uow()) == "erased"
    assert totals(store)["votes"] == 0


def test_breakdowns_per_version_signal_model_and_ticker(store: Store) -> None:
    plan = [
        ("AAPL", "BUY", "v1.0", "gpt", 1),
        ("AAPL", "BUY", "v1.0", "gpt", 1),
        ("TSLA", "SELL", "v1.1", "local", -1),
        ("TSLA", "SELL", "v1.1", "local", -1),
        ("TSLA", "HOLD", "v1.1", "local", 1),
    ]
    for ticker, signal, version, model, rating in plan:
        ex = explanation(ticker=ticker, signal=signal, version=version, model=model)
        handlers.on_explanation_created(ex, store.uow())
        handlers.on_feedback_recorded(vote(ex, rating), store.uow())
    s = handlers.stats(store.uow(), 30, POLICY, now=NOW)
    versions = {r["prompt_version"]: r for r in s["per_prompt_version"]}
    assert versions["v1.0"]["positive_rate"] == 1.0
    assert versions["v1.1"]["positive_rate"] == pytest.approx(1 / 3)
    signals = {r["signal"]: r["votes"] for r in s["per_signal"]}
    assert signals == {"BUY": 2, "HOLD": 1, "SELL": 2}
    assert {r["model"] for r in s["per_model"]} == {"gpt", "local"}
    assert [r["ticker"] for r in s["tickers"]["top"]] == ["AAPL", "TSLA"]
    assert s["tickers"]["bottom"][0]["ticker"] == "TSLA"
    assert {(r["model"], r["prompt_version"]) for r in s["cost_vs_quality"]} == {("gpt", "v1.0"), ("local", "v1.1")}
    assert s["heatmap"]["signals"] == ["BUY", "SELL", "HOLD"]


def test_days_window_leaves_older_explanations_out(store: Store) -> None:
    old = explanation(created_at=NOW - timedelta(days=10))
    new = explanation()
    for ex in (old, new):
        handlers.on_explanation_created(ex, store.uow())
        handlers.on_feedback_recorded(vote(ex, 1), store.uow())
    assert totals(store, days=7)["explanations"] == 1
    assert totals(store, days=30)["explanations"] == 2
    daily = handlers.stats(store.uow(), 30, POLICY, now=NOW)["daily"]
    assert len(daily) == 11  # every day from the first with data to today
    assert daily[0]["day"] == (NOW - timedelta(days=10)).date().isoformat()


def test_experiment_lifecycle_and_arms(store: Store) -> None:
    template = contracts.PromptTemplate(name="explain", version="v1.0", template="{ticker} {signal} {indicators}")
    challenger = contracts.PromptTemplate(name="explain", version="v1.1", template="{ticker}: {signal} {indicators}")
    started = contracts.ExperimentStarted(
        experiment_id="exp-1",
        prompt_name="explain",
        arms=[
            contracts.ArmSpec(arm_id="A", prompt=template, model="offline", weight=0.5, is_control=True),
            contracts.ArmSpec(arm_id="B", prompt=challenger, model="offline", weight=0.5),
        ],
    )
    concluded = contracts.ExperimentConcluded(
        experiment_id="exp-1", decision="promote", winner_arm_id="B", reason="won"
    )
    handlers.on_experiment_concluded(concluded, store.uow())  # out of order: the conclusion first
    handlers.on_experiment_started(started, store.uow())
    for arm, version, ratings in (("A", "v1.0", [1, -1]), ("B", "v1.1", [1, 1])):
        for r in ratings:
            ex = explanation(version=version, experiment_id="exp-1", arm_id=arm)
            handlers.on_explanation_created(ex, store.uow())
            handlers.on_feedback_recorded(vote(ex, r), store.uow())
    [exp] = handlers.stats(store.uow(), 30, POLICY, now=NOW)["experiments"]
    assert exp["status"] == "concluded" and exp["winner_arm_id"] == "B"
    arms = {a["arm_id"]: a for a in exp["arms"]}
    assert arms["A"]["is_control"] and arms["A"]["positive_rate"] == 0.5
    assert arms["B"]["prompt_version"] == "v1.1" and arms["B"]["lift"] == pytest.approx(1.0)
    assert arms["B"]["positive_rate_ci"] is not None


def test_champions_models_and_finetune_progress_are_listed(store: Store) -> None:
    t = contracts.PromptTemplate(name="explain", version="v1.2", template="x")
    handlers.on_champion_changed(
        contracts.ChampionChanged(prompt=t, model="offline", previous_version="v1.0"), store.uow()
    )
    handlers.on_model_registered(
        contracts.ModelRegistered(model_id="m1", model="local/ft-1", base_model="tiny"), store.uow()
    )
    later = contracts.FineTuneProgress(
        job_id="j1", state="training", progress=0.5, occurred_at=NOW + timedelta(seconds=5)
    )
    earlier = contracts.FineTuneProgress(job_id="j1", state="queued", progress=0.0, occurred_at=NOW)
    handlers.on_finetune_progress(later, store.uow())
    assert handlers.on_finetune_progress(earlier, store.uow()) == "stale"
    s = handlers.stats(store.uow(), 30, POLICY, now=NOW)
    assert s["champions"][0]["version"] == "v1.2"
    assert s["models"][0]["model"] == "local/ft-1"
    assert s["finetune_jobs"][0]["state"] == "training"


def test_anomaly_check_raises_one_alert_per_window_on_a_significant_drop(store: Store) -> None:
    policy = handlers.AnomalyPolicy(window_s=3600, baseline_windows=3, min_votes=20, alpha=0.01, min_drop=0.1)
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    # baseline (1 to 4 hours ago): 90% positive; recent hour: 30% positive
    for i in range(60):
        handlers.on_feedback_recorded(
            vote(ex, 1 if i % 10 else -1, at=NOW - timedelta(hours=2, seconds=i)), store.uow()
        )
    for i in range(30):
        handlers.on_feedback_recorded(
            vote(ex, 1 if i % 10 < 3 else -1, at=NOW - timedelta(minutes=10, seconds=i)), store.uow()
        )
    checks = handlers.check_anomalies(store.uow(), policy, now=NOW)
    assert {c["scope"]: c["status"] for c in checks} == {"overall": "ANOMALY", "prompt explain v1.0": "ANOMALY"}
    handlers.check_anomalies(store.uow(), policy, now=NOW + timedelta(seconds=30))  # same window: no duplicate
    alerts = handlers.stats(store.uow(), 30, POLICY, now=NOW)["alerts"]
    assert len(alerts) == 2
    assert alerts[0]["kind"] == "positive_rate_drop" and alerts[0]["recent_rate"] == pytest.approx(0.3)


def test_anomaly_check_stays_quiet_without_enough_votes(store: Store) -> None:
    policy = handlers.AnomalyPolicy(window_s=3600, baseline_windows=3, min_votes=20, alpha=0.01, min_drop=0.1)
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    handlers.on_feedback_recorded(vote(ex, -1, at=NOW - timedelta(minutes=1)), store.uow())
    checks = handlers.check_anomalies(store.uow(), policy, now=NOW)
    assert checks[0]["status"] == "INSUFFICIENT_SAMPLES"
    assert handlers.stats(store.uow(), 30, POLICY, now=NOW)["alerts"] == []


def test_every_change_moves_the_revision_the_stream_watches(store: Store) -> None:
    r0 = handlers.revision(store.uow())
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    r1 = handlers.revision(store.uow())
    handlers.on_explanation_created(ex, store.uow())  # duplicate: nothing changed
    assert r1 == r0 + 1 == handlers.revision(store.uow())


@pytest.mark.parametrize("table", handlers.EXPORT_TABLES)
def test_every_export_table_has_flat_rows(store: Store, table: str) -> None:
    ex = explanation(experiment_id="e", arm_id="a")
    handlers.on_explanation_created(ex, store.uow())
    handlers.on_feedback_recorded(vote(ex, 1), store.uow())
    rows = handlers.export_rows(store.uow(), table, 30, POLICY, now=NOW)
    assert rows
    for row in rows:
        assert all(not isinstance(v, list | dict) for v in row.values())


def _daily_votes(
    store: Store, ex: contracts.ExplanationCreated, days: int, rate_of_day: Callable[[int], float]
) -> None:
    """40 votes a day for `days` days before NOW (day 0 is the last one), at each day's rate."""
    for d in range(days):
        day_start = NOW - timedelta(days=d + 1)
        ups = round(40 * rate_of_day(d))
        for i in range(40):
            at = day_start + timedelta(minutes=30 + i)
            handlers.on_feedback_recorded(vote(ex, 1 if i < ups else -1, at=at), store.uow())


def test_a_weekend_dip_that_is_the_weekly_pattern_raises_no_alert_but_a_weekday_drop_does(store: Store) -> None:
    """Daily windows with 28 days of history: weekends (every 7th and 8th day back) are 25 points lower. The
    two-window test would alert on the weekend day; the forecast from trend and weekday does not."""
    policy = handlers.AnomalyPolicy(
        window_s=86_400, baseline_windows=7, min_votes=20, alpha=0.01, min_drop=0.1, history_windows=28
    )
    ex = explanation()
    handlers.on_explanation_created(ex, store.uow())
    _daily_votes(store, ex, 29, lambda d: 0.5 if d % 7 in (0, 1) else 0.75)  # day 0 (the recent window): weekend
    checks = handlers.check_anomalies(store.uow(), policy, now=NOW)
    assert checks[0]["method"] == "forecast" and checks[0]["status"] == "OK", checks
    assert handlers.stats(store.uow(), 30, POLICY, now=NOW)["alerts"] == []
    # The same history a day later, with a weekday at the weekend's rate: a real drop.
    later = NOW + timedelta(days=1)
    for i in range(40):
        handlers.on_feedback_recorded(vote(ex, 1 if i < 16 else -1, at=NOW + timedelta(minutes=30 + i)), store.uow())
    checks = handlers.check_anomalies(store.uow(), policy, now=later)
    assert checks[0]["status"] == "ANOMALY", checks
    alerts = handlers.stats(store.uow(), 60, POLICY, now=later)["alerts"]
    assert alerts and alerts[0]["kind"] == "positive_rate_below_forecast"


def test_an_exhausted_search_becomes_one_alert(store: Store) -> None:
    event = contracts.SearchExhausted(
        prompt_name="explain_signal", champion_version="v1.4", versions_tried=15, reason="every combination tried"
    )
    assert handlers.on_search_exhausted(event, store.uow()) == "stored"
    assert handlers.on_search_exhausted(event, store.uow()) == "duplicate"
    alerts = handlers.stats(store.uow(), 30, POLICY, now=NOW)["alerts"]
    assert [(a["kind"], a["scope"]) for a in alerts] == [("search_exhausted", "prompt explain_signal")]
    assert "exhausted at champion v1.4 (15 versions tried); generation stopped" in alerts[0]["message"]


def test_learning_curve_on_a_first_day_has_a_point_per_window_with_its_interval(store: Store) -> None:
    """Votes from the first two hours: points per 5 minutes (not one dot for the day), each window's positive
    rate with its Wilson interval; a window without votes is left out, not drawn as zero."""
    start = NOW - timedelta(hours=2)
    plan = {0: (3, 2), 1: (4, 4), 7: (2, 0)}  # 5-minute window -> (votes, positives)
    for window, (n, positives) in plan.items():
        for i in range(n):
            ex = explanation(created_at=start + timedelta(minutes=5 * window, seconds=10 + i))
            handlers.on_explanation_created(ex, store.uow())
            handlers.on_feedback_recorded(vote(ex, 1 if i < positives else -1), store.uow())
    handlers.on_explanation_created(explanation(created_at=start + timedelta(minutes=20)), store.uow())  # no vote
    curve = handlers.stats(store.uow(), 1, POLICY, now=NOW)["learning_curve"]
    assert curve["bucket_s"] == 300
    voted = [p for p in curve["points"] if p["votes"]]
    assert [(p["start"], p["votes"], p["positives"]) for p in voted] == [
        ((start + timedelta(minutes=5 * w)).isoformat(), n, x) for w, (n, x) in plan.items()
    ]
    assert voted[0]["positive_rate"] == pytest.approx(2 / 3)
    lo, hi = voted[0]["positive_rate_ci"]
    assert lo < 2 / 3 < hi
    assert [p["votes"] for p in curve["points"]] == [3, 4, 0, 2]  # the unvoted window: no rate, not a zero
    assert curve["points"][2]["positive_rate"] is None


def test_learning_curve_widens_its_windows_as_the_data_ages(store: Store) -> None:
    for days_ago in (27, 3, 0):
        ex = explanation(created_at=NOW - timedelta(days=days_ago, hours=1))
        handlers.on_explanation_created(ex, store.uow())
        handlers.on_feedback_recorded(vote(ex, 1), store.uow())
    curve = handlers.stats(store.uow(), 30, POLICY, now=NOW)["learning_curve"]
    assert curve["bucket_s"] == 86400
    assert [p["start"][:10] for p in curve["points"]] == ["2026-02-11", "2026-03-07", "2026-03-10"]


def test_votes_on_an_explanation_never_received_are_found_within_their_window_only(store: Store) -> None:
    """What `dashboard.ask_for_missing_explanations` asks the router for: explanations with votes but no row,
    once the votes are older than the grace period and younger than the window."""
    lost, received = explanation(), explanation()
    handlers.on_explanation_created(received, store.uow())
    for ex in (lost, received):
        handlers.on_feedback_recorded(vote(ex, 1, at=NOW), store.uow())

    def missing(since: datetime, until: datetime) -> list[uuid.UUID]:
        with store.uow() as uow:
            return uow.repo.votes_without_explanation(since, until)

    assert missing(NOW - timedelta(hours=1), NOW + timedelta(seconds=1)) == [lost.explanation_id]
    assert missing(NOW - timedelta(hours=1), NOW - timedelta(seconds=30)) == []  # too recent: may still arrive
    assert missing(NOW + timedelta(seconds=1), NOW + timedelta(hours=1)) == []  # outside the window: given up
    handlers.on_explanation_created(lost, store.uow())  # the event sent again
    assert missing(NOW - timedelta(hours=1), NOW + timedelta(seconds=1)) == []
