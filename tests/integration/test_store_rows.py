"""Every typed row a repository returns has exactly the keys its TypedDict declares: a fresh store on a real
SQLite file gets one row in every table, and each repository method that builds a row TypedDict is called and
its keys compared with the TypedDict's. A renamed or added column (or a query that selects another set) fails
here instead of passing the type checker, which trusts the `cast`."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, is_typeddict

import pytest
from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text

from shared.contracts import SERVICES

#: The one id every row carries (in every string column, cut to the column's length), so a lookup finds it.
ID = str(uuid.UUID(int=1))
AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _value(column: Any) -> Any:
    t = column.type
    if isinstance(t, Boolean):
        return False
    if isinstance(t, Integer):
        return 1
    if isinstance(t, Float):
        return 0.5
    if isinstance(t, DateTime):
        return AT
    if isinstance(t, JSON):
        return []
    if isinstance(t, String | Text):
        return ID[: getattr(t, "length", None) or len(ID)]
    raise AssertionError(f"no sample value for {column.table.name}.{column.name} ({t})")


#: (service, row TypedDict) -> the repository call that returns it (a row, a list or an iterator of rows).
CALLS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("router", "ExplanationRow"): lambda repo: repo.explanation(uuid.UUID(ID)),
    ("router", "ChampionRow"): lambda repo: repo.champion(),
    ("router", "ExperimentRow"): lambda repo: repo.experiment(ID),
    ("router", "ArmRow"): lambda repo: repo.arms_of(ID),
    ("router", "ModelRow"): lambda repo: repo.models(),
    ("feedback", "ExplanationRow"): lambda repo: repo.explanation(uuid.UUID(ID)),
    ("feedback", "QuarantinedRow"): lambda repo: repo.list_quarantine(),
    ("feedback", "AuditRow"): lambda repo: repo.audit_log(),
    ("optimizer", "PromptVersionRow"): lambda repo: repo.versions(ID),
    ("optimizer", "ChampionRow"): lambda repo: repo.champion_by_id(1),
    ("optimizer", "ExperimentRow"): lambda repo: repo.experiment(ID),
    ("optimizer", "ArmRow"): lambda repo: repo.arms(ID),
    ("optimizer", "GenerationRow"): lambda repo: repo.generations(),
    ("finetune", "ErasureRow"): lambda repo: repo.erasures(),
    ("finetune", "ExportRow"): lambda repo: repo.export(ID),
    ("finetune", "JobRow"): lambda repo: repo.job(ID),
    ("finetune", "ModelRow"): lambda repo: repo.model(ID),
    ("dashboard", "ExperimentRow"): lambda repo: repo.experiment(ID),
    ("dashboard", "AlertRow"): lambda repo: repo.recent_alerts(),
    ("dashboard", "ChampionChangeRow"): lambda repo: repo.champion_history(),
    ("dashboard", "ModelRow"): lambda repo: repo.model_list(),
    ("dashboard", "FinetuneJobRow"): lambda repo: repo.finetune_job_list(),
    ("dashboard", "ExplanationExportRow"): lambda repo: repo.explanation_rows(None, 10),
}


def _row_typeddicts(service: str) -> dict[str, type]:
    module = importlib.import_module(f"services.{service}.store")
    return {
        name: obj
        for name, obj in vars(module).items()
        if name.endswith("Row") and is_typeddict(obj) and obj.__module__ == module.__name__
    }


def test_every_row_typeddict_of_a_store_has_a_checked_repository_call() -> None:
    declared = {(service, name) for service in SERVICES for name in _row_typeddicts(service)}
    assert declared == set(CALLS), "add the repository call that returns each new row TypedDict to CALLS"


@pytest.fixture(params=SERVICES)
def filled_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A fresh store of the service with one row, keyed by ID, in every table."""
    service: str = request.param
    module = importlib.import_module(f"services.{service}.store")
    store = module.Store(f"sqlite:///{tmp_path / f'{service}.db'}")
    try:
        with store.engine.begin() as conn:
            for table in module.metadata.sorted_tables:
                conn.execute(table.delete())  # a seeded row would be a second one
                conn.execute(table.insert().values({c.name: _value(c) for c in table.columns}))
        yield service, store
    finally:
        store.dispose()


def test_each_row_has_exactly_the_keys_of_its_typeddict(filled_store: tuple[str, Any]) -> None:
    service, store = filled_store
    checked = 0
    with store.reader() as uow:
        for name, row_type in _row_typeddicts(service).items():
            got = CALLS[(service, name)](uow.repo)
            rows = [got] if isinstance(got, dict) else list(got or [])
            assert rows, f"{service}: {name}'s call returned no row"
            declared = row_type.__required_keys__ | row_type.__optional_keys__  # type: ignore[attr-defined]
            for row in rows:
                assert set(row) == declared, (
                    f"{service}.{name}: keys the repository returns but the TypedDict lacks: "
                    f"{sorted(set(row) - declared)}; declared but not returned: {sorted(declared - set(row))}"
                )
            checked += 1
    assert checked == len(_row_typeddicts(service))
