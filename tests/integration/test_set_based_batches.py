"""Set-based batch handlers (a few statements per batch) leave exactly what the one-message handlers leave when
they digest the same messages one after the other: the same outcomes, in order, and the same rows in every
table. And a set-based handler that fails falls back to one message at a time, so a bad message is rolled
back alone."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.dashboard import handlers as dashboard
from services.dashboard.store import Store as DashboardStore
from services.feedback import handlers as feedback
from services.feedback.store import Store as FeedbackStore
from services.finetune import handlers as finetune
from services.finetune.store import Store as FinetuneStore
from services.optimizer import handlers as optimizer
from services.optimizer.store import Store as OptimizerStore
from shared.contracts import ExplanationCreated, FeedbackErased, FeedbackRecorded, RecordFeedback
from shared.db import run_batch, run_in_one_transaction
from shared.privacy import session_key
from tests.support import explanation_created

T = datetime.now(UTC) - timedelta(hours=1)
#: Columns that hold the time a row was written: they differ between two runs and are left out of the comparison.
WRITE_TIMES = {"stored_at", "handled_at", "received_at", "at", "occurred_at"}


def key(name: str) -> str:
    return session_key(name, b"k")


def vote(eid: uuid.UUID, session: str, minutes: int, rating: int = 1, **fields: Any) -> RecordFeedback:
    cmd = feedback.new_vote(eid, key(session), rating, None, None, submitted_at=T + timedelta(minutes=minutes))  # type: ignore[arg-type]
    return cmd.model_copy(update=fields) if fields else cmd


def state(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table, without the write times (and the outbox's created_at), sorted."""
    out: dict[str, list[tuple]] = {}
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            cur = conn.execute(f"select * from {table}")  # noqa: S608 - the store's own table names
            names = [d[0] for d in cur.description]
            rows = []
            for row in cur.fetchall():
                values = []
                for name, value in zip(names, row, strict=True):
                    if name in WRITE_TIMES or (table == "outbox" and name == "created_at"):
                        continue
                    if table == "outbox" and name == "payload":
                        value = {k: v for k, v in json.loads(value).items() if k not in WRITE_TIMES}
                        value = json.dumps(value, sort_keys=True)
                    values.append(value)
                rows.append(tuple(values))
            out[table] = sorted(rows, key=repr)
    return out


def both_ways(
    tmp_path: Path,
    make_store: Callable[[str], Any],
    prepare: Callable[[Any], None],
    batch: Sequence[Any],
    each: Callable[[Any, Any], Any],
    many: Callable[[list[Any], Any], list[Any]],
) -> tuple[list[Any], list[Any], dict, dict]:
    """The batch digested one message at a time and set-based, each on its own copy of a store `prepare`d.
    Returns (outcomes one at a time, outcomes set-based, state one at a time, state set-based)."""
    base = make_store(f"sqlite:///{tmp_path / 'base.db'}")
    prepare(base)
    base.dispose()
    results = []
    for name in ("each", "many"):
        db = tmp_path / f"{name}.db"
        with sqlite3.connect(tmp_path / "base.db") as source, sqlite3.connect(db) as copy:
            source.backup(copy)
        store = make_store(f"sqlite:///{db}")
        if name == "each":
            outcomes = run_in_one_transaction(store.uow(), batch, each)
            assert all(ok for ok, _ in outcomes), outcomes
            results.append([value for _, value in outcomes])
        else:
            results.append(many(list(batch), store.uow()))
        store.dispose()
    return results[0], results[1], state(tmp_path / "each.db"), state(tmp_path / "many.db")


def test_a_mixed_batch_of_votes_gives_what_the_votes_one_by_one_give(tmp_path: Path) -> None:
    e1, e2, e3, unbound, forgotten = (uuid.uuid4() for _ in range(5))
    unknown = uuid.uuid4()
    earlier = vote(e3, "s3", 10)

    def prepare(store: FeedbackStore) -> None:
        for eid, session in ((e1, "s1"), (e2, "s2"), (e3, "s3"), (forgotten, "s4")):
            feedback.on_explanation_created(explanation_created(eid, key(session)), store.uow())
        feedback.on_explanation_created(explanation_created(unbound, None), store.uow())
        assert feedback.record_feedback(earlier, store.uow()) == "stored"
        assert feedback.record_feedback(vote(e3, "s1", 1), store.uow()) == "other_session"  # a count to add to
        feedback.erase_session(key("s4"), store.uow())  # held a served explanation: a permanent erasure
        feedback.erase_session(key("s5"), store.uow())  # held nothing: a tombstone

    first = vote(e1, "s1", 5, comment="fine", stars=4)
    batch = [
        first,
        first,  # the queue delivered it twice: a duplicate within the batch
        vote(e1, "s1", 7, rating=-1),  # the same session again, newer: replaces
        vote(e1, "s1", 6),  # older than the one before it in the batch: stale
        vote(e1, "s2", 8),  # another session's vote on e1: refused
        vote(e2, "s2", 3),
        vote(e2, "s2", 3, rating=-1),  # the same time as the one before: replaces it
        vote(unknown, "s1", 2),  # explanation not (yet) known: quarantined
        vote(unknown, "s2", 2),
        vote(unbound, "s1", 2),  # served to no session: refused
        vote(forgotten, "s4", 2),  # cast before its session was erased
        vote(e1, "s5", 2),  # a tombstoned session
        earlier,  # handled before this batch: a duplicate
        vote(e3, "s3", 5),  # older than the vote stored before the batch: stale
        vote(e3, "s3", 12, stars=2),  # newer: replaces it
        vote(e3, "s2", 12),  # refused, counted on top of the earlier refusal
        vote(e3, "s3", 13),
    ]
    one_by_one, set_based, before, after = both_ways(
        tmp_path, FeedbackStore, prepare, batch, feedback.record_feedback, feedback.record_feedback_batch
    )
    assert one_by_one == [
        "stored", "duplicate", "replaced", "stale", "other_session", "stored", "replaced", "quarantined",
        "quarantined", "unbound_explanation", "erased", "erased", "duplicate", "stale", "replaced",
        "other_session", "replaced",
    ]  # fmt: skip
    assert set_based == one_by_one
    assert after == before
    assert len(after["feedback"]) == 3 and len(after["quarantine"]) == 2
    assert sorted(after["dropped_votes"]) == [("other_session", 3), ("unbound_explanation", 1)]


def recorded(fid: uuid.UUID, eid: uuid.UUID, minutes: int, rating: int = 1, **fields: Any) -> FeedbackRecorded:
    values: dict[str, Any] = {
        "feedback_id": fid,
        "explanation_id": eid,
        "session_key": key("s"),
        "rating": rating,
        "stars": None,
        "has_comment": False,
        "replaced": False,
        "submitted_at": T + timedelta(minutes=minutes),
        "prompt_name": "explain_signal",
        "prompt_version": "v1.0",
        "model": "offline/template-v1",
        "signal": "HOLD",
        "ticker": "IBM",
        "experiment_id": None,
        "arm_id": None,
    }
    return FeedbackRecorded.model_validate(values | fields)


def recorded_batch() -> tuple[list[FeedbackRecorded], list[uuid.UUID], FeedbackRecorded, FeedbackErased]:
    """A mixed batch of FeedbackRecorded for a downstream store: explanations e0 and e1 known, e2 not; the
    vote f3 stored before the batch, f4 erased before it."""
    eids = [uuid.uuid4() for _ in range(3)]
    f = [uuid.uuid4() for _ in range(6)]
    earlier = recorded(f[3], eids[1], 10)
    erased = FeedbackErased(
        session_key=key("gone"), feedback_ids=[f[4]], explanation_ids=[], erased_at=T + timedelta(minutes=30)
    )
    first = recorded(f[0], eids[0], 5, stars=3, experiment_id="x1", arm_id="a")
    batch = [
        first,
        first,  # twice in the batch
        recorded(f[0], eids[0], 7, rating=-1, replaced=True),
        recorded(f[0], eids[0], 6),  # stale within the batch
        recorded(f[1], eids[1], 3),
        recorded(f[2], eids[2], 3, has_comment=True),  # its explanation has not arrived
        earlier,  # handled before the batch
        recorded(f[3], eids[1], 4),  # older than the stored vote: stale
        recorded(f[3], eids[1], 11, rating=-1, replaced=True),
        recorded(f[4], eids[1], 20, session_key=key("gone")),  # cast before its erasure
        recorded(f[4], eids[1], 40, session_key=key("gone")),  # after it: counts, but not for training
        recorded(f[5], eids[0], 1),
    ]
    return batch, eids, earlier, erased


@pytest.mark.parametrize(
    ("make_store", "handlers", "erased_session"),
    [
        (OptimizerStore, optimizer, ["erased", "stored"]),
        (DashboardStore, dashboard, ["erased", "stored"]),
        (FinetuneStore, finetune, ["erased", "erased"]),  # an erased session gives no training data again
    ],
    ids=["optimizer", "dashboard", "finetune"],
)
def test_a_mixed_batch_of_recorded_votes_gives_what_one_by_one_gives(
    tmp_path: Path, make_store: Callable[[str], Any], handlers: Any, erased_session: list[str]
) -> None:
    """For the optimizer's votes, the dashboard's read model (its explanations' vote totals and its revision
    included) and the fine-tuning material."""
    batch, eids, earlier, erased = recorded_batch()

    def prepare(store: Any) -> None:
        for eid in eids[:2]:
            handlers.on_explanation_created(explanation_created(eid, key("s")), store.uow())
        handlers.on_feedback_recorded(earlier, store.uow())
        handlers.on_feedback_erased(erased, store.uow())

    one_by_one, set_based, before, after = both_ways(
        tmp_path, make_store, prepare, batch, handlers.on_feedback_recorded, handlers.on_feedback_recorded_batch
    )
    expected = ["stored", "duplicate", "replaced", "stale", "stored", "stored", "duplicate", "stale", "replaced"]
    assert one_by_one == [*expected, *erased_session, "stored"]
    assert set_based == one_by_one
    assert after == before


def created(eid: uuid.UUID, session: str | None, minutes: int, **fields: Any) -> ExplanationCreated:
    return explanation_created(
        eid, key(session) if session else None, created_at=T + timedelta(minutes=minutes), **fields
    )


def created_batch() -> tuple[list[ExplanationCreated], list[uuid.UUID], ExplanationCreated]:
    """A mixed batch of ExplanationCreated: k (the first id) known before the batch under another message (the
    earlier one returned, handled before the batch too); n1 twice under one message id and once under another;
    n2 served to session "gone" before its erasure (at T + 30 min downstream, T + 60 at the feedback service), n3
    served to it after; n4 served to no session; n5 served to session "ghost" before its erasure, in an
    experiment this store has never heard of, written by a fallback model."""
    eids = [uuid.uuid4() for _ in range(6)]
    k, n1, n2, n3, n4, n5 = eids
    earlier = created(k, "s1", 1)
    first = created(n1, "s1", 2, experiment_id="x1", arm_id="a", cost_usd=0.002, latency_ms=40.0)
    batch = [
        first,
        first,  # twice in the batch
        earlier,  # handled before the batch
        created(k, "s1", 1),  # its explanation known before the batch, under another message id
        created(n1, "s1", 2, experiment_id="x1", arm_id="a", cost_usd=0.002, latency_ms=40.0),  # n1 again
        created(n2, "gone", 10, signal="BUY"),
        created(n3, "gone", 120, signal="SELL"),
        created(n4, None, 3),
        created(n5, "ghost", 20, experiment_id="unknown", arm_id="z", fallback_used=True, model="groq/llama"),
    ]
    return batch, eids, earlier


def erasure(session: str, minutes: int, *explanations: uuid.UUID) -> FeedbackErased:
    return FeedbackErased(
        session_key=key(session),
        feedback_ids=[],
        explanation_ids=list(explanations),
        erased_at=T + timedelta(minutes=minutes),
    )


ADDED = [True, False, False, False, False, True, True, True, True]


@pytest.mark.parametrize(
    ("make_store", "handlers", "outcomes", "probe", "probed"),
    [
        # n2, n5 and the explanation served to "gone" before the batch: in two anonymous units
        (OptimizerStore, optimizer, ADDED, "count(distinct session_key), count(*) from exposure_units"
         " where session_key like 'erased-%'", (2, 3)),
        # the votes on n1, n4 (before the batch) and k (after it): counted on their explanations
        (DashboardStore, dashboard, ["stored", "duplicate", "duplicate", "known", "known", *["stored"] * 4],
         "sum(votes), sum(positives), sum(stars_sum) from explanations", (4, 3, 10)),
        # n2 and n5 without prompt and text
        (FinetuneStore, finetune, ADDED, "count(*) from explanations where text = '' and prompt_text = ''", (2,)),
    ],
    ids=["optimizer", "dashboard", "finetune"],
)  # fmt: skip
def test_a_mixed_batch_of_explanations_gives_what_one_by_one_gives(
    tmp_path: Path,
    make_store: Callable[[str], Any],
    handlers: Any,
    outcomes: list[Any],
    probe: str,
    probed: tuple[int, ...],
) -> None:
    """The optimizer's exposures and their units (an erased session's anonymous one), the dashboard's read model
    (with the vote totals of votes that arrived first, and its revision), the fine-tuning material (blanked for
    an erased session)."""
    batch, eids, earlier = created_batch()
    k, n1, n2, n3, n4, _ = eids

    def prepare(store: Any) -> None:
        handlers.on_explanation_created(earlier, store.uow())
        handlers.on_explanation_created(created(uuid.uuid4(), "gone", 5), store.uow())  # the session had one before
        handlers.on_feedback_erased(erasure("gone", 30, n2), store.uow())
        handlers.on_feedback_erased(erasure("ghost", 30), store.uow())
        for fid, eid, session, rating in ((1, n1, "s1", 1), (2, n1, "s2", -1), (3, n4, "s3", 1), (4, k, "s1", 1)):
            # votes that arrived before their explanation (k: after it)
            vote = recorded(uuid.UUID(int=fid), eid, 4, rating, session_key=key(session), stars=fid)
            assert handlers.on_feedback_recorded(vote, store.uow()) == "stored"

    one_by_one, set_based, before, after = both_ways(
        tmp_path, make_store, prepare, batch, handlers.on_explanation_created, handlers.on_explanation_created_batch
    )
    assert one_by_one == outcomes
    assert set_based == one_by_one
    assert after == before
    with sqlite3.connect(tmp_path / "many.db") as conn:
        assert conn.execute(f"select {probe}").fetchone() == probed  # noqa: S608 - the test's own SQL


def test_a_mixed_batch_of_explanations_at_the_feedback_service_gives_what_one_by_one_gives(tmp_path: Path) -> None:
    """The replica, with the votes that waited in the quarantine released in the order they came (stored,
    replaced, stale, refused, dropped for an erased session), and the erasure announced again for an explanation
    served before its session's erasure (a permanent one and a tombstone)."""
    batch, eids, earlier = created_batch()
    k, n1, n2, n3, n4, n5 = eids
    waiting = [
        vote(n1, "s1", 5, stars=4),
        vote(n1, "s1", 7, rating=-1),  # replaces the one before
        vote(n1, "s1", 6),  # older than the one before it: stale
        vote(n1, "s2", 8),  # another session's: refused
        vote(n2, "s3", 4),  # n2 was served before its session's erasure: bound to none, refused
        vote(n3, "gone", 125),  # after the erasure: the session counts again
        vote(n4, "s1", 3),  # served to no session: refused
        vote(n5, "ghost", 90),  # after the tombstone, on an explanation served before it: refused
        vote(uuid.uuid4(), "s1", 2),  # its explanation is not in the batch: stays
    ]

    def prepare(store: FeedbackStore) -> None:
        feedback.on_explanation_created(earlier, store.uow())
        feedback.on_explanation_created(created(uuid.uuid4(), "gone", 5), store.uow())
        feedback.erase_session(key("gone"), store.uow())  # held an explanation: a permanent erasure
        feedback.erase_session(key("ghost"), store.uow())  # held nothing: a tombstone
        assert [feedback.record_feedback(v, store.uow()) for v in waiting] == ["quarantined"] * len(waiting)
        # Cast before its session's erasure and still in the quarantine: not reachable through the handlers (an
        # erasure takes the session's quarantined votes), the rule is kept all the same.
        early = vote(n5, "ghost", 25)
        with store.uow() as uow:
            uow.repo.quarantine(early.message_id, early.to_payload(), "explanation not yet known")
            uow.commit()

    one_by_one, set_based, before, after = both_ways(
        tmp_path, FeedbackStore, prepare, batch, feedback.on_explanation_created, feedback.on_explanation_created_batch
    )
    assert one_by_one == [4, 0, 0, 0, 0, 1, 1, 1, 2]
    assert set_based == one_by_one
    assert after == before
    assert len(after["quarantine"]) == 1 and len(after["feedback"]) == 2
    assert sorted(after["dropped_votes"]) == [("other_session", 1), ("unbound_explanation", 3)]
    assert [row[2] for row in after["audit"]].count("drop_vote_of_erased_session") == 1
    staged = sorted(row[1] for row in after["outbox"])
    assert staged == ["feedback.erased"] * 3 + ["feedback.recorded"] * 3  # one erasure staged before the batch
    assert len(after["served_to"]) == 3  # k, n1, n3: not n2 nor n5 (erased), nor n4 (no session)


def test_a_set_based_handler_that_fails_falls_back_to_one_message_at_a_time(tmp_path: Path) -> None:
    """The set-based handler raises (here: because of one bad message); its work is rolled back and the batch
    is digested one message at a time, where the bad message fails alone and the others are stored."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    eids = [uuid.uuid4() for _ in range(4)]
    for i, eid in enumerate(eids):
        feedback.on_explanation_created(explanation_created(eid, key(f"s{i}")), store.uow())
    votes = [vote(eid, f"s{i}", 1) for i, eid in enumerate(eids)]
    poison = votes[2]

    def many(cmds: list[RecordFeedback], uow: Any) -> list[str]:
        outcomes = feedback.record_feedback_batch(cmds, uow)  # everything written, then:
        if poison in cmds:
            raise RuntimeError("poison")
        return outcomes

    def each(cmd: RecordFeedback, uow: Any) -> str:
        if cmd is poison:
            raise RuntimeError("poison")
        return feedback.record_feedback(cmd, uow)

    results = run_batch(store.uow(), votes, many, each)
    assert [ok for ok, _ in results] == [True, True, False, True]
    assert [value for ok, value in results if ok] == ["stored"] * 3
    db = tmp_path / "feedback.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from feedback").fetchone()[0] == 3
        assert conn.execute("select count(*) from processed_messages").fetchone()[0] == 4 + 3
        assert conn.execute("select count(*) from outbox where event_type = 'feedback.recorded'").fetchone()[0] == 3
    # and a batch the set-based handler digests: the same outcomes as one by one
    assert run_batch(store.uow(), votes, feedback.record_feedback_batch, feedback.record_feedback) == [
        (True, "duplicate"),
        (True, "duplicate"),
        (True, "stored"),
        (True, "duplicate"),
    ]
    store.dispose()
