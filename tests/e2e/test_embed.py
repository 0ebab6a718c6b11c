"""The embeddable components on a page of ANOTHER origin, in a real browser against the whole system.

A host page is served by a second, plain HTTP server (127.0.0.1 on another port); the system runs with that
origin in ALLOWED_ORIGINS. The page loads `/static/components.js` from the gateway and drops in
`<explanation-card>` and `<feedback-stats>`: the card asks for an explanation (a CORS preflight, then the
Origin check), the reader votes thumbs up (the same session id the explanation was asked with), and the vote
reaches the stats widget through the queue. The same page from an origin that is not allowed gets nothing."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from gateway.redis_server import free_port
from gateway.run import Stack
from services.dashboard.domain import wilson_interval
from tests.conftest import FAST_ENV
from tests.e2e.test_page import HAS_EMOJI, OVERLAPPING_LABELS, chromium_page, require_chromium

pytestmark = [pytest.mark.browser, pytest.mark.slow]

HOST_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A host app</title><link rel="icon" href="data:,"></head>
<body style="font-family: sans-serif; max-width: 900px; margin: 1rem auto">
<h1>A trading app that embeds the card</h1>
<script src="{gateway}/static/components.js"></script>
<explanation-card ticker="NVDA" signal="BUY" context='{{"rsi": 31.2, "macd": 0.8}}'></explanation-card>
<h2>Stats</h2>
<feedback-stats days="1"></feedback-stats>
<script>
  // The admin token arrives in the fragment (never sent to this server) and is set as a property.
  document.querySelector("feedback-stats").token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
</script>
</body></html>
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A second origin: a plain static server for the host page (the page is written once the gateway's
    address is known)."""
    root = tmp_path_factory.mktemp("host")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def embed_stack(host: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    origin, root = host
    overrides = {**FAST_ENV, "REDIS_URL": "", "ALLOWED_ORIGINS": origin}
    # A patient start: on a machine busy with other work the gateway's imports alone can take minutes.
    stack = Stack(data_dir=tmp_path_factory.mktemp("embed-system"), port=free_port(), env_overrides=overrides)
    try:
        stack.start(wait_s=240)  # under the suite's 300 s per-test timeout
    except Exception:
        stack.stop()
        raise
    (root / "host.html").write_text(HOST_PAGE.format(gateway=stack.url))
    try:
        yield stack
    finally:
        stack.stop()


def test_card_on_another_origin_completes_the_loop(embed_stack: Stack, host: tuple[str, Path], tmp_path: Path) -> None:
    require_chromium()
    from playwright.sync_api import expect

    origin, _ = host
    token = embed_stack.env["ADMIN_TOKEN"]
    errors: list[str] = []
    with chromium_page({"width": 1000, "height": 1300}, errors=errors) as page:
        page.goto(f"{origin}/host.html#token={token}")

        card = page.locator("explanation-card")
        expect(card.locator("#card-text")).not_to_be_empty(timeout=30_000)
        expect(card.locator("#card-model")).not_to_be_empty()
        expect(card.locator("#card-signal")).to_have_text("BUY")
        # The thumbs are drawn (inline SVG), with no character that needs an emoji font.
        expect(card.locator("#thumb-up svg")).to_be_visible()
        expect(card.locator("#thumb-down svg")).to_be_visible()
        assert not card.evaluate(HAS_EMOJI)

        stats = page.locator("feedback-stats")
        expect(stats.locator("#stat-explanations")).to_have_text("1", timeout=60_000)
        expect(stats.locator("#stat-votes")).to_have_text("0")

        card.get_by_role("radio", name="5 stars").click()
        card.get_by_role("button", name="Thumbs up: helpful").click()
        expect(card.locator("#thanks")).to_have_text("Thanks — recorded", timeout=15_000)
        expect(card.locator("#thumb-up")).to_have_attribute("aria-pressed", "true")

        # browser -> feedback API -> queue -> worker -> outbox -> dashboard -> stream -> the widget
        expect(stats.locator("#stat-votes")).to_have_text("1", timeout=60_000)
        expect(stats.locator("#stat-positive-rate")).to_have_text("100%")
        expect(stats.locator("#stat-avg-rating")).to_have_text("5.00 / 5")
        # A first hour's curve: one point per 5 minutes, with its interval, and a time axis in minutes.
        expect(stats.locator("figcaption").first).to_contain_text("per 5 minutes, with its 95% interval")
        expect(stats.locator("#curve svg circle")).to_have_count(1)
        expect(stats.locator("#curve svg")).to_contain_text("UTC")
        assert stats.evaluate(OVERLAPPING_LABELS) == []

        shot = tmp_path / "embedded.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")

        # The vote went in as this browser's session, which the explanation was served to.
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.get(embed_stack.url + "/api/admin/llm-learning?days=1", headers=headers, timeout=10)
        assert r.json()["totals"]["positives"] == 1
    assert not errors, errors


def test_a_page_of_an_origin_not_allowed_gets_no_explanation(embed_stack: Stack, host: tuple[str, Path]) -> None:
    """The same page from http://localhost:PORT (another origin: not in ALLOWED_ORIGINS): the preflight is
    refused, so the browser sends nothing and the card says why."""
    require_chromium()
    from playwright.sync_api import expect

    origin, _ = host
    other = origin.replace("127.0.0.1", "localhost")
    with chromium_page() as page:
        page.goto(f"{other}/host.html")
        alert = page.locator("explanation-card [role=alert]")
        expect(alert).to_contain_text("Could not get an explanation", timeout=30_000)
        expect(alert).to_contain_text("ALLOWED_ORIGINS")
        expect(page.locator("explanation-card #card-text")).to_be_hidden()
    # The server refuses it too (a client that skips the preflight still meets the Origin check).
    r = httpx.post(
        embed_stack.url + "/api/explanations",
        json={"ticker": "NVDA", "signal": "BUY", "session_id": "other-origin"},
        headers={"Origin": other},
        timeout=10,
    )
    assert r.status_code == 403, r.text


def crowded_snapshot() -> dict:
    """A snapshot whose charts are hard to label: eight model/version points within a few cents and
    percentage points of each other, and a curve over three weeks."""
    start = datetime(2026, 3, 1, tzinfo=UTC)
    points = []
    for day in range(21):
        votes = 5 + day
        positives = votes // 2 + day // 3
        lo, hi = wilson_interval(positives, votes) or (0.0, 1.0)
        t = start + timedelta(days=day)
        points.append(
            {
                "start": t.isoformat(),
                "end": (t + timedelta(days=1)).isoformat(),
                "explanations": votes,
                "votes": votes,
                "positives": positives,
                "positive_rate": positives / votes,
                "positive_rate_ci": [lo, hi],
            }
        )
    models = [
        {
            "model": f"groq/llama-3.1-8b-instant-{i}",
            "prompt_name": "explain_signal",
            "prompt_version": f"v1.{i}",
            "explanations": 50,
            "votes": 40,
            "cost_per_explanation": 0.0010 + 0.00002 * i,
            "positive_rate": 0.70 + 0.004 * i,
            "positive_rate_ci": [0.6, 0.8],
            "avg_latency_ms": 300.0,
        }
        for i in range(8)
    ]
    totals = {
        "explanations": 400,
        "votes": 320,
        "feedback_rate": 0.8,
        "positive_rate": 0.71,
        "positive_rate_ci": [0.66, 0.76],
        "avg_rating": 4.1,
        "cost_per_explanation": 0.00107,
        "avg_latency_ms": 300.0,
    }
    until = (start + timedelta(days=21)).isoformat()
    return {
        "totals": totals,
        "alerts": [],
        "learning_curve": {"bucket_s": 86400, "until": until, "points": points},
        "cost_vs_quality": models,
    }


def test_charts_keep_their_labels_apart_on_crowded_data(tmp_path: Path) -> None:
    """No system needed: the widget renders a crowded snapshot; no two labels of a chart overlap (a label
    with no free spot is left to its point's tooltip), and every point is still drawn."""
    require_chromium()
    script = (Path(__file__).resolve().parents[2] / "services/dashboard/static/components.js").read_text()
    with chromium_page({"width": 800, "height": 700}) as page:
        page.set_content("<!doctype html><body><feedback-stats></feedback-stats></body>")
        page.add_script_tag(content=script)
        stats = page.locator("feedback-stats")
        stats.evaluate("(el, s) => el._render(s)", crowded_snapshot())
        assert stats.locator("#curve svg circle").count() == 21
        assert stats.locator("#cost-quality svg circle").count() == 8
        assert stats.locator("#cost-quality svg text").count() >= 5  # axis labels and some point labels
        assert stats.evaluate(OVERLAPPING_LABELS) == []
        page.screenshot(path=str(tmp_path / "crowded.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'crowded.png'}")
