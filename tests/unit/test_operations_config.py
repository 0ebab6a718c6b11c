"""The operators' views hang together: every series the Grafana dashboard queries is one that a worker or a
service exports, Prometheus scrapes every worker, and compose runs Flower and Grafana with the dashboard
provisioned."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml  # type: ignore[import-untyped]  # no stubs installed (types-PyYAML is not a dependency)

from shared import worker_metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _exported_names() -> set[str]:
    names: set[str] = set()
    for metric in (
        worker_metrics.TASK_SECONDS,
        worker_metrics.TASK_FAILURES,
        worker_metrics.TASK_RETRIES,
        worker_metrics.DEAD_LETTERS,
    ):
        for family in metric.collect():
            suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",)}[family.type]
            names.update(family.name + suffix for suffix in suffixes)
    names.update({"celery_queue_depth", "celery_queue_oldest_age_seconds", "up"})
    for source in (ROOT / "services" / "dashboard").glob("*.py"):
        names.update(re.findall(r'"(llm_learning_[a-z_]+)"', source.read_text()))
    return names


def test_every_series_the_grafana_dashboard_queries_is_exported() -> None:
    doc = json.loads((DEPLOY / "grafana" / "dashboards" / "selflearn.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert exprs
    exported = _exported_names()
    functions = {"max", "sum", "rate", "increase", "histogram_quantile"}
    for expr in exprs:
        idents = set(re.findall(r"[a-z_][a-z0-9_]*", re.sub(r"by \([^)]*\)|\{[^}]*\}|\[[^\]]*\]", " ", expr)))
        series = idents - functions
        assert series and series <= exported, f"{expr}: {series - exported} is exported by nothing"


def test_prometheus_scrapes_every_worker_and_compose_runs_flower_and_grafana() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    workers = next(j for j in prom["scrape_configs"] if j["job_name"] == "workers")
    names = workers["dns_sd_configs"][0]["names"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert sorted(names) == sorted(n for n in services if n.endswith("-worker"))
    for name in names:
        assert services[name]["tmpfs"] == ["/tmp/prometheus"]
    assert "flower" in services and "grafana" in services
    learning = next(j for j in prom["scrape_configs"] if j["job_name"] == "learning")
    assert learning["metrics_path"] == "/api/admin/llm-learning/metrics"
    assert learning["authorization"]["credentials_file"] in " ".join(services["prometheus"]["command"])
    mounts = " ".join(services["grafana"]["volumes"])
    assert "deploy/grafana/provisioning" in mounts and "deploy/grafana/dashboards" in mounts
