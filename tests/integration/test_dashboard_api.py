"""The dashboard's HTTP surface through a real HTTP client: admin guard, shapes, exports, page, metrics."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.redis_server import RedisServer
from services.dashboard import handlers
from services.dashboard.config import DashboardSettings
from services.dashboard.main import create_app
from shared.contracts import ExplanationCreated, FeedbackRecorded

TOKEN = "dash-test-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_ROUTES = (
    "/api/admin/llm-learning",
    "/api/admin/llm-learning/export?format=csv",
    "/api/admin/llm-learning/export?format=json",
    "/api/admin/llm-learning/stream",
)


@pytest.fixture
def client(tmp_path: Path, redis_server: RedisServer) -> Iterator[TestClient]:
    settings = DashboardSettings(admin_token=SecretStr(TOKEN), data_dir=tmp_path, redis_url=redis_server.url)
    with TestClient(create_app(settings)) as c:
        yield c


def feed(client: TestClient, ticker: str = "AAPL", rating: Literal[1, -1] = 1, stars: int | None = 4) -> None:
    """Apply an explanation and a vote to the app's own read model, as its worker would."""
    store = client.app.state.store  # type: ignore[attr-defined]
    now = datetime.now(UTC)
    ex = ExplanationCreated(
        explanation_id=uuid.uuid4(), request_key="k", ticker=ticker, signal="BUY", prompt_name="explain",
        prompt_version="v1.0", model="offline", provider="offline", prompt_text="p", text="t", tokens_in=5,
        tokens_out=7, cost_usd=0.001, latency_ms=50.0, created_at=now,
    )  # fmt: skip
    handlers.on_explanation_created(ex, store.uow())
    fb = FeedbackRecorded(
        feedback_id=uuid.uuid4(), explanation_id=ex.explanation_id, session_key="s", rating=rating, stars=stars,
        submitted_at=now, prompt_name="explain", prompt_version="v1.0", model="offline", signal="BUY", ticker=ticker,
    )  # fmt: skip
    handlers.on_feedback_recorded(fb, store.uow())


@pytest.mark.parametrize("path", ADMIN_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN}],
    ids=["none", "wrong-token", "no-scheme", "basic"],
)
def test_admin_routes_refuse_without_the_right_token(client: TestClient, path: str, headers: dict) -> None:
    feed(client)
    r = client.get(path, headers=headers)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["status"] == 401 and body["error"]["message"]
    assert "totals" not in r.text and "AAPL" not in r.text


def test_stats_shape_with_the_token(client: TestClient) -> None:
    feed(client, rating=1, stars=4)
    feed(client, rating=-1, stars=None)
    r = client.get("/api/admin/llm-learning", headers=ADMIN)
    assert r.status_code == 200
    s = r.json()
    for key in (
        "totals", "daily", "per_prompt_version", "per_model", "per_signal", "tickers", "cost_vs_quality",
        "experiments", "heatmap", "alerts", "champions", "models", "finetune_jobs", "pending_votes", "days",
    ):  # fmt: skip
        assert key in s, key
    t = s["totals"]
    assert (t["explanations"], t["votes"], t["feedback_rate"], t["positive_rate"], t["avg_rating"]) == (
        2, 2, 1.0, 0.5, 4.0,
    )  # fmt: skip
    [version] = s["per_prompt_version"]
    assert (version["prompt_version"], version["votes"], version["positive_rate"]) == ("v1.0", 2, 0.5)
    assert s["days"] == 30


def test_stats_show_each_queue_depth_and_the_age_of_its_oldest_message(client: TestClient) -> None:
    from datetime import timedelta

    from shared.bus import SUBSCRIPTIONS, CeleryBus

    bus: CeleryBus = client.app.state.bus  # type: ignore[attr-defined]
    for q in ("router", "feedback", "optimizer", "finetune", "dashboard"):
        bus._redis.delete(q)
    old = FeedbackRecorded(
        feedback_id=uuid.uuid4(), explanation_id=uuid.uuid4(), session_key="s", rating=1, stars=None,
        submitted_at=datetime.now(UTC), prompt_name="explain", prompt_version="v1.0", model="offline",
        signal="BUY", ticker="AAPL",
    ).model_copy(update={"occurred_at": datetime.now(UTC) - timedelta(seconds=90)})  # fmt: skip
    bus.publish(old)  # waits, unconsumed, on the queue of every subscriber
    queues = {q["queue"]: q for q in client.get("/api/admin/llm-learning", headers=ADMIN).json()["queues"]}
    subscribers = {t.split(".")[0] for t in SUBSCRIPTIONS["feedback.recorded"]}
    assert set(queues) == {"router", "feedback", "optimizer", "finetune", "dashboard"}
    for name, q in queues.items():
        if name in subscribers:
            assert q["depth"] == 1 and 89 <= q["oldest_age_s"] < 120, q
        else:
            assert q["depth"] == 0 and q["oldest_age_s"] == 0, q


def test_days_parameter_is_validated(client: TestClient) -> None:
    assert client.get("/api/admin/llm-learning?days=7", headers=ADMIN).json()["days"] == 7
    for bad in ("0", "-3", "100000"):
        r = client.get(f"/api/admin/llm-learning?days={bad}", headers=ADMIN)
        assert r.status_code == 422, bad
        assert "days" in r.json()["error"]["message"]
    r = client.get("/api/admin/llm-learning?days=week", headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["message"]


def test_csv_export_is_text_csv_with_a_header_row(client: TestClient) -> None:
    feed(client)
    r = client.get("/api/admin/llm-learning/export?format=csv", headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    header, first = r.text.splitlines()[:2]
    assert header.startswith("day,explanations,with_feedback,votes,positives")
    assert "positive_rate_ci_low" in header
    assert first.split(",")[3] == "1"  # one vote today


def test_json_export_has_rows(client: TestClient) -> None:
    feed(client, ticker="MSFT")
    r = client.get("/api/admin/llm-learning/export?format=json&table=explanations", headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["table"] == "explanations"
    [row] = body["rows"]
    assert (row["ticker"], row["votes"], row["positives"]) == ("MSFT", 1, 1)


def test_an_exported_formula_is_neutralised_in_csv(client: TestClient) -> None:
    for ticker in ('=HYPERLINK("http://x")', "+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "SAFE"):
        feed(client, ticker=ticker)
    r = client.get("/api/admin/llm-learning/export?format=csv&table=explanations", headers=ADMIN)
    assert r.status_code == 200
    rows = list(csv.DictReader(io.StringIO(r.text, newline="")))
    tickers = sorted(row["ticker"] for row in rows)
    assert tickers == sorted(['\'=HYPERLINK("http://x")', "'+1", "'-2+3", "'@SUM(A1)", "'\tTAB", "'\rCR", "SAFE"])
    assert all(float(row["cost_usd"]) > 0 for row in rows)  # numbers are not touched
    # JSON is data, not a spreadsheet: values stay as they are
    body = client.get("/api/admin/llm-learning/export?format=json&table=explanations", headers=ADMIN).json()
    assert '=HYPERLINK("http://x")' in {row["ticker"] for row in body["rows"]}


def test_long_exports_come_in_pages_each_row_once(client: TestClient) -> None:
    for i in range(7):
        feed(client, ticker=f"T{i}")
    store = client.app.state.store  # type: ignore[attr-defined]
    pages = list(handlers.explanation_pages(store.reader, 30, page_size=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    ids = [row["explanation_id"] for page in pages for row in page]
    assert len(set(ids)) == 7 and "_cursor" not in pages[0][0]
    csv_rows = list(csv.DictReader(io.StringIO(client.get(
        "/api/admin/llm-learning/export?format=csv&table=explanations", headers=ADMIN
    ).text)))  # fmt: skip
    assert sorted(r["explanation_id"] for r in csv_rows) == sorted(ids)


def test_export_rejects_unknown_format_and_table(client: TestClient) -> None:
    r = client.get("/api/admin/llm-learning/export?format=xml", headers=ADMIN)
    assert r.status_code == 422 and "format" in r.json()["error"]["message"]
    r = client.get("/api/admin/llm-learning/export?format=csv&table=secrets", headers=ADMIN)
    assert r.status_code == 422 and "table must be one of" in r.json()["error"]["message"]


def test_stream_sends_a_snapshot_event(client: TestClient) -> None:
    feed(client)
    with client.stream("GET", "/api/admin/llm-learning/stream?max_events=1", headers=ADMIN) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    match = re.search(r"event: snapshot\ndata: (.+)\n\n", text)
    assert match, text
    assert json.loads(match.group(1))["totals"]["votes"] == 1


def test_page_and_its_assets_are_served_without_external_resources(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<explanation-card" in page and "<feedback-stats" in page  # the page uses the embeddable components
    for asset, kind in (
        ("/static/components.js", "javascript"),
        ("/static/app.js", "javascript"),
        ("/static/style.css", "text/css"),
    ):
        a = client.get(asset)
        assert a.status_code == 200 and kind in a.headers["content-type"], asset
        page += a.text
    assert '"aria-label": "Thumbs up: helpful"' in page and '"aria-label": "Thumbs down: not helpful"' in page
    # the icons are inline SVG: no emoji, which a machine without an emoji font draws as empty boxes
    assert not re.search("[\U0001f000-\U0001faff\u2600-\u27bf\ufe0f]", page)
    # no CDN, no web fonts: every src / href / url() / import stays on this origin
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    assert "@import" not in page
    assert client.get("/static/nope.js").status_code == 404


def test_learning_figures_are_gauges_for_admins_only_and_not_on_public_metrics(client: TestClient) -> None:
    feed(client, rating=1)
    feed(client, rating=-1)
    public = client.get("/metrics").text
    assert "llm_learning_positive_rate" not in public and "llm_learning_votes" not in public
    assert "llm_learning_stream_clients" in public  # operational series stay
    assert client.get("/api/admin/llm-learning/metrics").status_code == 401
    text = client.get("/api/admin/llm-learning/metrics", headers=ADMIN).text
    assert 'llm_learning_positive_rate{window="30d"} 0.5' in text
    assert 'llm_learning_votes{window="30d"} 2.0' in text
    assert 'llm_learning_version_positive_rate{prompt_name="explain",prompt_version="v1.0",window="30d"} 0.5' in text


def test_figures_are_computed_once_per_change_of_the_read_model(client: TestClient) -> None:
    cache = client.app.state.snapshots  # type: ignore[attr-defined]
    feed(client, rating=1)
    client.get("/api/admin/llm-learning", headers=ADMIN)
    before = cache.computed
    for _ in range(3):  # admin reloads and scrapes: no new computation while nothing changed
        assert client.get("/api/admin/llm-learning", headers=ADMIN).json()["totals"]["votes"] == 1
        client.get("/api/admin/llm-learning/metrics", headers=ADMIN)
    assert cache.computed == before
    feed(client, rating=-1)
    assert client.get("/api/admin/llm-learning", headers=ADMIN).json()["totals"]["votes"] == 2
    assert cache.computed == before + 1


def test_health_is_ok(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"


def test_an_allowed_origin_may_load_the_components_and_read_the_stats_with_the_token(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """What <feedback-stats> on a host page of another origin needs: a preflight for a GET with Authorization,
    then the answer with CORS headers; another origin gets no CORS answer, so its browser shows nothing."""
    settings = DashboardSettings(
        admin_token=SecretStr(TOKEN),
        data_dir=tmp_path,
        redis_url=redis_server.url,
        allowed_origins="https://app.example",
    )
    with TestClient(create_app(settings)) as client:
        pre = client.options(
            "/api/admin/llm-learning",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = client.get(
            "/api/admin/llm-learning",
            headers={"Origin": "https://app.example", "Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "learning_curve" in r.json()
        other = client.options(
            "/api/admin/llm-learning",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in other.headers
        assert client.get("/static/components.js").status_code == 200
