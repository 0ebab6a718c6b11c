// The explanation page: ask for an explanation, vote on it, and watch the learning figures. The card and the
// stats widget are the embeddable components (components.js); this file adds the ask form, erasure and the
// detailed tables. Plain JS, no build step, no external resources. Every text from the API goes in via textContent.
"use strict";

const $ = (id) => document.getElementById(id);

// ---- small helpers -------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const { pct, num, ms, usd } = window.SelfLearn.format;

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}
function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Calls the API (the components' call, on this page's origin); a non-2xx answer becomes an Error with the API's own
// message ({"error": {status, message}}).
const api = window.SelfLearn.api;

// ---- the anonymous session (shared with the card: the vote must carry the id the explanation was asked with)
const sessionId = () => window.SelfLearn.sessionId();
$("session-id").textContent = sessionId().slice(0, 8) + "…";

// ---- ask: the card does the asking, voting and showing ---------------------------------------------------
const card = $("card");
$("ask-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearError();
  const ticker = $("ticker").value.trim().toUpperCase();
  if (!ticker) { showError("Enter a ticker."); return; }
  const context = {};
  for (const [key, id] of [["rsi", "rsi"], ["macd", "macd"], ["change_pct_1d", "change"], ["volume_ratio", "volume"]]) {
    const v = $(id).value.trim();
    if (v !== "") context[key] = Number(v);
  }
  const button = $("explain");
  button.disabled = true;
  button.textContent = "Explaining…";
  card.hidden = false;
  try {
    await card.explain({ ticker, signal: $("signal").value, context });
  } catch {
    // the card shows what went wrong
  } finally {
    button.disabled = false;
    button.textContent = "Explain";
  }
});

$("forget").addEventListener("click", async () => {
  clearError();
  if (!window.confirm("Erase every vote and comment this browser session has given?")) return;
  try {
    const data = await api("DELETE", `/api/feedback/sessions/${encodeURIComponent(sessionId())}`);
    showInfo(`Your feedback was erased (${data.votes_erased} vote${data.votes_erased === 1 ? "" : "s"}).`);
  } catch (e) {
    showError(`Could not erase your feedback — ${e.message}`);
  }
});

function showInfo(message) {
  const box = $("error");
  box.hidden = false;
  box.className = "error info";
  box.textContent = message;
  setTimeout(() => { box.className = "error"; clearError(); }, 6000);
}

// ---- the detailed tables, from each snapshot the stats widget loads --------------------------------------
const stats = $("stats");
stats.addEventListener("stats", (ev) => renderTables(ev.detail));

function renderTables(s) {
  $("stats-body").hidden = false;
  loadSearch();
  const figCols = [
    ["Explanations", (r) => r.explanations], ["Votes", (r) => r.votes], ["Feedback", (r) => pct(r.feedback_rate)],
    ["Positive", (r) => pct(r.positive_rate)], ["Avg stars", (r) => num(r.avg_rating)], ["Cost/expl.", (r) => usd(r.cost_per_explanation)],
    ["Latency", (r) => ms(r.avg_latency_ms)],
  ];
  $("versions").replaceChildren(table([["Prompt version", (r) => `${r.prompt_name} ${r.prompt_version}`], ...figCols], s.per_prompt_version));
  $("signals").replaceChildren(table([["Signal", (r) => r.signal], ...figCols], s.per_signal));
  const tickerCols = [["Ticker", (r) => r.ticker], ["Votes", (r) => r.votes], ["Positive", (r) => pct(r.positive_rate)], ["Avg stars", (r) => num(r.avg_rating)]];
  const note = `no ticker has ${s.tickers.min_votes}+ votes yet`;
  $("top-tickers").replaceChildren(table(tickerCols, s.tickers.top, note));
  $("bottom-tickers").replaceChildren(table(tickerCols, s.tickers.bottom, note));
  $("heatmap").replaceChildren(heatmap(s.heatmap));
  $("experiments").replaceChildren(...experiments(s.experiments));
  $("daily").replaceChildren(table([["Day", (r) => r.day], ...figCols], s.daily.slice(-14).reverse()));
  if (s.queues !== undefined) {  // the polled stats carry the queue lag; the live stream's snapshots do not
    const lagCols = [["Queue", (r) => r.queue], ["Waiting", (r) => String(r.depth)],
      ["Oldest waiting (s)", (r) => (r.oldest_age_s === null ? "—" : num(r.oldest_age_s, 1))]];
    $("queues").replaceChildren(s.queues === null ? el("p", { class: "muted" }, "the broker did not answer") : table(lagCols, s.queues));
  }
}

function table(columns, rows, emptyNote = "no data yet") {
  if (!rows.length) return el("p", { class: "muted" }, emptyNote);
  const head = el("tr", {}, ...columns.map(([h]) => el("th", { scope: "col" }, h)));
  const body = rows.map((r) => el("tr", {}, ...columns.map(([, f]) => el("td", {}, f(r)))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

function heatColor(rate) {
  // red (0%) -> amber (50%) -> green (100%)
  const hue = Math.round(120 * rate);
  return `hsl(${hue}, 65%, 80%)`;
}

function heatmap(h) {
  if (!h.cells.length) return el("p", { class: "muted" }, "no data yet");
  const byKey = new Map(h.cells.map((c) => [`${c.signal}|${c.ticker}`, c]));
  const head = el("tr", {}, el("th", { scope: "col" }, "Signal"), ...h.tickers.map((t) => el("th", { scope: "col" }, t)));
  const rows = h.signals.map((s) => el("tr", {}, el("th", { scope: "row" }, s), ...h.tickers.map((t) => {
    const c = byKey.get(`${s}|${t}`);
    if (!c || c.positive_rate === null) return el("td", { class: "muted" }, "·");
    const td = el("td", { title: `${c.votes} votes` }, pct(c.positive_rate));
    td.style.background = heatColor(c.positive_rate);
    return td;
  })));
  return el("table", { class: "heat" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

// The optimizer's variant search (GET /api/prompts/{name}, public): rounds, what each tried and learned.
let searchLoadedAt = 0;
async function loadSearch() {
  if (Date.now() - searchLoadedAt < 5000) return;  // the stream may redraw often; the search changes per round
  searchLoadedAt = Date.now();
  let p;
  try { p = await api("GET", "/api/prompts/explain_signal"); } catch (e) { $("search-state").textContent = `search unavailable (${e.message})`; return; }
  const s = p.search || { rounds: [] };
  $("search-state").textContent = s.exhausted
    ? `Search exhausted at champion ${s.champion_version}: ${s.exhausted_reason}. Generation has stopped.`
    : `Searching: champion ${s.champion_version}, ${s.remaining ?? "?"} combinations left to try.`;
  const lift = (x) => (x === null || x === undefined ? "—" : `${x >= 0 ? "+" : ""}${(100 * x).toFixed(1)}%`);
  const rounds = s.rounds.map((r, i) => ({ ...r, n: i + 1 })).reverse();
  $("search-rounds").replaceChildren(table([
    ["Round", (r) => r.n], ["Control", (r) => r.control.version],
    ["Tried (lift)", (r) => r.tried.map((t) => `${t.version} ${lift(t.lift)}`).join(", ") || "—"],
    ["Votes", (r) => r.votes], ["Learned", (r) => r.learned],
  ], rounds, "no round yet"));
}

function experiments(list) {
  if (!list.length) return [el("p", { class: "muted" }, "no experiment yet")];
  return list.map((e) => {
    const cols = [
      ["Arm", (a) => `${a.arm_id}${a.is_control ? " (control)" : ""}`], ["Variant", (a) => `${a.prompt_version || "?"} · ${a.model || "?"}`],
      ["Votes", (a) => a.votes], ["Positive", (a) => pct(a.positive_rate)],
      ["95% CI", (a) => (a.positive_rate_ci ? `${pct(a.positive_rate_ci[0])}–${pct(a.positive_rate_ci[1])}` : "—")],
      ["Lift", (a) => (a.lift === null ? "—" : `${a.lift >= 0 ? "+" : ""}${(100 * a.lift).toFixed(1)}%`)],
      ["P(beats control)", (a) => pct(a.prob_beats_control)], ["Avg stars", (a) => num(a.avg_rating)], ["Cost/expl.", (a) => usd(a.cost_per_explanation)],
    ];
    const status = e.status === "concluded" ? `concluded: ${e.decision || ""}${e.winner_arm_id ? ` (winner ${e.winner_arm_id})` : ""}` : e.status;
    const decision = el("div", { class: "decision-view", "data-experiment": e.experiment_id }, el("p", { class: "muted" }, "loading the optimizer's analysis…"));
    loadDecisionView(e.experiment_id, decision);
    return el("div", { class: "experiment" }, el("p", {}, el("strong", {}, e.experiment_id), ` — ${e.prompt_name || ""} — ${status}`),
      el("p", { class: "muted" }, "Per vote (each vote counted as independent, Wilson interval):"), table(cols, e.arms), decision);
  });
}

// The figures the optimizer decides on (GET /api/experiments/{id}): sessions as the unit, the session-clustered
// design effect, the always-valid interval for the lift (the one the decision reads), fallbacks excluded and
// their rate, futility and novelty, and per-signal segments that disagree with the overall result; the traffic
// share is each arm's weight now (0 for an arm that can no longer win).
async function loadDecisionView(id, into) {
  let x;
  try { x = await api("GET", `/api/experiments/${encodeURIComponent(id)}`); } catch (err) {
    into.replaceChildren(el("p", { class: "muted" }, `the optimizer's analysis is unavailable (${err.message})`)); return;
  }
  const a = x.analysis || {};
  const rel = (ci) => (ci ? `${ci[0] >= 0 ? "+" : ""}${(100 * ci[0]).toFixed(1)}% … ${ci[1] >= 0 ? "+" : ""}${(100 * ci[1]).toFixed(1)}%` : "—");
  const cols = [
    ["Arm", (r) => `${r.arm_id}${r.is_control ? " (control)" : ""}`], ["Traffic share", (r) => pct(r.weight)],
    ["Sessions", (r) => r.sessions], ["Votes", (r) => r.n],
    ["Positive", (r) => pct(r.rate)], ["Design effect", (r) => num(r.design_effect)],
    ["Lift, always-valid interval", (r) => (r.is_control ? "—" : rel(r.lift_ci_relative))],
    ["Fallback rate", (r) => pct(r.fallback_rate)],
    ["Flags", (r) => [r.futile ? "futile" : "", r.novelty_flag ? "fading novelty" : ""].filter(Boolean).join(", ") || "—"],
  ];
  const srm = a.srm || {};
  const seg = a.segments || {};
  const d = x.decision || {};
  into.replaceChildren(
    el("p", { class: "muted" }, `What the optimizer decides on (unit: ${a.unit || "session"}; ${a.interval_kind || ""}):`),
    table(cols, a.arms || []),
    el("p", {}, el("strong", {}, `Decision: ${d.status || "?"}`), d.reason ? ` — ${d.reason}` : ""),
    el("p", { class: "muted" }, `Sample-ratio check on ${srm.unit || "sessions"}: ${srm.flagged ? "MISMATCH" : "ok"}` +
      (srm.p_value === null || srm.p_value === undefined ? "" : ` (p=${Number(srm.p_value).toPrecision(2)})`) +
      `. Segments by ${seg.by || "signal"}: ${(seg.disagreeing || []).length ? `disagreeing: ${seg.disagreeing.join(", ")}` : "none disagrees"} (${seg.note || "segments inform"}).`),
  );
}

for (const b of document.querySelectorAll("[data-export]")) {
  b.addEventListener("click", async () => {
    clearError();
    const format = b.getAttribute("data-export");
    try {
      const res = await fetch(`/api/admin/llm-learning/export?format=${format}&table=daily&days=${stats.days}`, { headers: { Authorization: `Bearer ${stats.token}` } });
      if (!res.ok) {
        const data = await res.json().catch(() => null);
        throw new Error(`${res.status}: ${data && data.error ? data.error.message : res.statusText}`);
      }
      const url = URL.createObjectURL(await res.blob());
      const a = el("a", { href: url, download: `llm-learning-daily.${format}` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (e) {
      showError(`Export failed — ${e.message}`);
    }
  });
}

