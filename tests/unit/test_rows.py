"""`from_row`: a dataclass from the keys of a row that name its fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shared.rows import from_row


@dataclass(frozen=True)
class Thing:
    name: str
    size: int
    note: str = ""
    tags: list[str] = field(default_factory=list)


def test_the_keys_that_name_fields_fill_them_and_the_others_are_ignored() -> None:
    assert from_row(Thing, {"name": "a", "size": 2, "colour": "red"}) == Thing("a", 2)


def test_overrides_win_over_the_row_and_a_field_in_neither_takes_its_default() -> None:
    thing = from_row(Thing, {"name": "a", "size": 2, "note": "stored"}, note="computed", tags=["x"])
    assert thing == Thing("a", 2, note="computed", tags=["x"])


def test_a_required_field_missing_from_both_is_an_error() -> None:
    with pytest.raises(TypeError, match="size"):
        from_row(Thing, {"name": "a"})
