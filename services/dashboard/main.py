"""The dashboard service's app: `create_app()`, its lifespan, the static page and the Prometheus gauges."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.dashboard import api, handlers
from services.dashboard.config import DashboardSettings, get_settings
from services.dashboard.store import Store
from shared.web import service_app, start_service

log = logging.getLogger(__name__)


class StreamGauge(Collector):
    """The one dashboard series on the public `/metrics` (operational: open live-stream connections)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("llm_learning_stream_clients", "Live stream connections open now")
        g.add_metric([], float(getattr(self.app.state, "open_streams", 0)))
        yield g
        cache = getattr(self.app.state, "snapshots", None)
        if cache is not None:
            c = CounterMetricFamily("llm_learning_snapshots_computed", "Times the dashboard figures were computed")
            c.add_metric([], float(cache.computed))
            yield c


class StatsCollector(Collector):
    """Gauges of the main figures (over the default window), from the snapshot cache: served to admins only
    (`/api/admin/llm-learning/metrics`)."""

    def __init__(self, app: FastAPI, settings: DashboardSettings) -> None:
        self.app = app
        self.settings = settings

    def describe(self) -> list[Metric]:
        return []  # no query at registration; the figures are read on each scrape

    def collect(self) -> Iterator[Metric]:
        store: Store | None = getattr(self.app.state, "store", None)
        if store is None:
            return
        try:
            snap = self.app.state.snapshots.get(
                store.reader, self.settings.default_days, api.read_policy(self.settings)
            )
        except Exception:  # a scrape must not fail the /metrics page
            log.exception("could not read the dashboard figures for /metrics")
            return
        window = f"{self.settings.default_days}d"
        totals: dict[str, Any] = snap["totals"]
        simple = {
            "llm_learning_explanations": ("Explanations in the window", totals["explanations"]),
            "llm_learning_votes": ("Votes (thumbs up or down) in the window", totals["votes"]),
            "llm_learning_feedback_rate": (
                "Explanations with at least one vote / explanations",
                totals["feedback_rate"],
            ),
            "llm_learning_positive_rate": ("Thumbs up / votes", totals["positive_rate"]),
            "llm_learning_avg_rating": ("Mean stars over votes with stars", totals["avg_rating"]),
            "llm_learning_cost_per_explanation_usd": ("Mean cost of an explanation", totals["cost_per_explanation"]),
            "llm_learning_avg_latency_ms": ("Mean latency of an explanation", totals["avg_latency_ms"]),
            "llm_learning_pending_votes": ("Votes whose explanation has not arrived yet", snap["pending_votes"]),
            "llm_learning_alerts": ("Anomaly alerts stored (latest 50)", len(snap["alerts"])),
        }
        for name, (doc, value) in simple.items():
            g = GaugeMetricFamily(name, doc, labels=["window"])
            if value is not None:
                g.add_metric([window], float(value))
            yield g
        by_version = {
            "llm_learning_version_positive_rate": ("Positive rate per prompt version", "positive_rate"),
            "llm_learning_version_votes": ("Votes per prompt version", "votes"),
            "llm_learning_version_cost_per_explanation_usd": (
                "Cost per explanation per version",
                "cost_per_explanation",
            ),
        }
        for name, (doc, field) in by_version.items():
            g = GaugeMetricFamily(name, doc, labels=["window", "prompt_name", "prompt_version"])
            for row in snap["per_prompt_version"]:
                if row[field] is not None:
                    g.add_metric([window, row["prompt_name"], row["prompt_version"]], float(row[field]))
            yield g


def create_app(settings: DashboardSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The bus only reads the queues' lag for the figures: the dashboard publishes nothing.
        store = start_service(app, settings, Store)
        yield
        store.dispose()

    app = service_app(settings, lifespan, api.router)
    app.state.snapshots = handlers.SnapshotCache()
    app.state.metrics.registry.register(StreamGauge(app))
    app.state.learning_registry = CollectorRegistry()
    app.state.learning_registry.register(StatsCollector(app, settings))
    app.mount("/static", StaticFiles(directory=api.STATIC_DIR), name="static")
    return app
