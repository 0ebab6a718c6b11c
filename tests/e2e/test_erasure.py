"""Erasure over HTTP with the whole system running: a session asks for explanations and votes, is erased, and
afterwards nothing of it is found in any service's store (every column of every table of every SQLite file),
in any outbox, in the intake journal or on any queue."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from gateway.run import Stack
from shared.privacy import session_key
from shared.ratelimit import COUNTER_PREFIX
from tests.conftest import FAST_ENV
from tests.support import found_in_redis, found_in_sqlite, wait_for

pytestmark = pytest.mark.slow


def _stores(stack: Stack) -> list[Path]:
    return sorted(Path(stack.data_dir).glob("*.db"))


def test_an_erased_sessions_key_is_found_in_no_store_outbox_journal_or_queue(stack: Stack) -> None:
    session = f"erase-e2e-{uuid.uuid4()}"
    marker = f"private-note-{uuid.uuid4().hex[:8]}"
    key = session_key(session, FAST_ENV["SESSION_HASH_KEY"].encode())
    needles = [key, session, marker]
    with httpx.Client(base_url=stack.url, timeout=15) as client:
        served = []
        for ticker in ("AAPL", "MSFT"):
            res = client.post(
                "/api/explanations",
                json={"ticker": ticker, "signal": "BUY", "context": {"note": marker, "rsi": 30}, "session_id": session},
            )
            assert res.status_code == 201, res.text
            served.append(res.json()["explanation_id"])

        def voted() -> bool:  # the feedback service learns of the explanations from their events
            codes = [
                client.post(
                    f"/api/feedback/{eid}", json={"rating": 1, "stars": 4, "comment": marker, "session_id": session}
                ).status_code
                for eid in served
            ]
            assert all(c in (202, 403, 404) for c in codes), codes
            return codes == [202, 202]

        wait_for(voted, timeout_s=30, what="votes accepted")

        def everywhere() -> list[str]:  # its explanations in every service, its votes stored (and replicated)
            hits = set(found_in_sqlite(_stores(stack), needles))
            wanted = {
                "router.db:explanations.session_key",
                "feedback.db:feedback.session_key",
                "feedback.db:feedback.comment",
                "optimizer.db:exposure_units.session_key",
                "finetune.db:votes.session_key",
                "finetune.db:explanations.prompt_text",
            }
            return sorted(hits) if hits >= wanted else []

        wait_for(everywhere, timeout_s=60, what="the session's explanations and votes in every service")

        res = client.delete(f"/api/feedback/sessions/{session}")
        assert res.status_code == 200, res.text
        assert res.json() == {"erased": True, "votes_erased": 2}

        wait_for(
            lambda: found_in_sqlite(_stores(stack), needles) == [],
            timeout_s=60,
            what="no trace of the erased session in any store",
        )
        for eid in served:  # the explanations' cost stays; their text went with the session
            assert client.get(f"/api/explanations/{eid}").status_code == 410
    # Redis: nothing in the intake journal or on any queue; only the rate-limit counters name the key, and
    # they expire with their window.
    hits = found_in_redis(stack.env["REDIS_URL"], needles)
    assert [h for h in hits if not h.startswith(COUNTER_PREFIX)] == []
    assert all(int(h.rsplit("ttl=", 1)[1]) > 0 for h in hits)
    assert found_in_sqlite(_stores(stack), needles) == []
