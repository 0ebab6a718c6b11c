"""A clustered A/A end to end, over HTTP with every real service: users ask for many explanations in one
session, and sessions differ (some users like everything, others nothing), while both arms are equally good.
The optimizer must ship nothing, and the interval it reports must be the session-clustered one computed here
from what was served and voted (statsmodels' cluster-robust OLS), wider than one that took each vote alone."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
import statsmodels.api as sm

from gateway.run import Stack
from tests.conftest import FAST_ENV
from tests.e2e.test_learning_loop import PLAIN, champion, start_experiment
from tests.support import wait_for

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {FAST_ENV['ADMIN_TOKEN']}"}
TICKERS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "AMD", "INTC", "ORCL", "IBM", "SAP")
SIGNALS = ("BUY", "SELL", "HOLD")
PER_SESSION = 10


def _likes(session: int) -> float:
    """Sessions differ: a third like everything, a third nothing, a third half of it."""
    return (1.0, 0.0, 0.5)[session % 3]


def test_clustered_aa_ships_nothing_and_reports_an_interval_no_narrower_than_the_clustered_one(
    http: httpx.Client,
) -> None:
    before = champion(http)
    http.post("/api/prompts/explain_signal/versions", json={"template": PLAIN}, headers=ADMIN).raise_for_status()
    plain = [v for v in http.get("/api/prompts/explain_signal").json()["versions"] if v["template"] == PLAIN][0]
    exp = start_experiment(
        http,
        before["version"],
        plain["version"],
        before["model"],
        min_duration_s=1,
        # Enough sessions before a decision can end it. The arms are split by session at random; when few
        # sessions were voted, one arm's may all be of one kind (all liking, or all half-and-half), and its
        # design effect is then 1. With 40 votes an arm, decisions ended runs after 8 to 23 sessions; a
        # simulation of this split gave a design effect of 2 or less in 7% of splits of 8 sessions and 0.5% of
        # 16; from 36 sessions on (180 votes an arm), in none of 20,000.
        min_feedback_per_arm=180,
        max_feedback_per_arm=240,
    )
    wait_for(
        lambda: (
            http.post(
                "/api/explanations",
                json={"ticker": "AAPL", "signal": "BUY", "context": {"rsi": 1}, "session_id": "probe"},
            ).json()["experiment_id"]
            == exp
        ),
        timeout_s=30,
        what="the router to serve the experiment",
    )
    votes: list[tuple[str, int, int]] = []  # (arm, session, thumbs up)
    for s in range(60):
        session_id = f"clustered-{s}"
        for j in range(PER_SESSION):
            r = http.post(
                "/api/explanations",
                json={
                    "ticker": TICKERS[j % len(TICKERS)],
                    "signal": SIGNALS[(s + j) % 3],
                    "context": {"rsi": 20 + j, "session": s},
                    "session_id": session_id,
                },
            )
            assert r.status_code == 201, r.text
            out = r.json()
            if out["experiment_id"] != exp:
                break
            up = int(j * _likes(s)) < int((j + 1) * _likes(s)) if _likes(s) not in (0.0, 1.0) else _likes(s) == 1.0
            fb = http.post(
                f"/api/feedback/{out['explanation_id']}", json={"rating": 1 if up else -1, "session_id": session_id}
            )
            assert fb.status_code == 202, fb.text
            votes.append((out["arm_id"], s, int(up)))
        status = http.get(f"/api/experiments/{exp}").json()["status"]
        if status != "running":
            break

    def settled() -> dict[str, Any] | None:
        # Every vote and every exposure: a vote that arrives before its explanation's exposure is a unit of its
        # own until the exposure names its session, which changes the clustered interval (not the difference).
        # The probe that found the experiment running was served in it too.
        view = http.get(f"/api/experiments/{exp}").json()
        counted = sum(a["n"] for a in view["analysis"]["arms"])
        exposed = sum(a["exposures"] for a in view["analysis"]["arms"])
        return view if counted == len(votes) and exposed >= len(votes) + 1 else None

    view = wait_for(settled, timeout_s=60, what="every vote and every exposure to reach the optimizer")
    assert view["decision"]["status"] != "ship" and view["winner_arm_id"] is None, view["decision"]
    assert champion(http) == before

    # The session-clustered reference from what this test served and voted. The unit is a session on its arm
    # (as the optimizer analyses it): when a treatment found futile is dropped from the split mid-run, the rest
    # of a session that was on it is served by the control, and those two parts count as two units.
    arm = np.array([0.0 if a == "control" else 1.0 for a, _, _ in votes])
    y = np.array([u for _, _, u in votes], dtype=float)
    groups = np.unique([f"{a}/{s}" for a, s, _ in votes], return_inverse=True)[1]
    fit = sm.OLS(y, sm.add_constant(arm)).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}, use_t=False
    )
    lo, hi = fit.conf_int(alpha=0.05)[1]
    t1 = next(a for a in view["analysis"]["arms"] if a["arm_id"] == "t1")
    assert t1["diff"] == pytest.approx(float(fit.params[1]), abs=1e-9)
    # the fixed-horizon reference is that interval; the always-valid one the decision uses is wider still
    assert t1["lift_ci_fixed"] == pytest.approx([lo, hi], abs=1e-6)
    seq_lo, seq_hi = t1["lift_ci_sequential"]
    assert seq_hi - seq_lo >= hi - lo
    assert t1["design_effect"] > 2  # the votes of a session move together
    assert view["analysis"]["srm"]["unit"] == "sessions"
    # per signal, shown and never decided on
    assert {r["segment"] for r in view["analysis"]["segments"]["results"]} == {"BUY", "SELL", "HOLD"}


@pytest.mark.browser
def test_the_page_shows_what_the_optimizer_decides_on(system: Stack, http: httpx.Client) -> None:
    """The dashboard page shows, beside its per-vote table, the optimizer's session-level view of each
    experiment: sessions, design effect, the always-valid lift interval, fallback rate, flags and the decision."""
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.test_page import CHROMIUM, CHROMIUM_ARGS, require_chromium

    require_chromium()
    if not http.get("/api/experiments").json()[
        "experiments"
    ]:  # this module's first test ran an experiment; alone, start one to look at
        before = champion(http)
        version = http.post("/api/prompts/explain_signal/versions", json={"template": PLAIN}, headers=ADMIN)
        start_experiment(http, before["version"], version.json()["version"], before["model"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1600})
            page.goto(system.url + "/")
            page.fill("#token", system.env["ADMIN_TOKEN"])
            page.get_by_role("button", name="Show the learning statistics").click()
            view = page.locator(".decision-view").first
            expect(view).to_contain_text("Decision:", timeout=60_000)
            for heading in (
                "Traffic share",
                "Sessions",
                "Design effect",
                "Lift, always-valid interval",
                "Fallback rate",
            ):
                expect(view.locator("th", has_text=heading)).to_be_visible()
            expect(view).to_contain_text("Sample-ratio check on sessions")
            shares = view.locator("tbody tr td:nth-child(2)").all_inner_texts()  # the traffic share of each arm
            assert shares and all(s.endswith("%") for s in shares), shares
            assert abs(sum(float(s.rstrip("%")) for s in shares) - 100) < 1, shares
        finally:
            browser.close()
