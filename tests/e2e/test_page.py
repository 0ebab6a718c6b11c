"""The web page in a real browser against the whole system: ask for an explanation, vote thumbs up, see the
vote in the stats panel (fed by events through the queue), then forget it. The card and the stats panel are
the embeddable components (static/components.js); tests/e2e/test_embed.py drops them into another origin."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from gateway.run import Stack

if TYPE_CHECKING:
    from playwright.sync_api import Page, ViewportSize

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


# Characters an emoji font would be needed for (pictographs, dingbats, the variation selector).
HAS_EMOJI = r"(el) => /[\u{1F000}-\u{1FAFF}\u{2600}-\u{27BF}\u{FE0F}]/u.test(el.shadowRoot.textContent)"

# Every pair of text labels in one chart of a component whose boxes intersect (by more than rounding).
OVERLAPPING_LABELS = """(host) => {
  const out = [];
  for (const chart of host.shadowRoot.querySelectorAll(".chart svg")) {
    const boxes = [...chart.querySelectorAll("text")].map((t) => [t.textContent, t.getBoundingClientRect()]);
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
      const [a, ra] = boxes[i], [b, rb] = boxes[j];
      const apart = ra.right - 1 <= rb.left || rb.right - 1 <= ra.left || ra.bottom - 1 <= rb.top || rb.bottom - 1 <= ra.top;
      if (!apart) out.push([a, b]);
    }
  }
  return out;
}"""


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "no /usr/bin/chromium: install it with `sudo apt-get install -y chromium` (never playwright install)"
        )


@contextmanager
def chromium_page(viewport: ViewportSize | None = None, errors: list[str] | None = None) -> Iterator[Page]:
    """A page in headless Chromium (the system's, `require_chromium`), the browser closed after; with `errors`,
    the page's uncaught exceptions and console errors are added to that list."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=viewport) if viewport else browser.new_page()
            if errors is not None:
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            yield page
        finally:
            browser.close()


def js_pct(positives: int, votes: int) -> str:
    """The page's own percentage format (app.js `pct`)."""
    x = positives / votes
    return f"{100 * x:.0f}%" if x in (0, 1) else f"{100 * x:.1f}%"


def totals(stack: Stack) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {stack.env['ADMIN_TOKEN']}"}
    r = httpx.get(stack.url + "/api/admin/llm-learning", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()["totals"]


def test_vote_in_the_browser_shows_in_the_stats_panel(stack: Stack, tmp_path: Path) -> None:
    require_chromium()
    from playwright.sync_api import expect

    before = totals(stack)  # the stack is shared by the end-to-end tests: count from what is there
    errors: list[str] = []
    with chromium_page({"width": 1200, "height": 1600}, errors=errors) as page:
        page.goto(stack.url + "/")

        page.fill("#ticker", "MSFT")
        page.select_option("#signal", "BUY")
        page.get_by_role("button", name="Explain this signal").click()
        expect(page.locator("#card")).to_be_visible(timeout=30_000)
        expect(page.locator("#card-text")).not_to_be_empty()
        expect(page.locator("#card-version")).not_to_be_empty()
        expect(page.locator("#card-model")).not_to_be_empty()
        expect(page.locator("#card-latency")).to_contain_text("ms")
        # the thumbs are inline SVG icons: nothing on the card needs an emoji font
        expect(page.locator("#thumb-up svg")).to_be_visible()
        assert not page.locator("explanation-card").evaluate(HAS_EMOJI)

        page.get_by_role("radio", name="4 stars").click()
        page.get_by_role("button", name="Thumbs up: helpful").click()
        expect(page.locator("#thanks")).to_have_text("Thanks — recorded", timeout=15_000)
        expect(page.locator("#thumb-up")).to_have_attribute("aria-pressed", "true")

        page.fill("#token", stack.env["ADMIN_TOKEN"])
        page.get_by_role("button", name="Show the learning statistics").click()
        votes = before["votes"] + 1
        # the vote travels feedback API -> queue -> feedback worker -> outbox -> dashboard worker -> stream
        expect(page.locator("#stat-votes")).to_have_text(str(votes), timeout=60_000)
        expect(page.locator("#stat-positive-rate")).to_have_text(js_pct(before["positives"] + 1, votes))
        if before["votes"] == 0:
            expect(page.locator("#stat-positive-rate")).to_have_text("100%")
        expect(page.locator("#stat-explanations")).not_to_have_text("—")
        expect(page.locator("#curve svg")).to_be_visible()
        expect(page.locator("#versions table")).to_be_visible()
        # the optimizer's variant search, read from GET /api/prompts/explain_signal
        expect(page.locator("#search-state")).to_contain_text("champion v", timeout=15_000)
        # a table once a round ran (other end-to-end tests run some); on a fresh system, its empty note
        expect(page.locator("#search-rounds table, #search-rounds p.muted")).to_be_visible()
        expect(page.locator("#curve svg circle").first).to_be_visible()
        assert page.locator("feedback-stats").evaluate(OVERLAPPING_LABELS) == []
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'page.png'}")

        # GDPR: forget this session's feedback; the stats follow through the erasure event
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Forget my feedback: erase every vote and comment of this session").click()
        expect(page.locator("#error")).to_contain_text("erased (1 vote)", timeout=15_000)
        expect(page.locator("#stat-votes")).to_have_text(str(before["votes"]), timeout=60_000)
    assert not errors, errors


def test_page_shows_api_errors(stack: Stack) -> None:
    require_chromium()
    from playwright.sync_api import expect

    with chromium_page() as page:
        page.goto(stack.url + "/")
        page.fill("#token", "not-the-token")
        page.get_by_role("button", name="Show the learning statistics").click()
        alert = page.locator("feedback-stats [role=alert]")
        expect(alert).to_contain_text("401", timeout=15_000)
        expect(alert).to_contain_text("admin token is not valid")
