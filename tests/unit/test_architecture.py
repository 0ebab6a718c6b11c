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
from shared.bus import SERVICES, SUBSCRIPTIONS, queue_for

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


def test_shared_imports_no_service() -> None:
    for path in (ROOT / "shared").rglob("*.py"):
        assert not any(n.startswith("services") for n in _imports(path)), path


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


def test_domain_modules_are_free_of_frameworks() -> None:
    banned = ("fastapi", "sqlalchemy", "celery", "redis", "httpx")
    for path in (ROOT / "services").glob("*/domain.py"):
        for name in _imports(path):
            assert not name.startswith(banned), f"{path.relative_to(ROOT)} imports {name}"


def test_every_subscribed_task_exists_in_its_service() -> None:
    for task_names in SUBSCRIPTIONS.values():
        for name in task_names:
            service = queue_for(name)
            app = importlib.import_module(f"services.{service}.tasks").app
            assert name in app.tasks, f"{name} is subscribed but services/{service}/tasks.py does not define it"


def test_beat_only_schedules_tasks_that_exist() -> None:
    from gateway.beat import schedule

    for name in schedule():
        source = (ROOT / "services" / queue_for(name) / "tasks.py").read_text()
        assert f'name="{name}"' in source, f"beat schedules {name}, which no service defines"


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
