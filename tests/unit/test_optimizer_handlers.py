"""Optimizer use cases against a real SQLite file, with a FakeBus for what they publish and a fake generator."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from services.optimizer import domain, experiments, handlers, registry, search, views
from services.optimizer.config import OptimizerSettings
from services.optimizer.generation import Candidate, GenerationResult, OfflineGenerator, SearchHistory
from services.optimizer.store import Store, champions
from shared.contracts import (
    AllocationChanged,
    ChampionChanged,
    ExperimentConcluded,
    ExperimentStarted,
    FeedbackErased,
    ModelRegistered,
    utcnow,
)
from shared.prompts import PROMPT_NAME, SEED_TEMPLATE
from tests.support import explanation_created, feedback_recorded
from tests.unit.optimizer_support import (
    MODEL,
    arm_fields,
    explain_and_vote,
    offline_settings,
    optimizer_store,  # noqa: F401  (the store fixture)
    published,
)


@pytest.fixture
def settings() -> OptimizerSettings:
    return offline_settings(min_feedback_per_arm=30, max_feedback_per_arm=400, generation_min_interval_s=3600)


def add_variant(store: Store, settings: OptimizerSettings, text: str = "bullet points") -> str:
    template = SEED_TEMPLATE + f"\n\nAnswer as {text}, with one line per indicator and the strongest first."
    return registry.add_version(PROMPT_NAME, template, store.uow(), settings)["version"]


def start(store: Store, settings: OptimizerSettings, version: str, **kw: Any) -> str:
    spec = domain.ExperimentSpec(
        prompt_name=PROMPT_NAME,
        arms=(domain.ArmIn("v1.0", MODEL, 0.5, True), domain.ArmIn(version, MODEL, 0.5)),
        **experiments.spec_defaults(settings, **kw),
    )
    return experiments.create_experiment(spec, store.uow())["experiment_id"]


def voted_experiment(
    store: Store,
    settings: OptimizerSettings,
    control: tuple[int, int],
    treatment: tuple[int, int],
    *,
    costs: tuple[float, float] = (0.0, 0.0),
    **kw: Any,
) -> tuple[str, str]:
    """(experiment, variant): a hand-written variant (arm t1) against the seed, its start relayed, then each arm
    fed (votes, thumbs up) at its cost per explanation; `kw` are the experiment's options."""
    v = add_variant(store, settings)
    exp = start(store, settings, v, **kw)
    published(store)
    feed(store, exp, "control", n=control[0], positives=control[1], cost=costs[0])
    feed(store, exp, "t1", n=treatment[0], positives=treatment[1], cost=costs[1], version=v)
    return exp, v


def start_three_arms(
    store: Store,
    settings: OptimizerSettings,
    allocation: str,
    weights: tuple[float | None, ...],
    *,
    min_feedback_per_arm: int = 1000,
    max_feedback_per_arm: int = 5000,
) -> tuple[str, str, str]:
    """(experiment, v1, v2): the seed (control) against a bullet-point variant and a one-sentence one, with these
    weights (None: adaptive); its start already relayed. By default no decision before 1000 votes an arm, and
    the sample cap only after 5000."""
    v1 = add_variant(store, settings, "bullet points")
    v2 = registry.add_version(
        PROMPT_NAME, "{ticker}: {signal}.\n{indicators}\nOne sentence, for a beginner.", store.uow(), settings
    )["version"]
    control, w1, w2 = weights
    spec = domain.ExperimentSpec(
        prompt_name=PROMPT_NAME,
        arms=(domain.ArmIn("v1.0", MODEL, control, True), domain.ArmIn(v1, MODEL, w1), domain.ArmIn(v2, MODEL, w2)),
        allocation=allocation,
        **experiments.spec_defaults(
            settings, min_feedback_per_arm=min_feedback_per_arm, max_feedback_per_arm=max_feedback_per_arm
        ),
    )
    exp = experiments.create_experiment(spec, store.uow())["experiment_id"]
    published(store)
    return exp, v1, v2


def feed(
    store: Store,
    experiment_id: str,
    arm_id: str,
    *,
    n: int,
    positives: int,
    cost: float = 0.0,
    version: str = "v1.0",
) -> None:
    """n exposures on the arm, each with one vote; the first `positives` are thumbs up."""
    arm = arm_fields(experiment_id, arm_id, version)
    for i in range(n):
        explain_and_vote(store, arm, f"s{i}", i < positives, cost=cost)


def champion(store: Store) -> dict[str, Any]:
    return views.prompts_view(store.uow(), PROMPT_NAME)[0]["champion"]


def statuses(store: Store) -> dict[str, str]:
    return {v["version"]: v["status"] for v in views.prompts_view(store.uow(), PROMPT_NAME)[0]["versions"]}


# -- registry ---------------------------------------------------------------------------------------------


def test_seed_prompt_is_champion_once_and_announced(store: Store) -> None:
    assert registry.ensure_seeded(store.uow(), MODEL) is False
    events = published(store)
    assert [type(e) for e in events] == [ChampionChanged]
    assert events[0].prompt.version == "v1.0" and events[0].model == MODEL
    assert champion(store)["version"] == "v1.0"


def test_hand_written_version_gets_next_number_and_lineage(store: Store, settings: OptimizerSettings) -> None:
    version = add_variant(store, settings)
    view = views.prompts_view(store.uow(), PROMPT_NAME)[0]
    added = next(v for v in view["versions"] if v["version"] == version)
    assert version == "v1.1" and added["parent_version"] == "v1.0" and added["status"] == "candidate"


def test_hand_written_near_duplicate_is_a_conflict(store: Store, settings: OptimizerSettings) -> None:
    with pytest.raises(domain.Conflict, match="near-duplicate"):
        registry.add_version(PROMPT_NAME, SEED_TEMPLATE + " ", store.uow(), settings)


def test_champion_cannot_be_archived(store: Store) -> None:
    with pytest.raises(domain.Conflict, match="champion"):
        registry.archive_version(PROMPT_NAME, "v1.0", store.uow())


# -- feed -------------------------------------------------------------------------------------------------


def test_replaced_vote_counts_once_and_erasure_removes_it(store: Store, settings: OptimizerSettings) -> None:
    exp = start(store, settings, add_variant(store, settings))
    ex = explanation_created(None, "s", signal="BUY", **arm_fields(exp, "control"))
    eid, fid = ex.explanation_id, uuid.uuid4()
    t0 = utcnow()
    up = feedback_recorded(ex, 1, feedback_id=fid, submitted_at=t0)
    assert handlers.on_feedback_recorded(up, store.uow()) == "stored"
    assert handlers.on_feedback_recorded(up, store.uow()) == "duplicate"
    down = feedback_recorded(ex, -1, feedback_id=fid, submitted_at=t0 + timedelta(seconds=1), replaced=True)
    assert handlers.on_feedback_recorded(down, store.uow()) == "replaced"
    old = feedback_recorded(ex, 1, feedback_id=fid, submitted_at=t0 - timedelta(seconds=5))
    assert handlers.on_feedback_recorded(old, store.uow()) == "stale"
    arm = views.experiment_view(exp, store.uow())["analysis"]["arms"][0]
    assert (arm["n"], arm["positives"]) == (1, 0)
    erased = FeedbackErased(session_key="s", feedback_ids=[fid], explanation_ids=[eid], erased_at=utcnow())
    assert handlers.on_feedback_erased(erased, store.uow()) == 1
    assert views.experiment_view(exp, store.uow())["analysis"]["arms"][0]["n"] == 0


def test_vote_delivered_after_its_erasure_stays_erased(store: Store, settings: OptimizerSettings) -> None:
    exp = start(store, settings, add_variant(store, settings))
    ex = explanation_created(None, "s", signal="BUY", **arm_fields(exp, "control"))
    eid, fid = ex.explanation_id, uuid.uuid4()
    t0 = utcnow()
    erased = FeedbackErased(
        session_key="s", feedback_ids=[fid], explanation_ids=[eid], erased_at=t0 + timedelta(seconds=1)
    )
    assert handlers.on_feedback_erased(erased, store.uow()) == 0  # the erasure overtook the vote on the queue
    late = feedback_recorded(ex, 1, feedback_id=fid, submitted_at=t0)
    assert handlers.on_feedback_recorded(late, store.uow()) == "erased"
    assert views.experiment_view(exp, store.uow())["analysis"]["arms"][0]["n"] == 0
    again = feedback_recorded(ex, 1, feedback_id=fid, submitted_at=t0 + timedelta(seconds=5))  # voted again afterwards
    assert handlers.on_feedback_recorded(again, store.uow()) == "stored"
    assert views.experiment_view(exp, store.uow())["analysis"]["arms"][0]["n"] == 1


# -- experiments and decisions ----------------------------------------------------------------------------


def test_only_one_experiment_runs_per_prompt(store: Store, settings: OptimizerSettings) -> None:
    v = add_variant(store, settings)
    start(store, settings, v)
    with pytest.raises(domain.Conflict, match="already running"):
        start(store, settings, v)


def test_clear_winner_is_promoted_losers_archived_and_router_told(store: Store, settings: OptimizerSettings) -> None:
    exp, v = voted_experiment(store, settings, (60, 30), (60, 55))
    results = experiments.run_decisions(store.uow, settings)
    assert results[0]["action"] == "promoted" and results[0]["decision"] == "ship"
    assert champion(store)["version"] == v
    assert statuses(store) == {"v1.0": "archived", v: "active"}
    events = published(store)
    assert {type(e) for e in events} == {ExperimentConcluded, ChampionChanged}
    concluded = next(e for e in events if isinstance(e, ExperimentConcluded))
    assert concluded.decision == "ship" and concluded.winner_arm_id == "t1"
    changed = next(e for e in events if isinstance(e, ChampionChanged))
    assert changed.prompt.version == v and changed.previous_version == "v1.0" and "won experiment" in changed.reason
    view = views.experiment_view(exp, store.uow())
    assert view["status"] == "concluded" and view["decision"]["final"] is True


def test_decision_waits_for_minimum_duration(store: Store, settings: OptimizerSettings) -> None:
    exp, v = voted_experiment(store, settings, (60, 30), (60, 55), min_duration_s=3600)
    result = experiments.decide_experiment(exp, store.uow(), settings)
    assert result["decision"] == "collecting" and "minimum duration" in result["reason"]
    later = utcnow() + timedelta(hours=2)
    assert experiments.decide_experiment(exp, store.uow(), settings, later)["action"] == "promoted"


@pytest.mark.parametrize("grace_s", [600.0, 0.0])
def test_votes_still_on_their_way_do_not_count_against_an_arm_feedback_rate(
    store: Store, settings: OptimizerSettings, grace_s: float
) -> None:
    """The winner's latest sessions were served a minute before the decision and their votes have not arrived
    (a vote travels one more hop than its explanation's event). With the grace period they are left out of the
    feedback rate and the winner ships. Counted (no grace), they make it look under-voted (0.6x the control's
    rate, under the 0.8x floor): it waits, never a final keep-control, and ships once the votes are in."""
    exp, v = voted_experiment(store, settings, (60, 30), (60, 55), feedback_rate_grace_s=grace_s)
    later = utcnow() + timedelta(hours=2)
    fresh = [
        explanation_created(None, None, created_at=later - timedelta(minutes=1), **arm_fields(exp, "t1", v))
        for _ in range(40)
    ]
    for event in fresh:
        handlers.on_explanation_created(event, store.uow())
    result = experiments.decide_experiment(exp, store.uow(), settings, later)
    if grace_s == 0:
        assert result["decision"] == "collecting", result
        assert (
            "t1 wins but waits on the feedback-rate guardrail: feedback rate 0.60x control (< 0.8x)" in result["reason"]
        )
        for event in fresh:
            vote = feedback_recorded(event, 1, session_key=f"late-{event.explanation_id}", submitted_at=later)
            handlers.on_feedback_recorded(vote, store.uow())
        result = experiments.decide_experiment(exp, store.uow(), settings, later)
    assert result["action"] == "promoted", result


def test_a_winner_waits_while_no_session_is_old_enough_to_judge_its_feedback_rate(
    store: Store, settings: OptimizerSettings
) -> None:
    exp, v = voted_experiment(store, settings, (60, 30), (60, 55), feedback_rate_grace_s=600)
    result = experiments.decide_experiment(exp, store.uow(), settings)
    assert result["decision"] == "collecting"
    assert "t1 wins but the feedback-rate guardrail cannot be judged yet" in result["reason"]
    view = views.experiment_view(exp, store.uow())
    assert view["config"]["guardrails"]["feedback_rate_grace_s"] == 600
    assert [a["feedback_rate"] for a in view["analysis"]["arms"]] == [None, None]
    later = utcnow() + timedelta(minutes=11)
    assert experiments.decide_experiment(exp, store.uow(), settings, later)["action"] == "promoted"


def test_approve_mode_waits_for_an_operator(store: Store, settings: OptimizerSettings) -> None:
    approve = settings.model_copy(update={"promotion_mode": "approve"})
    exp, v = voted_experiment(store, settings, (60, 30), (60, 55))
    assert experiments.decide_experiment(exp, store.uow(), approve)["action"] == "awaiting_approval"
    assert champion(store)["version"] == "v1.0"
    result = experiments.promote_experiment(exp, store.uow())
    assert result["promoted_arm_id"] == "t1" and champion(store)["version"] == v


def test_promote_without_a_winner_is_a_conflict(store: Store, settings: OptimizerSettings) -> None:
    exp = start(store, settings, add_variant(store, settings))
    with pytest.raises(domain.Conflict, match="no winner"):
        experiments.promote_experiment(exp, store.uow())


def test_no_difference_concludes_inconclusive_without_promotion(store: Store, settings: OptimizerSettings) -> None:
    exp, v = voted_experiment(store, settings, (400, 240), (400, 240))
    result = experiments.decide_experiment(exp, store.uow(), settings)
    assert result["decision"] == "inconclusive" and result["action"] == "concluded"
    assert champion(store)["version"] == "v1.0"
    assert statuses(store)[v] == "archived"


def test_worse_treatment_keeps_control(store: Store, settings: OptimizerSettings) -> None:
    exp, v = voted_experiment(store, settings, (80, 70), (80, 20))
    assert experiments.decide_experiment(exp, store.uow(), settings)["decision"] == "keep_control"
    assert champion(store)["version"] == "v1.0"


def test_sample_ratio_mismatch_pauses_the_experiment(store: Store, settings: OptimizerSettings) -> None:
    exp, v = voted_experiment(store, settings, (300, 180), (100, 60))
    result = experiments.decide_experiment(exp, store.uow(), settings)
    assert result["decision"] == "unhealthy" and result["action"] == "paused"
    assert "sample ratio mismatch" in result["reason"]
    events = published(store)
    assert [e.decision for e in events if isinstance(e, ExperimentConcluded)] == ["unhealthy"]
    assert statuses(store)[v] == "candidate"


def test_cost_guardrail_blocks_an_expensive_winner(store: Store, settings: OptimizerSettings) -> None:
    exp, v = voted_experiment(store, settings, (80, 40), (80, 75), costs=(0.001, 0.01))
    result = experiments.decide_experiment(exp, store.uow(), settings)
    assert result["decision"] == "keep_control" and "cost" in result["reason"]


def test_rollback_restores_the_champion_an_experiment_replaced(store: Store, settings: OptimizerSettings) -> None:
    exp, v = voted_experiment(store, settings, (60, 30), (60, 55))
    experiments.run_decisions(store.uow, settings)
    published(store)
    result = experiments.rollback_experiment(exp, store.uow())
    assert result["champion"]["version"] == "v1.0" and champion(store)["version"] == "v1.0"
    events = published(store)
    assert [(e.prompt.version, e.previous_version) for e in events if isinstance(e, ChampionChanged)] == [("v1.0", v)]
    assert "rollback" in events[-1].reason
    with pytest.raises(domain.Conflict, match="already been rolled back"):
        experiments.rollback_experiment(exp, store.uow())


def test_rollback_of_a_promotion_that_kept_no_previous_model_is_refused(
    store: Store, settings: OptimizerSettings
) -> None:
    v = add_variant(store, settings)
    exp = start(store, settings, v)
    experiments.promote_experiment(exp, store.uow(), arm_id="t1")
    with store.factory() as session, session.begin():  # the column is nullable: a row may lack it
        session.execute(update(champions).where(champions.c.version == v).values(previous_model=None))
    with pytest.raises(domain.Conflict, match="no earlier champion"):
        experiments.rollback_experiment(exp, store.uow())
    assert champion(store)["version"] == v


def test_prompt_rollback_to_any_earlier_champion(store: Store, settings: OptimizerSettings) -> None:
    with pytest.raises(domain.Conflict, match="no earlier champion"):
        experiments.rollback_prompt(PROMPT_NAME, store.uow())
    v = add_variant(store, settings)
    exp = start(store, settings, v)
    experiments.promote_experiment(exp, store.uow(), arm_id="t1")
    with pytest.raises(domain.Conflict, match="never an earlier champion"):
        experiments.rollback_prompt(PROMPT_NAME, store.uow(), version="v7.0")
    assert experiments.rollback_prompt(PROMPT_NAME, store.uow(), version="v1.0")["version"] == "v1.0"
    kinds = [h["kind"] for h in views.prompts_view(store.uow(), PROMPT_NAME)[0]["champion_history"]]
    assert kinds == ["seed", "promotion", "rollback"]


def test_prompt_rollback_to_a_model_that_was_never_champion_is_refused_not_ignored(
    store: Store, settings: OptimizerSettings
) -> None:
    v = add_variant(store, settings)
    experiments.promote_experiment(start(store, settings, v), store.uow(), arm_id="t1")
    before = champion(store)
    with pytest.raises(domain.Conflict, match="model no-such-model was never an earlier champion"):
        experiments.rollback_prompt(PROMPT_NAME, store.uow(), model="no-such-model")
    with pytest.raises(domain.Conflict, match="v1.0 with model no-such-model was never an earlier champion"):
        experiments.rollback_prompt(PROMPT_NAME, store.uow(), version="v1.0", model="no-such-model")
    assert champion(store) == before
    seed_model = views.prompts_view(store.uow(), PROMPT_NAME)[0]["champion_history"][0]["model"]
    assert experiments.rollback_prompt(PROMPT_NAME, store.uow(), model=seed_model)["version"] == "v1.0"


def test_stop_ends_an_experiment_without_promotion(store: Store, settings: OptimizerSettings) -> None:
    v = add_variant(store, settings)
    exp = start(store, settings, v)
    published(store)
    assert experiments.stop_experiment(exp, store.uow())["status"] == "stopped"
    assert [e.decision for e in published(store)] == ["stopped"]
    with pytest.raises(domain.Conflict):
        experiments.stop_experiment(exp, store.uow())


def test_adaptive_allocation_reweights_in_batches(store: Store, settings: OptimizerSettings) -> None:
    tuned = settings.model_copy(update={"adaptive_min_feedback_per_arm": 20, "adaptive_batch": 10})
    exp, _, _ = start_three_arms(store, settings, "adaptive", (None, None, None))
    for arm, pos in (("control", 5), ("t1", 9), ("t2", 4)):
        feed(store, exp, arm, n=10, positives=pos)
    assert experiments.decide_experiment(exp, store.uow(), tuned)["action"] == "none"  # under 20 per arm
    for arm, pos in (("control", 7), ("t1", 13), ("t2", 6)):
        feed(store, exp, arm, n=14, positives=pos)
    assert experiments.decide_experiment(exp, store.uow(), tuned)["action"] == "reweighted"
    changes = [e for e in published(store) if isinstance(e, AllocationChanged)]
    assert len(changes) == 1 and changes[0].weights["t1"] > changes[0].weights["t2"]
    assert min(changes[0].weights.values()) >= 0.01
    assert sum(changes[0].weights.values()) == pytest.approx(1.0)
    assert experiments.decide_experiment(exp, store.uow(), tuned)["action"] == "none"  # no new batch yet


# -- fine-tuned models ------------------------------------------------------------------------------------


def test_registered_model_starts_an_experiment_that_needs_ten_percent_lift(
    store: Store, settings: OptimizerSettings
) -> None:
    published(store)
    event = ModelRegistered(model_id="ft-1", model="local/ft-1", base_model="tiny")
    outcome = handlers.on_model_registered(event, store.uow, settings)
    assert outcome.endswith("running")
    assert handlers.on_model_registered(event, store.uow, settings) == "duplicate"
    started = [e for e in published(store) if isinstance(e, ExperimentStarted)]
    assert [(a.prompt.version, a.model, a.is_control) for a in started[0].arms] == [
        ("v1.0", MODEL, True),
        ("v1.0", "local/ft-1", False),
    ]
    view = views.experiment_view(started[0].experiment_id, store.uow())
    assert view["config"]["min_lift_to_ship"] == pytest.approx(0.10) and view["source"] == "finetune"
    # +8.9% relative is significant with this much data; whether it reaches the 10% the plan asks of a tuned
    # model is still open (the always-valid interval straddles +10%): neither ship nor keep-control yet
    feed(store, started[0].experiment_id, "control", n=300, positives=270)
    feed(store, started[0].experiment_id, "t1", n=300, positives=294)
    result = experiments.decide_experiment(started[0].experiment_id, store.uow(), settings)
    assert champion(store)["model"] == MODEL
    assert result["decision"] == "collecting" and "minimum lift 10%" in result["reason"]


def test_registered_model_queues_behind_a_running_experiment(store: Store, settings: OptimizerSettings) -> None:
    exp = start(store, settings, add_variant(store, settings))
    outcome = handlers.on_model_registered(
        ModelRegistered(model_id="ft", model="local/ft", base_model="b"), store.uow, settings
    )
    assert outcome.endswith("queued")
    experiments.stop_experiment(exp, store.uow())
    started = [r for r in experiments.run_decisions(store.uow, settings) if r.get("action") == "started"]
    assert len(started) == 1


# -- variant generation -----------------------------------------------------------------------------------


class FixedGenerator:
    def __init__(self, templates: list[str]) -> None:
        self.templates = templates
        self.calls = 0

    def generate(self, template: str, count: int, history: SearchHistory | None = None) -> GenerationResult:
        self.calls += 1
        return GenerationResult(
            source="openai",
            model="gpt-4o-mini",
            candidates=tuple(Candidate(t, "test") for t in self.templates[:count]),
            cost_usd=0.0021,
            tokens_in=500,
            tokens_out=300,
        )


def test_generation_keeps_good_variants_rejects_broken_ones_and_records_cost(
    store: Store, settings: OptimizerSettings
) -> None:
    good = "Ticker {ticker} has a {signal} signal.\nIndicators:\n{indicators}\nGive three bullet points."
    broken = "Explain the {signal} signal for {ticker}."  # drops {indicators}
    near_seed = SEED_TEMPLATE + "!"  # not the seed itself (that is a repeat of v1.0), but nearly
    generator = FixedGenerator([good, broken, near_seed, SEED_TEMPLATE, good])
    result = search.generate_variants(PROMPT_NAME, store.uow, generator, settings, count=5)
    assert [v["version"] for v in result["accepted"]] == ["v1.1"]
    reasons = [r["reason"] for r in result["rejected"]]
    assert "indicators" in reasons[0] and "near-duplicate" in reasons[1]
    assert reasons[2] == "repeats v1.0 (champion)" and "repeats v1.1" in reasons[3]
    assert result["cost_usd"] == pytest.approx(0.0021)
    generations = views.prompts_view(store.uow(), PROMPT_NAME)[0]["generations"]
    assert generations[0]["cost_usd"] == pytest.approx(0.0021) and generations[0]["rejected"] == 4


def test_generation_is_rate_limited(store: Store, settings: OptimizerSettings) -> None:
    t0 = datetime.now().astimezone()
    search.generate_variants(PROMPT_NAME, store.uow, OfflineGenerator(), settings, t0)
    generator = FixedGenerator([])
    with pytest.raises(domain.RateLimited) as info:
        search.generate_variants(PROMPT_NAME, store.uow, generator, settings, t0 + timedelta(minutes=10))
    assert 2990 < info.value.retry_after_s <= 3000
    assert generator.calls == 0  # no money spent while rate limited


def test_auto_cycle_generates_and_starts_the_next_experiment(store: Store, settings: OptimizerSettings) -> None:
    published(store)
    results = handlers.auto_cycle(store.uow, OfflineGenerator(), settings)
    assert results[0]["action"] == "started" and results[0]["generated"] is True
    started = [e for e in published(store) if isinstance(e, ExperimentStarted)]
    assert [a.arm_id for a in started[0].arms] == ["control", "t1", "t2", "t3"]
    assert started[0].arms[0].prompt.version == "v1.0"
    assert handlers.auto_cycle(store.uow, OfflineGenerator(), settings) == []  # one is running


def test_auto_cycle_rotates_the_new_champion_into_control(store: Store, settings: OptimizerSettings) -> None:
    fast = settings.model_copy(update={"generation_min_interval_s": 0})
    first = handlers.auto_cycle(store.uow, OfflineGenerator(), fast)[0]["experiment_id"]
    view = views.experiment_view(first, store.uow())
    bullets = view["arms"][1]["prompt_version"]
    feed(store, first, "control", n=60, positives=30)
    feed(store, first, "t1", n=60, positives=57, version=bullets)
    feed(store, first, "t2", n=60, positives=30)
    feed(store, first, "t3", n=60, positives=30)
    assert experiments.run_decisions(store.uow, fast)[0]["action"] == "promoted"
    second = handlers.auto_cycle(store.uow, OfflineGenerator(), fast)[0]["experiment_id"]
    arms = views.experiment_view(second, store.uow())["arms"]
    assert arms[0]["prompt_version"] == bullets and arms[0]["is_control"]
    parents = {v["version"]: v["parent_version"] for v in views.prompts_view(store.uow(), PROMPT_NAME)[0]["versions"]}
    assert all(parents[a["prompt_version"]] == bullets for a in arms[1:])


def test_auto_cycle_is_off_when_disabled(store: Store, settings: OptimizerSettings) -> None:
    off = settings.model_copy(update={"auto_experiment": False})
    assert handlers.auto_cycle(store.uow, OfflineGenerator(), off) == []


def feed_sessions(
    store: Store,
    experiment_id: str,
    arm_id: str,
    sessions: int,
    per_session: int,
    *,
    up: Callable[[int, int], bool],
    fallback: bool = False,
    signal: str = "BUY",
    version: str = "v1.0",
    prefix: str = "s",
) -> None:
    """`sessions` sessions of `per_session` voted explanations each; up(session, k) says thumbs up."""
    arm = arm_fields(experiment_id, arm_id, version)
    for s in range(sessions):
        key = f"{prefix}{arm_id}{s}"
        for k in range(per_session):
            explain_and_vote(store, arm, key, up(s, k), served_to=key, signal=signal, fallback=fallback)


def test_sessions_are_the_unit_and_fallback_explanations_do_not_count_for_the_arm(
    store: Store, settings: OptimizerSettings
) -> None:
    v = add_variant(store, settings)
    exp = start(store, settings, v)
    # whole sessions agree: every vote of an even session is up, of an odd one down
    feed_sessions(store, exp, "control", 8, 5, up=lambda s, k: s % 2 == 0)
    feed_sessions(store, exp, "t1", 8, 5, up=lambda s, k: s % 2 == 0, version=v)
    # the fallback model answered 4 of t1's explanations, all voted up: excluded from t1's quality
    feed_sessions(store, exp, "t1", 4, 1, up=lambda s, k: True, fallback=True, version=v, prefix="f", signal="SELL")
    view = views.experiment_view(exp, store.uow())
    t1 = next(a for a in view["analysis"]["arms"] if a["arm_id"] == "t1")
    assert (t1["n"], t1["positives"], t1["exposures"]) == (40, 20, 40)
    assert t1["fallbacks"] == 4 and t1["fallback_rate"] == pytest.approx(4 / 44)
    assert t1["sessions"] == 12  # the SRM counts the sessions the arm was assigned, fallbacks or not
    # five perfectly correlated votes per session are worth one: design effect 5
    assert t1["design_effect"] == pytest.approx(5.0)
    assert t1["effective_n"] == pytest.approx(8.0)
    assert view["analysis"]["srm"]["unit"] == "sessions"
    segments = {(r["segment"], r["arm_id"]): r for r in view["analysis"]["segments"]["results"]}
    assert segments[("BUY", "t1")]["n"] == 40 and segments[("SELL", "t1")]["n"] == 0


def test_approve_mode_withdraws_a_waiting_winner_when_its_guardrail_fails(
    store: Store, settings: OptimizerSettings
) -> None:
    approve = settings.model_copy(update={"promotion_mode": "approve"})
    exp, v = voted_experiment(store, settings, (60, 30), (60, 55))
    assert experiments.decide_experiment(exp, store.uow(), approve)["action"] == "awaiting_approval"
    # while it waits, its own model stops answering: most of its explanations now come from a fallback
    feed_sessions(store, exp, "t1", 40, 1, up=lambda s, k: True, fallback=True, version=v, prefix="late")
    feed_sessions(store, exp, "control", 40, 1, up=lambda s, k: True, prefix="late")
    results = experiments.run_decisions(store.uow, approve)
    assert [r["action"] for r in results if r.get("experiment_id") == exp] == ["approval_withdrawn"]
    view = views.experiment_view(exp, store.uow())
    assert view["status"] == "running" and "fallback rate" in view["reason"]
    assert champion(store)["version"] == "v1.0"


def test_adaptive_allocation_stops_traffic_to_an_arm_clearly_behind(store: Store, settings: OptimizerSettings) -> None:
    tuned = settings.model_copy(update={"adaptive_min_feedback_per_arm": 20, "adaptive_batch": 10})
    exp, v1, v2 = start_three_arms(store, settings, "adaptive", (None, None, None))
    feed(store, exp, "control", n=150, positives=105)
    feed(store, exp, "t1", n=150, positives=110, version=v1)
    feed(store, exp, "t2", n=150, positives=30, version=v2)  # 20% against 70%: clearly behind
    assert experiments.decide_experiment(exp, store.uow(), tuned)["action"] == "reweighted"
    changes = [e for e in published(store) if isinstance(e, AllocationChanged)]
    assert changes[-1].weights["t2"] == 0.0 and changes[-1].weights["t1"] > 0
    assert sum(changes[-1].weights.values()) == pytest.approx(1.0)
    view = views.experiment_view(exp, store.uow())
    assert next(a for a in view["analysis"]["arms"] if a["arm_id"] == "t2")["futile"] is True


def _three_arm_fixed(store: Store, settings: OptimizerSettings) -> tuple[str, str, str]:
    exp, v1, v2 = start_three_arms(store, settings, "fixed", (0.5, 0.3, 0.2))
    feed(store, exp, "control", n=250, positives=175)  # sessions in the proportions of the split
    feed(store, exp, "t1", n=150, positives=110, version=v1)
    feed(store, exp, "t2", n=100, positives=20, version=v2)  # 20% against 70%: it cannot reach the target lift
    return exp, v1, v2


def test_a_fixed_split_stops_serving_an_arm_that_cannot_win(store: Store, settings: OptimizerSettings) -> None:
    exp, _, _ = _three_arm_fixed(store, settings)
    assert experiments.decide_experiment(exp, store.uow(), settings)["action"] == "reweighted"
    changes = [e for e in published(store) if isinstance(e, AllocationChanged)]
    # the futile arm gets nothing; the others keep their proportions (0.5 : 0.3)
    assert changes[-1].weights == pytest.approx({"control": 0.5 / 0.8, "t1": 0.3 / 0.8, "t2": 0.0})
    view = views.experiment_view(exp, store.uow())
    assert view["status"] == "running"
    # the SRM check reads the sessions against the weights each was assigned with: no false alarm
    assert view["analysis"]["srm"]["flagged"] is False
    assert experiments.decide_experiment(exp, store.uow(), settings)["action"] == "none"  # dropped once


def test_a_fixed_split_stays_as_created_when_dropping_is_off(store: Store, settings: OptimizerSettings) -> None:
    exp, _, _ = _three_arm_fixed(store, settings)
    keep = settings.model_copy(update={"drop_futile_arms": False})
    assert experiments.decide_experiment(exp, store.uow(), keep)["action"] == "none"
    assert not [e for e in published(store) if isinstance(e, AllocationChanged)]


def test_a_fixed_split_gives_the_votes_a_dropped_arm_did_not_spend_to_the_arms_still_in_it(
    store: Store, settings: OptimizerSettings
) -> None:
    exp, v1, v2 = start_three_arms(
        store, settings, "fixed", (0.5, 0.3, 0.2), min_feedback_per_arm=30, max_feedback_per_arm=300
    )
    feed_sessions(store, exp, "control", 250, 1, up=lambda s, k: s % 10 < 7)
    feed_sessions(store, exp, "t1", 150, 1, up=lambda s, k: s % 10 < 7, version=v1)
    feed_sessions(store, exp, "t2", 100, 1, up=lambda s, k: s % 10 < 2, version=v2)  # cannot win: dropped
    assert experiments.decide_experiment(exp, store.uow(), settings)["action"] == "reweighted"
    # t2 left 200 of its 300: 100 more for each arm still served, so the control may go to 400
    feed_sessions(store, exp, "control", 100, 1, up=lambda s, k: s % 10 < 7, prefix="late")
    feed_sessions(store, exp, "t1", 60, 1, up=lambda s, k: s % 10 < 7, version=v1, prefix="late")
    assert experiments.decide_experiment(exp, store.uow(), settings)["action"] == "none"
    assert views.experiment_view(exp, store.uow())["status"] == "running"
    feed_sessions(store, exp, "control", 50, 1, up=lambda s, k: s % 10 < 7, prefix="last")
    result = experiments.decide_experiment(exp, store.uow(), settings)
    assert result["decision"] == "inconclusive"
    assert "sample cap of 300 per arm (400 for each arm still served" in result["reason"]
