"""Typed records from rows: a dataclass made from the keys of a mapping (a store's row, a dict built like one)
that name its fields, free of any framework."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")


def from_row(cls: type[D], row: Mapping[Any, Any], **overrides: Any) -> D:
    """A `cls` from the keys of `row` that name one of its fields (the others are ignored), with `overrides`
    for the fields that are computed or converted; a field in neither takes its default."""
    names = {f.name for f in fields(cls) if f.init}
    return cls(**{k: v for k, v in row.items() if k in names} | overrides)
