"""`shared.answers.BodyLimits`: the rules every adapter reads an answer body by (size cap, deadline, error bodies
read only for their message)."""

from __future__ import annotations

import time

import pytest

from shared.answers import MAX_ANSWER_BYTES, MAX_ERROR_BYTES, AnswerCut, BodyLimits

LATER, EARLIER = time.monotonic() + 3600, time.monotonic() - 1


def test_an_answer_in_time_and_within_the_cap_is_kept_whole() -> None:
    limits = BodyLimits(200, LATER, 5.0)
    assert limits.take(b"x" * (MAX_ANSWER_BYTES - 1)) == (b"x" * (MAX_ANSWER_BYTES - 1), False)
    assert limits.take(b"y") == (b"y", False)
    with pytest.raises(AnswerCut, match=f"larger than {MAX_ANSWER_BYTES} bytes") as cut:
        limits.take(b"z")
    assert (cut.value.kind, cut.value.transient) == ("bad_response", False)


def test_an_answer_still_arriving_at_the_deadline_is_cut_unless_this_piece_completes_it() -> None:
    assert BodyLimits(200, EARLIER, 0.3).take(b"end", complete=True) == (b"end", False)
    with pytest.raises(AnswerCut, match="still arriving after 0.3 s") as cut:
        BodyLimits(200, EARLIER, 0.3).take(b"more")
    assert (cut.value.kind, cut.value.transient) == ("timeout", True)


def test_an_error_body_is_only_read_no_further() -> None:
    big = BodyLimits(503, LATER, 5.0)
    assert big.take(b"e" * (MAX_ERROR_BYTES + 10)) == (b"e" * MAX_ERROR_BYTES, True)
    assert BodyLimits(503, EARLIER, 5.0).take(b"late") == (b"late", True)
