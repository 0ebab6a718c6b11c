"""The shape the mission fixes: services talk through events and HTTP only, and heavy dependencies stay at
the edge."""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.routes import ROUTES, service_for
from shared.bus import MANY_TO_A_MESSAGE, SUBSCRIPTIONS, BatchTask, queue_for
from shared.contracts import SERVICES

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_another_service(service: str) -> None:
    for path in (ROOT / "services" / service).rglob("*.py"):
        for name in _imports(path):
            if name.startswith("services."):
                assert name.split(".")[1] == service, f"{path.relative_to(ROOT)} imports {name}"


def _is(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_shared_imports_nothing_service_specific() -> None:
    # shared/ is the core every service uses: no service's code, no gateway (the runner, dev tooling), no tests
    for path in (ROOT / "shared").rglob("*.py"):
        for name in _imports(path):
            assert not _is(name, ("services", "gateway", "tests")), f"{path.relative_to(ROOT)} imports {name}"


def test_the_database_plumbing_imports_no_bus() -> None:
    # a store and its outbox work without a broker: the relay is handed a publisher
    for module in ("db.py", "outbox.py", "migrations.py"):
        for name in _imports(ROOT / "shared" / module):
            assert not _is(name, ("shared.bus", "celery", "kombu", "redis")), f"shared/{module} imports {name}"


@pytest.mark.parametrize(
    ("package", "allowed"),
    [
        ("torch", {"training.py", "serving.py", "tinymodel.py"}),
        ("transformers", {"training.py", "serving.py", "tinymodel.py"}),
        ("peft", {"training.py", "serving.py", "tinymodel.py"}),
        ("trl", {"training.py"}),
        ("openai", {"providers.py", "generation.py"}),
        ("groq", {"providers.py"}),
    ],
)
def test_heavy_dependencies_stay_at_the_edge(package: str, allowed: set[str]) -> None:
    for path in (ROOT / "services").rglob("*.py"):
        if any(n == package or n.startswith(package + ".") for n in _imports(path)):
            assert path.name in allowed, f"{path.relative_to(ROOT)} imports {package}"


#: What a pure module must not import: web frameworks and servers, databases, the queue, network clients,
#: processes and the file system, providers and training. (`os` is not listed: the contracts draw ids from
#: `os.urandom`; what a domain reads from the environment belongs in its service's config.py.)
IO_PACKAGES = (
    "fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "sqlite3", "psycopg", "celery", "celery_batches",
    "kombu", "redis", "httpx", "requests", "urllib", "urllib3", "aiohttp", "http", "socket", "ssl", "asyncio",
    "subprocess", "multiprocessing", "shutil", "pathlib", "tempfile", "io", "logging", "openai", "groq",
    "torch", "transformers", "peft", "trl", "prometheus_client",
)  # fmt: skip
#: Built-ins that reach outside the process.
IO_CALLS = ("open", "input", "print", "exec", "eval", "__import__")


def _module_path(name: str) -> Path | None:
    """The file of a project module (`services.x.y`, `shared.y`), or None for anything else."""
    if not _is(name, ("services", "shared")):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _project_imports(path: Path) -> set[Path]:
    """The project modules `path` imports (`from services.x import y` counts `services/x/y.py` too)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(p for a in node.names if (p := _module_path(a.name)))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update(p for p in [_module_path(node.module)] if p)
            found.update(p for a in node.names if (p := _module_path(f"{node.module}.{a.name}")))
    return found


def _io_calls(path: Path) -> set[str]:
    return {
        node.func.id
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IO_CALLS
    }


@pytest.mark.parametrize("module", [*(f"services/{s}/domain.py" for s in SERVICES), "shared/votes.py"])
def test_domain_modules_do_no_io(module: str) -> None:
    """A service's domain (and the shared vote rules) is pure logic: no framework, store, queue, network, file
    or process, directly or through the project modules it imports."""
    todo, seen = [ROOT / module], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        where = f"{module} (through {path.relative_to(ROOT)})" if path != ROOT / module else module
        for name in _imports(path):
            assert not _is(name, IO_PACKAGES), f"{where} imports {name}"
        assert not _io_calls(path), f"{where} calls {sorted(_io_calls(path))}"
        todo.extend(_project_imports(path) - seen)


def test_the_io_check_sees_an_import_and_a_call(tmp_path: Path) -> None:
    bad = tmp_path / "domain.py"
    bad.write_text("import sqlalchemy.orm\nfrom redis import Redis\n\ndef f():\n    return open('x').read()\n")
    assert {n for n in _imports(bad) if _is(n, IO_PACKAGES)} == {"sqlalchemy.orm", "redis"}
    assert _io_calls(bad) == {"open"}


def test_every_subscribed_task_exists_in_its_service() -> None:
    for task_names in SUBSCRIPTIONS.values():
        for name in task_names:
            service = queue_for(name)
            app = importlib.import_module(f"services.{service}.tasks").app
            assert name in app.tasks, f"{name} is subscribed but services/{service}/tasks.py does not define it"
            # a message of many events is unpacked only by a batch consumer (any other would dead-letter it)
            assert (name in MANY_TO_A_MESSAGE) <= isinstance(app.tasks[name], BatchTask), name


def test_beat_only_schedules_tasks_that_exist() -> None:
    from gateway.beat import schedule

    for name in schedule():
        app = importlib.import_module(f"services.{queue_for(name)}.tasks").app
        assert name in app.tasks, f"beat schedules {name}, which no service defines"
    assert "dashboard.relay_outbox" not in schedule()  # the dashboard publishes nothing: it has no outbox


def test_nginx_routes_the_same_paths_to_the_same_services_as_the_embedded_gateway() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    nginx = dict(re.findall(r"location (/[\w/]*)\s*\{\s*proxy_pass http://(\w+);", conf))
    assert nginx == {prefix: service for prefix, service in ROUTES}
    assert service_for("/api/feedback/123") == "feedback"
    assert service_for("/api/feedbackx") == "dashboard"
    assert service_for("/") == "dashboard"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_file_is_valid_including_the_gpu_profile(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin", "ADMIN_TOKEN": "x", "SESSION_HASH_KEY": "y", "REDIS_PASSWORD": "z", "HOME": str(tmp_path)
    }  # fmt: skip
    for args in ([], ["--profile", "gpu"]):
        res = subprocess.run(
            ["docker-compose", *args, "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
    missing = subprocess.run(
        ["docker-compose", "config", "-q"], cwd=ROOT, env={**env, "ADMIN_TOKEN": ""}, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "ADMIN_TOKEN" in missing.stderr  # no silent default for a secret
    no_redis_password = subprocess.run(
        ["docker-compose", "config", "-q"], cwd=ROOT, env={**env, "REDIS_PASSWORD": ""}, capture_output=True, text=True
    )
    assert no_redis_password.returncode != 0 and "REDIS_PASSWORD" in no_redis_password.stderr


def test_every_container_restarts_and_redis_has_a_password_and_no_eviction() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    blocks = re.split(r"\n  (?=[a-z][\w-]*:\n)", compose.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0])
    for block in blocks:
        name = block.split(":", 1)[0].strip()
        if name != "vllm":  # an optional GPU profile
            assert "restart: unless-stopped" in block, name
        if name.endswith("-worker"):
            assert "healthcheck: *worker-health" in block, name
    assert "--requirepass" in compose and "--maxmemory-policy noeviction" in compose
    assert "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0" in compose


def test_nginx_exposes_no_metrics() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "location = /metrics { return 404; }" in conf and "location ~ /metrics$ { return 404; }" in conf
