"""The mutation runner's own parts (tools/mutate.py): which mutants a source yields, that each compiles and
changes behaviour, and that a mutant swapped into a live module is what its callers then run."""

from __future__ import annotations

import re
import types

from tools.mutate import find_mutants, load_config, mutated_code, regex_variants, swap_in_place

SOURCE = '''
import re

LIMIT = 3
_WORD = re.compile(r"[a-z0-9]{2,}")


def small(n: int) -> bool:
    """A docstring is never mutated."""
    return n < LIMIT and not n == 0


def words(text: str) -> list[str]:
    log.info("not mutated: a log line")  # pragma: no mutate
    return _WORD.findall(text.lower())
'''


def _module(source: str = SOURCE) -> types.ModuleType:
    mod = types.ModuleType("sample")
    mod.__file__ = "sample.py"
    exec(compile(source, "sample.py", "exec"), mod.__dict__)
    return mod


def test_mutants_cover_comparisons_booleans_constants_returns_and_patterns() -> None:
    found = {m.description for m in find_mutants(SOURCE)}
    assert {"< -> <=", "== -> !=", "and -> or", "not x -> x", "3 -> 4", "return x -> return None"} <= found
    assert "regex class [a-z0-9] without 'a-z'" in found and ".lower() dropped" in found
    assert not [d for d in found if "docstring" in d or "log line" in d]


def test_only_the_named_functions_are_mutated() -> None:
    lines = {m.line for m in find_mutants(SOURCE, functions=["small"])}
    assert lines == {10}


def test_every_mutant_compiles_and_the_at_import_ones_are_marked() -> None:
    mutants = find_mutants(SOURCE)
    for m in mutants:
        mutated_code(SOURCE, "sample.py", (), m.index)
    assert {m.line for m in mutants if m.at_import} == {4, 5}


def test_a_mutant_swapped_into_a_live_module_is_what_existing_references_run() -> None:
    mod = _module()
    small = mod.small  # a reference taken before the swap, as `from sample import small` would
    assert small(2) is True
    flip = next(m for m in find_mutants(SOURCE) if m.description == "< -> <=" and m.line == 10)
    assert swap_in_place(mod, SOURCE, mutated_code(SOURCE, "sample.py", (), flip.index), flip.line)
    assert small(3) is True  # 3 <= LIMIT now
    limit = next(m for m in find_mutants(SOURCE) if m.description == "3 -> 4")
    mod = _module()
    assert swap_in_place(mod, SOURCE, mutated_code(SOURCE, "sample.py", (), limit.index), limit.line)
    assert mod.LIMIT == 4 and mod.small(3) is True


def test_regex_variants_are_valid_and_different() -> None:
    variants = regex_variants(r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b")
    assert variants
    for pattern, _ in variants:
        re.compile(pattern)
        assert pattern != r"\b[A-Z]{2}\d{2}[A-Z0-9]{11,30}\b"


def test_the_configured_modules_exist_with_their_tests() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    config = load_config()
    assert {t.name for t in config.targets} >= {"outbox", "privacy", "admin", "feedback_store", "stats", "decision"}
    for target in config.targets:
        assert (root / target.path).is_file(), target.path
        for test in target.tests:
            assert (root / test).is_file(), test
        if target.functions:
            assert find_mutants((root / target.path).read_text(), target.functions), target.name
