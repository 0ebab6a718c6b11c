"""Votes many to a message from the intake (`GroupCommitSender`; `feedback.record` is in `MANY_TO_A_MESSAGE`):
the votes of one group commit go as task messages of up to `TASK_BATCH_SIZE` votes, each vote journalled on
its own; an erasure rewrites a message without the session's votes, or removes it when none is left, and a
real worker stores the rest."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from bench.traces import found_in_redis
from gateway.redis_server import RedisServer
from services.feedback import handlers
from services.feedback.intake import _REPLACE_LUA, GroupCommitSender, IntakeJournal, task_payload
from services.feedback.store import Store
from shared.bus import declare_topology, make_celery
from shared.contracts import RecordFeedback, utcnow
from shared.privacy import session_key
from shared.settings import ServiceSettings
from tests.support import celery_worker, explanation_created, wait_for, worker_env


def _send(redis_url: str, tmp_path: Path, votes: list[RecordFeedback]) -> None:
    """The votes through one sender with its journal, all at once: one group commit."""
    app = make_celery("feedback", ServiceSettings(redis_url=redis_url, data_dir=tmp_path))
    declare_topology(app)

    async def send() -> None:
        sender = GroupCommitSender(app, journal=IntakeJournal(redis_url, "feedback"))
        await asyncio.gather(*(sender.send(v) for v in votes))
        await sender.aclose()

    asyncio.run(send())


def _vote(session: str) -> RecordFeedback:
    return handlers.new_vote(uuid.uuid4(), session_key(session, b"k"), 1, None, None)


def _queued(r: redis.Redis) -> list[dict[str, Any]]:
    """The queue's task messages, oldest first: task id and payloads."""
    out = []
    for raw in reversed(r.lrange("feedback", 0, -1)):
        envelope = json.loads(raw)
        kwargs = json.loads(base64.b64decode(envelope["body"]))[1]
        payloads = kwargs["payloads"] if "payloads" in kwargs else [kwargs["payload"]]
        out.append({"id": envelope["headers"]["id"], "votes": [p["message_id"] for p in payloads]})
    return out


def test_a_group_commits_votes_go_in_messages_of_up_to_the_batch_size_and_each_is_journalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASK_BATCH_SIZE", "4")
    votes = [_vote(f"s{i}") for i in range(10)]
    with RedisServer(tmp_path / "redis") as server:
        _send(server.url, tmp_path, votes)
        r = redis.Redis.from_url(server.url)
        queued = _queued(r)
        assert [len(m["votes"]) for m in queued] == [4, 4, 2]
        assert [v for m in queued for v in m["votes"]] == [str(v.message_id) for v in votes]  # in order
        journal = cast("dict[bytes, bytes]", r.hgetall("journal:feedback"))
        assert {k.decode() for k in journal} == {str(v.message_id) for v in votes}
        for v in votes:
            assert task_payload(journal[str(v.message_id).encode()].partition(b"|")[2]) == v.to_payload()
        r.close()


@pytest.mark.slow
def test_an_erasure_rewrites_a_message_without_the_sessions_votes_and_the_worker_stores_the_rest(
    tmp_path: Path,
) -> None:
    mine = [_vote("erased"), _vote("erased")]
    theirs = [_vote(f"other{i}") for i in range(3)]
    alone = _vote("erased")
    with RedisServer(tmp_path / "redis") as server:
        _send(server.url, tmp_path, [mine[0], theirs[0], mine[1], theirs[1], theirs[2]])
        _send(server.url, tmp_path, [alone])  # a message of its own: the session's only
        r = redis.Redis.from_url(server.url)
        before = _queued(r)
        assert [len(m["votes"]) for m in before] == [5, 1]

        journal = IntakeJournal(server.url, "feedback")
        key = session_key("erased", b"k")
        assert journal.forget_session([key], utcnow() + timedelta(seconds=1), queue="feedback") == 3
        journal.close()

        after = _queued(r)
        assert after == [{"id": before[0]["id"], "votes": [str(v.message_id) for v in theirs]}]
        assert {k.decode() for k in cast("list[bytes]", r.hkeys("journal:feedback"))} == {
            str(v.message_id) for v in theirs
        }
        assert [
            h for h in found_in_redis(server.url, [key]) if h.split(" ")[0] in ("feedback", "journal:feedback")
        ] == []

        store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
        for v in theirs:  # the explanations the votes are on, served to their sessions
            handlers.on_explanation_created(explanation_created(v.explanation_id, v.session_key), store.uow())
        store.dispose()
        with celery_worker("feedback", worker_env(server.url, tmp_path), tmp_path / "worker.log"):
            wait_for(lambda: r.hlen("journal:feedback") == 0, timeout_s=30, what="the three votes stored")
        store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
        with store.reader() as uow:
            stored = uow.repo.votes_submitted_at(str(v.feedback_id) for v in [*mine, *theirs, alone])
        store.dispose()
        assert set(stored) == {str(v.feedback_id) for v in theirs}
        r.close()


def test_a_message_changed_since_it_was_read_is_left_as_it_is(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        r = redis.Redis.from_url(server.url)
        r.lpush("q", b"b", b"a")
        replace = r.register_script(_REPLACE_LUA)
        assert replace(keys=["q"], args=[b"gone", b"x"]) == 0
        assert replace(keys=["q"], args=[b"b", b"B"]) == 1
        assert replace(keys=["q"], args=[b"a", b""]) == 1
        assert r.lrange("q", 0, -1) == [b"B"]
        r.close()


def test_a_message_another_erasure_rewrote_meanwhile_is_read_again_and_rewritten(tmp_path: Path) -> None:
    from services.feedback.intake import _without, forget_in_queue

    mine, first, second = _vote("erased"), _vote("first"), _vote("second")
    with RedisServer(tmp_path / "redis") as server:
        _send(server.url, tmp_path, [first, mine, second])
        r = redis.Redis.from_url(server.url)
        real = r.register_script

        class RacingScript:
            """Before the first change applies, another erasure rewrites the message (takes `first` out)."""

            def __init__(self, script: Any) -> None:
                self.script, self.raced = script, False

            def __call__(self, keys: list[str], args: list[bytes]) -> Any:
                if not self.raced:
                    self.raced = True
                    (raw,) = cast("list[bytes]", r.lrange("feedback", 0, -1))
                    other, _ = _without(raw, {str(first.message_id)})
                    cast(Any, r).lset("feedback", 0, other)
                return self.script(keys=keys, args=args)

        client = cast(Any, r)
        client.register_script = lambda text: RacingScript(real(text))
        assert forget_in_queue(client, "feedback", {str(mine.message_id)}) == 1
        assert _queued(r)[0]["votes"] == [str(second.message_id)]
        r.close()


def test_messages_removed_by_the_reading_do_not_let_the_next_ones_slip_past_it(tmp_path: Path) -> None:
    from services.feedback.intake import forget_in_queue

    first, alone_1, alone_2, last = _vote("erased"), _vote("erased"), _vote("erased"), _vote("erased")
    other = _vote("other")
    with RedisServer(tmp_path / "redis") as server:
        for group in ([first], [last, other], [alone_1], [alone_2]):  # the head is the last sent
            _send(server.url, tmp_path, group)
        r = redis.Redis.from_url(server.url)
        erased = {str(v.message_id) for v in (first, alone_1, alone_2, last)}
        # read two messages at a time: the two at the head are removed, so the next two move into their places
        assert forget_in_queue(cast(Any, r), "feedback", erased, chunk=2) == 4
        assert [m["votes"] for m in _queued(r)] == [[str(other.message_id)]]
        r.close()
