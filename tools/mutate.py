"""Mutation testing for the core modules (`make mutate`; not part of `make test`).

Each target module (configured under `[tool.mutate]` in pyproject.toml: a file, optionally the functions in it
that count, and the fast tests that guard it) is changed one small step at a time -- a comparison flipped, `and`
for `or`, a number plus one, a string or a regular expression altered, a `return x` made `return None`, a call
statement dropped -- and its tests run against each changed copy. A mutant the tests fail on is killed; one they
pass on survived, which means no test checks that behaviour. The score is killed / all mutants, per module.

Why not mutmut: mutmut 3 mutates only code inside functions (the PII patterns in shared/privacy.py are
module-level constants), copies the tree into `mutants/` and maps tests over the whole suite in one
configuration; here each module has its own small test selection so the run stays within minutes on two cores.

How a mutant runs, fast enough for hundreds of them: the parent imports the module, its tests and everything
they use once, then forks one child per mutant; the child swaps the mutated function's code into the live module
(nothing is written to the source tree) and runs only the tests that executed the mutated lines in a traced
baseline run. Lines no test executes count as survivors without running (`not covered`). A child that runs past
its timeout is killed and counted as killed (a mutant that loops forever is caught by any real run).

    python -m tools.mutate                      # every configured module
    python -m tools.mutate --modules privacy,outbox --jobs 2 --fail-under 80
    MUTATE_MODULES=privacy make mutate
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import importlib
import importlib.abc
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRAGMA = "pragma: no mutate"

# -- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One module under mutation: `functions` empty means the whole file."""

    name: str
    path: str
    module: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()
    default: bool = True  # False: runs only when named in --modules / MUTATE_MODULES


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...]


def load_config(pyproject: Path = ROOT / "pyproject.toml") -> Config:
    raw = tomllib.loads(pyproject.read_text())["tool"]["mutate"]
    targets = []
    for name, spec in raw["modules"].items():
        path = spec["path"]
        module = path.removesuffix(".py").replace("/", ".")
        targets.append(
            Target(
                name=name,
                path=path,
                module=module,
                tests=tuple(spec["tests"]),
                functions=tuple(spec.get("functions", ())),
                default=bool(spec.get("default", True)),
            )
        )
    return Config(targets=tuple(targets))


# -- mutation operators ----------------------------------------------------------------------------------------

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_BIN_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.Div,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
_SYMBOL = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
}
_REGEX_CALLS = {"compile", "sub", "match", "search", "fullmatch", "findall", "finditer", "split"}
_LOGGERS = {"log", "logger", "logging"}


def regex_variants(pattern: str) -> list[tuple[str, str]]:
    """Small, still-valid changes to a regular expression: drop one member of a character class, tighten a
    counted repetition, drop a word boundary. Each would let some real input through a scrubber unnoticed."""
    out: list[tuple[str, str]] = []
    for m in re.finditer(r"\[(\^?)((?:\\.|[^\]\\])+)\]", pattern):
        members = re.findall(r"\\.-\\.|\\.-.|.-\\.|[^\\]-[^\\]|\\.|.", m.group(2))
        if len(members) < 2:
            continue
        for i, member in enumerate(members):
            rest = "".join(members[:i] + members[i + 1 :])
            if rest in ("-", "") or rest.endswith("\\"):
                continue
            new = pattern[: m.start(2)] + rest + pattern[m.end(2) :]
            out.append((new, f"regex class [{m.group(2)}] without {member!r}"))
    for m in re.finditer(r"\{(\d+)(,?)(\d*)\}", pattern):
        low, comma, high = int(m.group(1)), m.group(2), m.group(3)
        if not high or int(high) > low + 1:
            new = pattern[: m.start()] + "{" + f"{low + 1}{comma}{high}" + "}" + pattern[m.end() :]
            out.append((new, f"regex {m.group()} at {m.start()} -> {{{low + 1}{comma}{high}}}"))
        if high:
            new = pattern[: m.start()] + "{" + f"{low}{comma}{int(high) - 1}" + "}" + pattern[m.end() :]
            out.append((new, f"regex {m.group()} at {m.start()} -> {{{low}{comma}{int(high) - 1}}}"))
    for m in re.finditer(r"\\b", pattern):
        out.append((pattern[: m.start()] + pattern[m.end() :], f"regex without the \\b at {m.start()}"))
    valid = []
    for new, what in out:
        try:
            re.compile(new)
        except re.error:
            continue
        if new != pattern:
            valid.append((new, what))
    return valid


@dataclass(frozen=True)
class Mutant:
    index: int
    line: int
    end_line: int
    description: str
    at_import: bool = False  # module level, class level or a default argument: runs when the module is imported


class _Mutator(ast.NodeTransformer):
    """Walks the tree and counts mutation points in a fixed order. With `apply` set, replaces the node of that
    point and leaves the rest untouched; without, records every point (`found`)."""

    def __init__(self, lines: Sequence[str], functions: Sequence[str], apply: int | None = None) -> None:
        self.lines = lines
        self.functions = set(functions)
        self.apply = apply
        self.count = 0
        self.found: list[Mutant] = []
        self.scope: list[str] = []
        self.body_depth = 0  # > 0 inside a function body
        self.regex_constants: set[int] = set()

    # -- bookkeeping
    def _in_scope(self) -> bool:
        if not self.functions:
            return True
        return any(name in self.functions or ".".join(self.scope[: i + 1]) in self.functions
                   for i, name in enumerate(self.scope))  # fmt: skip

    def _point(self, node: ast.AST, description: str, make: Callable[[], ast.AST | None]) -> ast.AST | None:
        """Register one mutation of `node`; returns the replacement when this is the one to apply."""
        line = getattr(node, "lineno", 0)
        if not self._in_scope() or (line and PRAGMA in self.lines[line - 1]):
            return node
        index = self.count
        self.count += 1
        if self.apply is None:
            end = getattr(node, "end_lineno", line) or line
            self.found.append(Mutant(index, line, end, description, at_import=self.body_depth == 0))
            return node
        if index == self.apply:
            new = make()
            if new is not None:
                ast.copy_location(new, node)
            return new
        return node

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        start = 0
        first = body[0] if body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            start = 1  # the docstring
        new_body = body[:start]
        for stmt in body[start:]:
            result = self.visit(stmt)
            if result is None:
                continue
            new_body.extend(result if isinstance(result, list) else [result])
        return new_body or [ast.Pass()]

    # -- structure: what is walked and what is not
    def visit_Module(self, node: ast.Module) -> ast.AST | None:
        node.body = self._body(node.body)
        return node

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        self.scope.append(node.name)
        try:
            node.args.defaults = [self.visit(d) for d in node.args.defaults]
            node.args.kw_defaults = [None if d is None else self.visit(d) for d in node.args.kw_defaults]
            self.body_depth += 1
            try:
                node.body = self._body(node.body)
            finally:
                self.body_depth -= 1
        finally:
            self.scope.pop()
        return node  # decorators and annotations are not mutated

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST | None:
        self.scope.append(node.name)
        try:
            node.body = self._body(node.body)
        finally:
            self.scope.pop()
        return node

    def visit_If(self, node: ast.If) -> ast.AST | None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return node
        node.test = self.visit(node.test)
        node.body = self._body(node.body)
        node.orelse = self._body(node.orelse) if node.orelse else []
        return node

    def _visit_block(self, node: Any) -> ast.AST:
        for name, value in ast.iter_fields(node):
            if name in ("body", "orelse", "finalbody") and isinstance(value, list):
                setattr(node, name, self._body(value) if value else [])
            elif isinstance(value, list):
                setattr(node, name, [self.visit(v) if isinstance(v, ast.AST) else v for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self.visit(value))
        return node

    visit_For = _visit_block
    visit_AsyncFor = _visit_block
    visit_While = _visit_block
    visit_With = _visit_block
    visit_AsyncWith = _visit_block
    visit_Try = _visit_block
    visit_ExceptHandler = _visit_block

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Import(self, node: ast.Import) -> ast.AST | None:
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | None:
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST | None:
        return node  # f-strings: messages, not behaviour

    def visit_Call(self, node: ast.Call) -> ast.AST | None:
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if func.value.id in _LOGGERS:
                return node  # log lines are not behaviour
            if func.value.id == "re" and func.attr in _REGEX_CALLS and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    self.regex_constants.add(id(first))
        self.generic_visit(node)
        if isinstance(func, ast.Attribute) and not node.args and not node.keywords:
            # `x.strip()`, `x.lower()`: the normalising call dropped
            return self._point(node, f".{func.attr}() dropped", lambda: func.value)
        return node

    # -- the operators
    def visit_Compare(self, node: ast.Compare) -> ast.AST | None:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = _CMP_SWAP.get(type(op))
            if swap is None:
                continue

            def make(i: int = i, swap: type[ast.cmpop] = swap) -> ast.AST:
                new = copy.copy(node)
                new.ops = list(node.ops)
                new.ops[i] = swap()
                return new

            result = self._point(node, f"{_SYMBOL[type(op)]} -> {_SYMBOL[swap]}", make)
            if result is not node:
                return result
        return node

    def _swap_operator(
        self, node: ast.BinOp | ast.AugAssign, suffix: str, make: Callable[[ast.operator], ast.AST]
    ) -> ast.AST | None:
        """The arithmetic or bitwise operator of `node` swapped (`_BIN_SWAP`); `suffix` follows each symbol in the
        description ("=" for an augmented assignment), `make` builds the node again around the new operator."""
        swap = _BIN_SWAP.get(type(node.op))
        if swap is None:
            return node
        return self._point(node, f"{_SYMBOL[type(node.op)]}{suffix} -> {_SYMBOL[swap]}{suffix}", lambda: make(swap()))

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST | None:
        self.generic_visit(node)
        if isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
            return node  # "%s" % x formatting
        return self._swap_operator(node, "", lambda op: ast.BinOp(left=node.left, op=op, right=node.right))

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST | None:
        self.generic_visit(node)
        return self._swap_operator(node, "=", lambda op: ast.AugAssign(target=node.target, op=op, value=node.value))

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST | None:
        self.generic_visit(node)
        is_and = isinstance(node.op, ast.And)
        return self._point(
            node,
            "and -> or" if is_and else "or -> and",
            lambda: ast.BoolOp(op=ast.Or() if is_and else ast.And(), values=node.values),
        )

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST | None:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            return self._point(node, "not x -> x", lambda: node.operand)
        if isinstance(node.op, ast.USub):
            return self._point(node, "-x -> x", lambda: node.operand)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST | None:
        value = node.value
        if isinstance(value, bool):
            return self._point(node, f"{value} -> {not value}", lambda: ast.Constant(not value))
        if isinstance(value, int | float) and not isinstance(value, complex):
            return self._point(node, f"{value!r} -> {value + 1!r}", lambda: ast.Constant(value + 1))
        if isinstance(value, str):
            if id(node) in self.regex_constants:
                for new, what in regex_variants(value):
                    result = self._point(node, what, functools.partial(ast.Constant, new))
                    if result is not node:
                        return result
            return self._point(node, f"{value[:30]!r} -> 'XX..XX'", lambda: ast.Constant(f"XX{value}XX"))
        return node

    def visit_Return(self, node: ast.Return) -> ast.AST | None:
        self.generic_visit(node)
        if node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None):
            return node
        return self._point(node, "return x -> return None", lambda: ast.Return(value=ast.Constant(None)))

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        if not isinstance(node.value, ast.Call):
            self.generic_visit(node)
            return node
        func = node.value.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in _LOGGERS:
            return node
        self.generic_visit(node)
        return self._point(node, "call statement removed", lambda: ast.Pass())

    def visit_Break(self, node: ast.Break) -> ast.AST | None:
        return self._point(node, "break -> continue", lambda: ast.Continue())

    def visit_Continue(self, node: ast.Continue) -> ast.AST | None:
        return self._point(node, "continue -> break", lambda: ast.Break())


def find_mutants(source: str, functions: Sequence[str] = ()) -> list[Mutant]:
    mutator = _Mutator(source.splitlines(), functions)
    mutator.visit(ast.parse(source))
    return mutator.found


def mutated_code(source: str, path: str, functions: Sequence[str], index: int) -> Any:
    mutator = _Mutator(source.splitlines(), functions, apply=index)
    tree = ast.fix_missing_locations(mutator.visit(ast.parse(source)))
    return compile(tree, path, "exec")


# -- putting a mutant in place ---------------------------------------------------------------------------------
#
# The parent imports the target module, the tests and everything they use once. Each child then puts one
# mutant in place by swapping code objects: the mutated module is executed into a scratch namespace, and the
# function that holds the mutation gets the new code (and defaults) on its existing function object -- so every
# `from module import name` elsewhere sees the mutant too. A mutation outside any function (a module constant,
# such as a compiled pattern) rebinds the names that statement assigns. Where neither applies, the child drops
# every project module and imports them afresh with the mutated source served by an import hook (slower).


_PROJECT = ("shared", "services", "gateway", "tests")


def _is_project(name: str) -> bool:
    return name.split(".")[0] in _PROJECT


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, staticmethod | classmethod):
        return obj.__func__
    if isinstance(obj, property):
        return obj.fget
    return obj


def _assigned_names(stmt: ast.stmt) -> list[str]:
    names: list[str] = []
    targets = (
        stmt.targets
        if isinstance(stmt, ast.Assign)
        else [stmt.target]
        if isinstance(stmt, ast.AnnAssign | ast.AugAssign)
        else []
    )
    for t in targets:
        names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return names


def _holder(body: Sequence[ast.stmt], line: int) -> ast.stmt | None:
    return next((st for st in body if st.lineno <= line <= (st.end_lineno or st.lineno)), None)


def swap_in_place(module: ModuleType, source: str, code: Any, line: int) -> bool:
    """Put the mutated code into the live module; False when the mutation is in a statement this cannot swap."""
    scratch: dict[str, Any] = {"__name__": module.__name__, "__file__": module.__file__, "__builtins__": __builtins__}
    exec(code, scratch)
    tree = ast.parse(source)
    stmt = _holder(tree.body, line)
    owner_old: Any = module
    owner_new: Any = scratch
    get = dict.get
    if isinstance(stmt, ast.ClassDef):
        owner_old, owner_new = vars(module)[stmt.name], scratch[stmt.name]
        stmt = _holder(stmt.body, line)
        get = lambda d, k: vars(d).get(k)  # type: ignore[assignment]  # noqa: E731
    if stmt is None:
        return False
    old_ns = vars(owner_old) if owner_old is not module else vars(module)
    new_ns = vars(owner_new) if owner_new is not scratch else scratch
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
        old, new = _unwrap(old_ns.get(stmt.name)), _unwrap(new_ns.get(stmt.name))
        old, new = getattr(old, "__wrapped__", old), getattr(new, "__wrapped__", new)
        if not (hasattr(old, "__code__") and hasattr(new, "__code__")):
            return False
        if len(old.__code__.co_freevars) != len(new.__code__.co_freevars):
            return False
        old.__code__ = new.__code__
        old.__defaults__ = new.__defaults__
        old.__kwdefaults__ = new.__kwdefaults__
        return True
    names = _assigned_names(stmt)
    if not names:
        return False
    for name in names:
        if owner_old is module:
            vars(module)[name] = scratch[name]
        else:
            setattr(owner_old, name, get(owner_new, name))
    return True


class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the mutated code for one module name; every other import goes the usual way."""

    def __init__(self, name: str, path: str, code: Any) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=self.path)

    def create_module(self, spec: Any) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = self.path
        exec(self.code, module.__dict__)


def reimport_with(name: str, path: str, code: Any) -> None:
    """The slow path: forget every project module and serve the mutated one on the next import."""
    for mod in [m for m in sys.modules if _is_project(m)]:
        del sys.modules[mod]
    sys.meta_path.insert(0, _MutantFinder(name, path, code))


# -- running the tests in a forked child -----------------------------------------------------------------------


class _Coverage:
    """A pytest plugin plus a tracer: which lines of one file each test executed."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.current = ""
        self.lines: dict[str, set[int]] = {"": set()}
        self.durations: dict[str, float] = {}

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines[self.current].add(frame.f_lineno)
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == self.filename:
            self.lines[self.current].add(frame.f_lineno)
            return self._local
        return None

    def start(self) -> None:
        sys.settrace(self._global)
        threading.settrace(self._global)

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self.current = nodeid
        self.lines.setdefault(nodeid, set())

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        self.current = ""

    def pytest_runtest_logreport(self, report: Any) -> None:
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration


#: Plugins the mutation runs do not need (the property-based and schema tests are not among their tests).
_NO_PLUGINS = ("no:cacheprovider", "no:hypothesispytest", "no:schemathesis")


def _pytest_args(tests: Sequence[str], basetemp: Path, first_failure: bool) -> list[str]:
    args = ["-q", "--no-header", "-o", "addopts=--strict-markers", f"--basetemp={basetemp}"]
    for plugin in _NO_PLUGINS:
        args += ["-p", plugin]
    # modules imported before the fork cannot be assertion-rewritten; that changes messages, not outcomes
    args += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    if first_failure:
        args.append("-x")
    return [*args, *tests]


def _child(run: Callable[[], int], log: Path) -> int:
    """Fork; the child runs `run` with its output in `log`, in its own process group, and exits with its code."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = int(run())
    except BaseException:  # the child must never return into the parent's loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _test_module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def prepare(targets: Sequence[Target], work: Path) -> None:
    """Do once, in the parent, what every child would otherwise do again: a collection run of all the targets'
    tests imports pytest's plugins, the fixtures, the test modules (assertion-rewritten) and what they use."""
    import pytest

    tests = sorted({t for target in targets for t in target.tests})
    log = work / "collect.log"
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = pytest.main([*_pytest_args(tests, work / "collect-tmp", first_failure=False), "--collect-only"])
    if code != 0:
        raise SystemExit(f"collecting the tests failed (exit {code}):\n{log.read_text()[-3000:]}")
    for target in targets:
        importlib.import_module(target.module)


@dataclass
class Baseline:
    lines: dict[str, set[int]]
    durations: dict[str, float]
    wall_s: float


def baseline(target: Target, work: Path) -> Baseline:
    """Run the target's tests once, unmutated and traced: they must pass, and they say which test runs which line."""
    import pytest

    filename = str(ROOT / target.path)
    out = work / f"{target.name}-baseline.json"
    log = work / f"{target.name}-baseline.log"

    def run() -> int:
        cov = _Coverage(filename)
        cov.start()
        code = pytest.main(_pytest_args(target.tests, work / "baseline-tmp", first_failure=False), plugins=[cov])
        sys.settrace(None)
        threading.settrace(None)
        out.write_text(json.dumps({"lines": {k: sorted(v) for k, v in cov.lines.items()}, "durations": cov.durations}))
        return int(code)

    started = time.monotonic()
    pid = _child(run, log)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if code != 0 or not out.exists():
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise SystemExit(f"{target.name}: the unmutated tests do not pass (exit {code}); fix them first:\n{tail}")
    data = json.loads(out.read_text())
    return Baseline({k: set(v) for k, v in data["lines"].items()}, data["durations"], wall)


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | timeout | survived | not covered
    tests: int = 0


@dataclass
class Score:
    target: Target
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def killed(self) -> int:
        return sum(o.status in ("killed", "timeout") for o in self.outcomes)

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / len(self.outcomes) if self.outcomes else 100.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def _tests_for(mutant: Mutant, target: Target, base: Baseline) -> list[str]:
    """The tests that executed the mutated lines (all of the target's when the code runs at import); empty when
    no test did."""
    if mutant.at_import:
        return list(target.tests)
    span = set(range(mutant.line, mutant.end_line + 1))
    chosen = [test for test, lines in base.lines.items() if test and span & lines]
    # fastest first: with -x, a killed mutant is found by its cheapest failing test
    return sorted(chosen, key=lambda test: (base.durations.get(test, 0.0), test))


def run_target(target: Target, jobs: int, work: Path, echo: Callable[[str], None]) -> Score:
    import pytest

    started = time.monotonic()
    filename = str(ROOT / target.path)
    source = (ROOT / target.path).read_text()
    mutants = find_mutants(source, target.functions)
    base = baseline(target, work)
    echo(f"{target.name}: {len(mutants)} mutants; baseline {base.wall_s:.1f}s for {len(base.durations)} tests")
    score = Score(target)
    queue: list[tuple[Mutant, list[str]]] = []
    for mutant in mutants:
        tests = _tests_for(mutant, target, base)
        if tests:
            queue.append((mutant, tests))
        else:
            score.outcomes.append(Outcome(mutant, "not covered"))
    # A mutant that loops forever is stopped at a few times the (traced, so slower) baseline.
    timeout_s = 20.0 + 3.0 * base.wall_s
    running: dict[int, tuple[Mutant, list[str], float, Path]] = {}
    module = sys.modules[target.module]

    def launch(mutant: Mutant, tests: list[str]) -> None:
        code = mutated_code(source, filename, target.functions, mutant.index)
        tmp = work / f"m{mutant.index}"

        def run() -> int:
            if not swap_in_place(module, source, code, mutant.line):
                reimport_with(target.module, filename, code)
            return int(pytest.main(_pytest_args(tests, tmp, first_failure=True)))

        pid = _child(run, work / f"{target.name}-{mutant.index}.log")
        running[pid] = (mutant, tests, time.monotonic(), tmp)

    def reap() -> None:
        for pid, (mutant, tests, t0, tmp) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                # 0: every selected test passed on the mutant; 5: none was collected
                state = "survived" if code == 0 else "not covered" if code == 5 else "killed"
            elif time.monotonic() - t0 > timeout_s:
                _kill(pid)
                state = "timeout"
            else:
                continue
            del running[pid]
            shutil.rmtree(tmp, ignore_errors=True)
            score.outcomes.append(Outcome(mutant, state, len(tests)))

    for mutant, tests in queue:
        while len(running) >= jobs:
            reap()
            time.sleep(0.01)
        launch(mutant, tests)
    while running:
        reap()
        time.sleep(0.01)
    score.outcomes.sort(key=lambda o: o.mutant.index)
    score.wall_s = time.monotonic() - started
    return score


def report(scores: Sequence[Score], echo: Callable[[str], None], show_survivors: bool) -> None:
    if show_survivors:
        for s in scores:
            lines = (ROOT / s.target.path).read_text().splitlines()
            for o in s.outcomes:
                if o.status in ("survived", "not covered"):
                    code = lines[o.mutant.line - 1].strip()[:70] if o.mutant.line else ""
                    echo(f"  {o.status:11} {s.target.path}:{o.mutant.line} {o.mutant.description}  | {code}")
    echo("")
    echo(
        f"{'module':16} {'file':30} {'mutants':>7} {'killed':>6} {'survived':>8} {'uncovered':>9} {'score':>6} {'time':>6}"
    )
    total = killed = 0
    for s in scores:
        total += len(s.outcomes)
        killed += s.killed
        echo(
            f"{s.target.name:16} {s.target.path:30} {len(s.outcomes):7d} {s.killed:6d} {s.count('survived'):8d} "
            f"{s.count('not covered'):9d} {s.percent:5.1f}% {s.wall_s:5.0f}s"
        )
    if len(scores) > 1:
        echo(f"{'all':16} {'':30} {total:7d} {killed:6d} {'':8} {'':9} {100.0 * killed / max(total, 1):5.1f}%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--modules", default=os.environ.get("MUTATE_MODULES", ""), help="comma-separated names")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATE_JOBS", "2")))
    parser.add_argument("--fail-under", type=float, default=None, help="exit 1 when a module scores below this")
    parser.add_argument("--quiet-survivors", action="store_true", help="do not list the surviving mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)

    config = load_config()
    chosen = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = sorted(set(chosen) - {t.name for t in config.targets})
    if unknown:
        parser.error(f"unknown module(s) {unknown}; configured: {[t.name for t in config.targets]}")
    targets = [t for t in config.targets if t.name in chosen] if chosen else [t for t in config.targets if t.default]

    def echo(line: str) -> None:
        print(line, flush=True)

    if args.list:
        for t in targets:
            for m in find_mutants((ROOT / t.path).read_text(), t.functions):
                echo(f"{t.name} {t.path}:{m.line} #{m.index} {m.description}")
        return 0

    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    scores = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        prepare(targets, Path(tmp))
        for target in targets:
            scores.append(run_target(target, max(1, args.jobs), Path(tmp), echo))
    report(scores, echo, show_survivors=not args.quiet_survivors)
    if args.fail_under is not None:
        low = [s.target.name for s in scores if s.percent < args.fail_under]
        if low:
            echo(f"below {args.fail_under:.0f}% of mutants killed: {', '.join(low)}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
