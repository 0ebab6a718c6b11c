"""Erasure reaches everything each service holds of a session: its rows, its outbox, what arrives late. Each
service's handlers on a real SQLite file; afterwards the session's key is searched for in every column of
every table of the file (tests.support.found_in_sqlite)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.feedback import handlers as feedback_handlers
from services.feedback.store import Store as FeedbackStore
from services.feedback.store import outbox as feedback_outbox
from services.finetune import handlers as finetune_handlers
from services.finetune.store import Store as FinetuneStore
from services.finetune.store import explanations as finetune_explanations
from services.optimizer import handlers as optimizer_handlers
from services.optimizer import registry
from services.optimizer.store import Store as OptimizerStore
from services.router import handlers as router_handlers
from services.router.config import RouterSettings
from services.router.providers import ProviderSet
from services.router.store import Store as RouterStore
from services.router.store import outbox as router_outbox
from shared.clock import as_utc
from shared.contracts import ExplanationCreated, FeedbackErased, FeedbackRecorded, utcnow
from shared.db import SqlStore
from shared.outbox import pending, publish_staged, relay
from shared.privacy import erasure_tag
from tests.fakes.bus import FakeBus
from tests.support import disposed_after, explanation_created, feedback_recorded, found_in_sqlite

KEY = "a1" * 32  # a session's keyed hash
OTHER = "b2" * 32
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MODEL = "offline/template-v1"


def _explanation(session: str | None, *, at: datetime = T0, experiment: str | None = None) -> ExplanationCreated:
    return explanation_created(
        None,
        session,
        ticker="AAPL",
        signal="BUY",
        experiment_id=experiment,
        arm_id="a" if experiment else None,
        prompt_text="AAPL BUY <context>my secret note</context>",
        text="because of my secret note",
        cost_usd=0.002,
        created_at=at,
    )


def _found(store: SqlStore[Any], values: list[str]) -> list[str]:
    """Where in the store's SQLite file any of `values` stands (tests.support.found_in_sqlite)."""
    database = store.engine.url.database
    assert database is not None
    return found_in_sqlite([Path(database)], values)


def _served(
    on_explanation_created: Callable[[ExplanationCreated, Any], object],
    uow: Callable[[], Any],
    *sessions: str,
    experiment: str | None = None,
) -> list[ExplanationCreated]:
    """An explanation served to each of `sessions`, its event handled by a service (each in a unit of work)."""
    served = [_explanation(session, experiment=experiment) for session in sessions]
    for e in served:
        on_explanation_created(e, uow())
    return served


def _vote(exp: ExplanationCreated, session: str, rating: int = 1) -> FeedbackRecorded:
    return feedback_recorded(exp, rating, session_key=session, submitted_at=T0 + timedelta(seconds=1))


def _erased(
    feedback_ids: list[uuid.UUID], explanation_ids: list[uuid.UUID], at: datetime | None = None
) -> FeedbackErased:
    return FeedbackErased(
        session_key=KEY, feedback_ids=feedback_ids, explanation_ids=explanation_ids, erased_at=at or utcnow()
    )


# -- feedback --------------------------------------------------------------------------------------------------


@pytest.fixture
def feedback_store(tmp_path: Path) -> Iterator[FeedbackStore]:
    yield from disposed_after(FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}"))


def test_feedback_erasure_leaves_no_key_and_never_publishes_the_erased_votes(feedback_store: FeedbackStore) -> None:
    mine, other = _served(feedback_handlers.on_explanation_created, feedback_store.uow, KEY, OTHER)
    published = feedback_handlers.new_vote(mine.explanation_id, KEY, 1, 5, "call me on +44 20 7946 0958")
    assert feedback_handlers.record_feedback(published, feedback_store.uow()) == "stored"
    relay(feedback_store.factory, feedback_outbox, FakeBus())  # the first vote's event went out
    replacing = feedback_handlers.new_vote(mine.explanation_id, KEY, -1, None, "changed my mind")
    kept = feedback_handlers.new_vote(other.explanation_id, OTHER, 1, None, None)
    for cmd in (replacing, kept):
        feedback_handlers.record_feedback(cmd, feedback_store.uow())
    assert _found(feedback_store, [KEY])  # the search finds what is there

    event, staged = feedback_handlers.erase_session(KEY, feedback_store.uow())

    assert staged and event.feedback_ids == [published.feedback_id]
    assert event.explanation_ids == [mine.explanation_id]
    bus = FakeBus()
    relay(feedback_store.factory, feedback_outbox, bus)
    # the replacing vote was not yet published: it never is; the other session's vote and the erasure are
    assert [(type(e).__name__, getattr(e, "session_key", None)) for e in bus.events] == [
        ("FeedbackRecorded", OTHER),
        ("FeedbackErased", KEY),
    ]
    assert _found(feedback_store, [KEY]) == []
    assert _found(feedback_store, [OTHER])  # the other session is untouched
    # the comments, by a fragment no id or time can hold by chance (a bare "7946" can sit in a random UUID)
    assert _found(feedback_store, ["changed my mind", "7946 0958"]) == []
    with feedback_store.uow() as uow:  # the erasure is remembered by its tag only
        assert uow.repo.erased_at(KEY) is not None
    assert _found(feedback_store, [erasure_tag(KEY)])


def test_an_explanation_event_arriving_after_its_session_was_erased_is_not_bound_to_it(
    feedback_store: FeedbackStore,
) -> None:
    earlier = _explanation(KEY)
    feedback_handlers.on_explanation_created(earlier, feedback_store.uow())
    feedback_handlers.erase_session(KEY, feedback_store.uow())
    relay(feedback_store.factory, feedback_outbox, FakeBus())  # the erasure's event keeps the key until sent
    late = _explanation(KEY, at=T0)  # served before the erasure, its event still on the way
    feedback_handlers.on_explanation_created(late, feedback_store.uow())
    assert feedback_handlers.served_session(feedback_store.uow(), late.explanation_id) == (True, None)
    bus = FakeBus()  # the erasure is announced again for it, so the router forgets it there too
    relay(feedback_store.factory, feedback_outbox, bus)
    [again] = bus.events
    assert isinstance(again, FeedbackErased) and again.session_key == KEY
    assert again.explanation_ids == [late.explanation_id] and again.feedback_ids == []
    assert _found(feedback_store, [KEY]) == []
    # a session that goes on after its erasure is served and votes as any other
    fresh = _explanation(KEY, at=utcnow() + timedelta(seconds=5))
    feedback_handlers.on_explanation_created(fresh, feedback_store.uow())
    assert feedback_handlers.served_session(feedback_store.uow(), fresh.explanation_id) == (True, KEY)


# -- router ----------------------------------------------------------------------------------------------------


@pytest.fixture
def router_store(tmp_path: Path) -> Iterator[RouterStore]:
    s = RouterStore(f"sqlite:///{tmp_path / 'router.db'}")
    router_handlers.ensure_seeded(s.uow(), MODEL)
    yield from disposed_after(s)


def _explain(store: RouterStore, tmp_path: Path, session: str) -> router_handlers.Explained:
    providers = ProviderSet(RouterSettings(data_dir=tmp_path, openai_api_key=None, groq_api_key=None))
    cmd = router_handlers.Explain(
        ticker="AAPL", signal="BUY", context={"note": "my secret note", "rsi": 28}, session_key=session
    )
    return router_handlers.create_explanation(cmd, store.uow(), providers, price_overrides={})


def test_router_keeps_the_cost_of_an_erased_sessions_explanations_and_nothing_of_the_session(
    router_store: RouterStore, tmp_path: Path
) -> None:
    sent = _explain(router_store, tmp_path, KEY)
    publish_staged(
        router_store.factory, router_outbox, FakeBus(), [sent.event]
    )  # published: the row stays in the outbox
    unsent = _explain(router_store, tmp_path, KEY)  # still waiting in the outbox (a broker outage)
    other = _explain(router_store, tmp_path, OTHER)
    publish_staged(router_store.factory, router_outbox, FakeBus(), [other.event])
    assert _found(router_store, [KEY, "my secret note"])

    erasure = _erased([], [sent.event.explanation_id])
    erased = router_handlers.on_feedback_erased(erasure, router_store.uow())

    assert erased == 2
    assert _found(router_store, [KEY]) == []
    for eid in (sent.event.explanation_id, unsent.event.explanation_id):
        row = router_handlers.get_explanation(router_store.uow(), eid)
        assert row is not None and router_handlers.explanation_erased(row)
        assert row["context"] == {} and row["prompt_text"] == row["text"] == ""
        assert row["cost_usd"] == sent.event.cost_usd and row["tokens_in"] > 0  # what the figures need stays
    other_row = router_handlers.get_explanation(router_store.uow(), other.event.explanation_id)
    assert other_row is not None and other_row["session_key"] == OTHER
    # the unpublished event is still published, without the session
    bus = FakeBus()
    relay(router_store.factory, router_outbox, bus)
    [event] = bus.events
    assert isinstance(event, ExplanationCreated) and event.explanation_id == unsent.event.explanation_id
    assert event.session_key is None and event.prompt_text == event.text == ""
    assert event.cost_usd == unsent.event.cost_usd
    assert _found(router_store, [KEY]) == []
    other_row = router_handlers.get_explanation(router_store.uow(), other.event.explanation_id)
    assert other_row is not None and other_row["context"]["note"] == "my secret note"  # the other session's data stays
    assert pending(router_store.factory, router_outbox) == []
    # a redelivery is recognised; a second erasure finds nothing left to erase
    assert router_handlers.on_feedback_erased(erasure, router_store.uow()) == 0
    assert router_handlers.on_feedback_erased(_erased([], []), router_store.uow()) == 0


# -- optimizer -------------------------------------------------------------------------------------------------


@pytest.fixture
def optimizer_store(tmp_path: Path) -> Iterator[OptimizerStore]:
    s = OptimizerStore(f"sqlite:///{tmp_path / 'optimizer.db'}")
    registry.ensure_seeded(s.uow(), MODEL)
    yield from disposed_after(s)


def test_optimizer_drops_the_sessions_votes_and_keeps_its_exposures_as_one_anonymous_unit(
    optimizer_store: OptimizerStore,
) -> None:
    exp_id = "exp-erase"
    *mine, theirs = _served(
        optimizer_handlers.on_explanation_created, optimizer_store.uow, KEY, KEY, KEY, OTHER, experiment=exp_id
    )
    votes = [_vote(mine[0], KEY), _vote(mine[1], KEY, -1), _vote(theirs, OTHER)]
    for v in votes:
        optimizer_handlers.on_feedback_recorded(v, optimizer_store.uow())

    def rows() -> dict[str, dict]:
        with optimizer_store.uow() as uow:
            return {r.unit: r.__dict__ for r in uow.repo.session_rows(exp_id, T0 - timedelta(hours=1))}

    before = rows()
    assert before[KEY]["votes"] == 2 and before[KEY]["explanations"] == 3

    # the event names only one of the two votes: the other, on an explanation served to it, goes too
    removed = optimizer_handlers.on_feedback_erased(
        _erased([votes[0].feedback_id], [mine[0].explanation_id], at=T0 + timedelta(minutes=1)),
        optimizer_store.uow(),
    )

    assert removed == 2
    after = rows()
    assert KEY not in after and after[OTHER] == before[OTHER]
    [(unit, anonymous)] = [(u, r) for u, r in after.items() if u != OTHER]
    assert (
        unit.startswith("erased-")
        and anonymous["explanations"] == 3
        and anonymous["cost_usd"] == pytest.approx(before[KEY]["cost_usd"])
    )
    assert anonymous.get("votes", 0) == 0
    # an explanation served before the erasure whose event arrives after it joins the same unit, without the key
    late = _explanation(KEY, at=T0, experiment=exp_id)
    optimizer_handlers.on_explanation_created(late, optimizer_store.uow())
    assert rows()[unit]["explanations"] == 4
    # a vote of the session redelivered late stays erased
    assert optimizer_handlers.on_feedback_recorded(votes[1], optimizer_store.uow()) == "duplicate"
    again = votes[1].model_copy(update={"message_id": uuid.uuid4()})
    assert optimizer_handlers.on_feedback_recorded(again, optimizer_store.uow()) == "erased"
    assert _found(optimizer_store, [KEY]) == []


# -- finetune --------------------------------------------------------------------------------------------------


@pytest.fixture
def finetune_store(tmp_path: Path) -> Iterator[FinetuneStore]:
    yield from disposed_after(FinetuneStore(f"sqlite:///{tmp_path / 'finetune.db'}"))


def test_finetune_keeps_no_key_and_no_prompt_of_an_erased_session(finetune_store: FinetuneStore) -> None:
    mine, theirs = _served(finetune_handlers.on_explanation_created, finetune_store.uow, KEY, OTHER)
    vote = _vote(mine, KEY)
    finetune_handlers.on_feedback_recorded(vote, finetune_store.uow())
    finetune_handlers.on_feedback_erased(
        _erased([vote.feedback_id], [mine.explanation_id], at=T0 + timedelta(minutes=1)), finetune_store.uow()
    )
    late = _explanation(KEY, at=T0)
    finetune_handlers.on_explanation_created(late, finetune_store.uow())
    with finetune_store.factory() as s:
        texts = {r.explanation_id: (r.prompt_text, r.text) for r in s.execute(select(finetune_explanations))}
    assert texts[str(mine.explanation_id)] == texts[str(late.explanation_id)] == ("", "")
    assert texts[str(theirs.explanation_id)] == (theirs.prompt_text, theirs.text)
    assert _found(finetune_store, [KEY]) == []
    with finetune_store.uow() as uow:
        assert uow.repo.is_erased(KEY) and not uow.repo.is_erased(OTHER)
    # a vote of the erased session that arrives later is not kept
    late_vote = _vote(mine, KEY).model_copy(update={"message_id": uuid.uuid4()})
    assert finetune_handlers.on_feedback_recorded(late_vote, finetune_store.uow()) == "erased"


# -- dead letters ----------------------------------------------------------------------------------------------


def test_dead_letters_lose_the_session_except_the_erasure_itself(optimizer_store: OptimizerStore) -> None:
    from shared.deadletter import FAILED

    exp = _explanation(KEY, experiment="exp-dl")
    vote = _vote(exp, KEY)
    earlier_erasure = _erased([vote.feedback_id], [exp.explanation_id])
    letters = optimizer_store.dead_letters
    for task, message in [
        ("optimizer.on_explanation_created", exp),
        ("optimizer.on_feedback_recorded", vote),
        ("optimizer.on_feedback_erased", earlier_erasure),
        ("optimizer.on_feedback_recorded", _vote(exp, OTHER)),
    ]:
        letters.add(task, reason=FAILED, error="boom", payload=message.to_payload())

    optimizer_handlers.on_feedback_erased(_erased([vote.feedback_id], [exp.explanation_id]), optimizer_store.uow())

    kept = {d["task"]: d["payload"] for d in letters.list()}
    assert sorted(d["task"] for d in letters.list()) == [
        "optimizer.on_explanation_created",
        "optimizer.on_feedback_erased",  # the erasure is kept, to be replayed
        "optimizer.on_feedback_recorded",  # the other session's vote
    ]
    replayable = ExplanationCreated.from_payload(kept["optimizer.on_explanation_created"])
    assert replayable.session_key is None and replayable.prompt_text == replayable.text == ""
    assert kept["optimizer.on_feedback_recorded"]["session_key"] == OTHER
    assert _found(optimizer_store, [KEY]) == ["optimizer.db:dead_letters.payload"]


def test_optimizer_and_dashboard_keep_the_latest_erasure_of_a_vote(
    optimizer_store: OptimizerStore, tmp_path: Path
) -> None:
    from services.dashboard.store import Store as DashboardStore

    vote = uuid.uuid4()
    later, earlier = T0 + timedelta(hours=2), T0 + timedelta(hours=1)

    def remembered(uow: Callable[[], Any], erase: Callable[[Any, datetime], object], read: Callable[[Any], Any]) -> Any:
        """What `read` finds in the store's repository after `erase` of the vote at `later`, then `earlier`."""
        for at in (later, earlier):  # the older erasure arrives last
            with uow() as u:
                erase(u.repo, at)
                u.commit()
        with uow() as u:
            return read(u.repo)

    in_optimizer = remembered(
        optimizer_store.uow,
        lambda repo, at: repo.remember_erased([str(vote)], at),
        lambda repo: repo.vote_erased_at(vote),
    )
    assert in_optimizer is not None and as_utc(in_optimizer) == later

    dashboard = DashboardStore(f"sqlite:///{tmp_path / 'dashboard.db'}")
    try:
        in_dashboard = remembered(
            dashboard.uow, lambda repo, at: repo.erase_votes([str(vote)], at), lambda repo: repo.erased_at(vote)
        )
        assert in_dashboard is not None and as_utc(in_dashboard) == later
    finally:
        dashboard.dispose()
