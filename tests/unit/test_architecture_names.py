"""A module of a service uses only the public names of another: a name with a leading underscore is private to the
module that defines it (give it a public name when another module needs it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("services.", "shared.")):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_service_module_imports_another_modules_private_names() -> None:
    offences = {
        str(path.relative_to(ROOT)): names
        for path in sorted((ROOT / "services").rglob("*.py"))
        if (names := _private_imports(path))
    }
    assert offences == {}


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from services.optimizer.registry import _hidden, shown\nfrom os import _exit\n")
    assert _private_imports(module) == ["services.optimizer.registry._hidden"]
