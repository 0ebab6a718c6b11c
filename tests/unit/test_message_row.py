"""`Message.row`: an event's fields as a row of a store that keeps a copy of them."""

from __future__ import annotations

import pytest

from tests.support import explanation_created


def test_a_row_holds_the_named_fields_with_ids_as_text() -> None:
    event = explanation_created(experiment_id="exp-1", cost_usd=0.25)
    row = event.row("explanation_id", "experiment_id", "cost_usd", "created_at", "fallback_used")
    assert row == {
        "explanation_id": str(event.explanation_id),
        "experiment_id": "exp-1",
        "cost_usd": 0.25,
        "created_at": event.created_at,
        "fallback_used": event.fallback_used,
    }
    assert list(row) == ["explanation_id", "experiment_id", "cost_usd", "created_at", "fallback_used"]


def test_a_name_that_is_not_a_field_is_an_error() -> None:
    with pytest.raises(AttributeError, match="no_such_field"):
        explanation_created().row("explanation_id", "no_such_field")


def test_a_replica_copies_the_columns_its_table_names_after_a_field_and_nothing_else() -> None:
    import sqlalchemy as sa

    from shared.contracts import ExplanationCreated
    from shared.db import contract_columns, copied_fields

    table = sa.Table(
        "replica",
        sa.MetaData(),
        *contract_columns("explanation_id", primary_key=True),
        sa.Column("day", sa.String(10)),  # the copy's own column: no field of the event
        *contract_columns("model", "cost_usd"),
    )
    assert copied_fields(table, ExplanationCreated) == ("explanation_id", "model", "cost_usd")
    event = explanation_created(cost_usd=0.5)
    assert event.row(*copied_fields(table, ExplanationCreated)) == {
        "explanation_id": str(event.explanation_id),
        "model": event.model,
        "cost_usd": 0.5,
    }


@pytest.mark.parametrize(
    ("store", "fields"),
    [
        ("feedback", "EXPLANATION_FIELDS"),
        ("optimizer", "EXPOSURE_FIELDS"),
        ("finetune", "EXPLANATION_FIELDS"),
        ("dashboard", "EXPLANATION_FIELDS"),
    ],
)
def test_every_replica_of_an_explanation_keeps_its_id_and_when_it_was_made(store: str, fields: str) -> None:
    import importlib

    kept = getattr(importlib.import_module(f"services.{store}.store"), fields)
    assert {"explanation_id", "created_at", "prompt_name", "prompt_version", "model"} <= set(kept)
