"""Message ids come from the operating system's generator: reseeding Python's `random` (as training does with
`set_seed(0)`) or forking a worker never repeats them."""

from __future__ import annotations

import os
import random
import uuid

import pytest

from shared.contracts import FeedbackErased, new_id, utcnow


def _erased() -> FeedbackErased:
    return FeedbackErased(session_key="k", feedback_ids=[], explanation_ids=[], erased_at=utcnow())


def test_reseeding_the_global_generator_does_not_repeat_ids() -> None:
    random.seed(0)
    first = [new_id() for _ in range(300)]  # more than one pool's worth
    random.seed(0)
    second = [new_id() for _ in range(300)]
    assert not set(first) & set(second)
    assert len(set(first)) == 300


def test_ids_are_version_4_uuids_and_default_message_ids() -> None:
    ids = [new_id() for _ in range(50)]
    assert all(i.version == 4 and i.variant == uuid.RFC_4122 for i in ids)
    a, b = _erased(), _erased()
    assert a.message_id != b.message_id


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_hands_out_its_parents_ids() -> None:
    new_id()  # the parent has a pool with ids left in it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, b"".join(new_id().bytes for _ in range(20)))
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    child = {uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)}
    parent = {new_id() for _ in range(20)}
    assert len(child) == 20 and not child & parent


def test_a_message_with_a_later_schema_version_is_refused() -> None:
    from pydantic import ValidationError

    payload = _erased().to_payload()
    assert FeedbackErased.from_payload(payload).schema_version == 1
    with pytest.raises(ValidationError, match="unknown schema version 2"):
        FeedbackErased.from_payload({**payload, "schema_version": 2})
