"""`contract_columns`: the column of a field the contracts carry, declared once for every store that keeps it."""

from __future__ import annotations

import typing

import sqlalchemy as sa
from pydantic import BaseModel

import shared.contracts as contracts
from shared.db import CONTRACT_COLUMNS, contract_columns


def _contract_fields() -> dict[str, list[bool]]:
    """Every field of every contract model, with whether each model that has it lets it be None."""
    fields: dict[str, list[bool]] = {}
    for model in vars(contracts).values():
        if isinstance(model, type) and issubclass(model, BaseModel) and model.__module__ == contracts.__name__:
            for name, info in model.model_fields.items():
                fields.setdefault(name, []).append(type(None) in typing.get_args(info.annotation))
    return fields


def test_every_column_is_a_field_of_a_contract_and_nullable_only_where_a_contract_allows_none() -> None:
    fields = _contract_fields()
    for name, (_, nullable) in CONTRACT_COLUMNS.items():
        assert name in fields, f"{name} is no contract's field"
        if nullable:
            assert any(fields[name]), f"{name} is nullable but every contract requires it"


def test_columns_come_in_order_with_the_declared_type_and_the_options_given() -> None:
    ticker, experiment_id = contract_columns("ticker", "experiment_id", index=True)
    assert [ticker.name, experiment_id.name] == ["ticker", "experiment_id"]
    assert isinstance(ticker.type, sa.String) and ticker.type.length == 32
    assert ticker.nullable is False and experiment_id.nullable is True
    assert ticker.index and experiment_id.index


def test_a_key_is_not_null_and_an_option_overrides_the_declared_nullability() -> None:
    (key,) = contract_columns("experiment_id", primary_key=True)
    assert key.primary_key and key.nullable is False
    (name,) = contract_columns("prompt_name", nullable=True)
    assert name.nullable is True


def test_each_call_makes_new_columns_for_a_new_table() -> None:
    metadata = sa.MetaData()
    a = sa.Table("a", metadata, *contract_columns("explanation_id", primary_key=True))
    b = sa.Table("b", metadata, *contract_columns("explanation_id", primary_key=True))
    assert a.c.explanation_id is not b.c.explanation_id
    assert a.c.explanation_id.type is not b.c.explanation_id.type


def test_an_erasure_record_is_keyed_by_the_erasure_tag_whole() -> None:
    from shared.db import erasure_columns
    from shared.privacy import erasure_tag

    key, erased_at = erasure_columns()
    assert isinstance(key.type, sa.String) and key.primary_key
    assert key.type.length == len(erasure_tag("a session key"))
    assert (erased_at.name, erased_at.nullable) == ("erased_at", False)
