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
