// The explanation page: ask for an explanation, vote on it, and watch the learning figures.
// Plain JS, no build step, no external resources. Every text from the API goes in via textContent.
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
const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
const pct = (x) => (x === null || x === undefined ? "—" : `${(100 * x).toFixed(x === 1 || x === 0 ? 0 : 1)}%`);
const num = (x, d = 2) => (x === null || x === undefined ? "—" : Number(x).toFixed(d));
const usd = (x) => (x === null || x === undefined ? "—" : x === 0 ? "$0" : `$${Number(x).toFixed(x < 0.01 ? 5 : 3)}`);
const ms = (x) => (x === null || x === undefined ? "—" : `${x < 10 ? Number(x).toFixed(1) : Math.round(x)} ms`);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}
function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Calls the API; a non-2xx answer becomes an Error with the API's own message ({"error": {status, message}}).
async function api(method, path, body, headers = {}) {
  const init = { method, headers: { ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new Error(`Network error: ${e.message}`);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const msg = data && data.error ? data.error.message : text || res.statusText;
    const err = new Error(`${res.status}: ${msg}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

// ---- the anonymous session -----------------------------------------------------------------------------
function sessionId() {
  let id = localStorage.getItem("selflearn.session_id");
  if (!id) {
    id = (crypto.randomUUID ? crypto.randomUUID() : `s-${Date.now()}-${Math.random().toString(16).slice(2)}`);
    localStorage.setItem("selflearn.session_id", id);
  }
  return id;
}
$("session-id").textContent = sessionId().slice(0, 8) + "…";

// ---- explanation card ----------------------------------------------------------------------------------
let current = null; // the explanation on the card
let vote = { rating: null, stars: null };

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
  try {
    const body = { ticker, signal: $("signal").value, context, session_id: sessionId() };
    const data = await api("POST", "/api/explanations", body);
    showCard(data, ticker, body.signal);
  } catch (e) {
    showError(`Could not get an explanation — ${e.message}`);
  } finally {
    button.disabled = false;
    button.textContent = "Explain";
  }
});

function showCard(data, ticker, signal) {
  current = data;
  vote = { rating: null, stars: null };
  $("card").hidden = false;
  $("card-ticker").textContent = ticker;
  $("card-signal").textContent = signal;
  $("card-signal").className = `badge ${signal}`;
  $("card-text").textContent = data.text;
  $("card-version").textContent = data.prompt_version;
  $("card-model").textContent = data.model;
  $("card-latency").textContent = ms(data.latency_ms);
  $("card-cost").textContent = usd(data.cost_usd);
  $("card-experiment").textContent = data.experiment_id || "none";
  $("comment").value = "";
  $("thanks").textContent = "";
  $("update").hidden = true;
  renderThumbs();
  renderStars();
}

function renderThumbs() {
  $("thumb-up").setAttribute("aria-pressed", String(vote.rating === 1));
  $("thumb-down").setAttribute("aria-pressed", String(vote.rating === -1));
}

function renderStars() {
  const box = $("stars");
  box.replaceChildren();
  for (let i = 1; i <= 5; i++) {
    const b = el("button", {
      type: "button", role: "radio", "aria-checked": String(vote.stars !== null && i <= vote.stars),
      "aria-label": `${i} star${i > 1 ? "s" : ""}`, "data-stars": String(i),
    }, "★");
    b.addEventListener("click", () => {
      vote.stars = vote.stars === i ? null : i; // clicking the chosen star again clears it
      renderStars();
      if (vote.rating !== null) $("update").hidden = false;
    });
    box.append(b);
  }
}

async function sendVote() {
  if (!current || vote.rating === null) return;
  clearError();
  $("thanks").textContent = "Sending…";
  const body = { rating: vote.rating, session_id: sessionId() };
  if (vote.stars !== null) body.stars = vote.stars;
  const comment = $("comment").value.trim();
  if (comment) body.comment = comment;
  try {
    await api("POST", `/api/feedback/${encodeURIComponent(current.explanation_id)}`, body);
    $("thanks").textContent = "Thanks — recorded";
    $("update").hidden = true;
  } catch (e) {
    $("thanks").textContent = "";
    showError(`Your feedback was not recorded — ${e.message}`);
  }
}

for (const [id, rating] of [["thumb-up", 1], ["thumb-down", -1]]) {
  $(id).addEventListener("click", () => {
    vote.rating = rating;
    renderThumbs();
    sendVote();
  });
}
$("update").addEventListener("click", sendVote);
$("comment").addEventListener("input", () => { if (vote.rating !== null) $("update").hidden = false; });

$("forget").addEventListener("click", async () => {
  clearError();
  if (!window.confirm("Erase every vote and comment this browser session has given?")) return;
  try {
    const data = await api("DELETE", `/api/feedback/sessions/${encodeURIComponent(sessionId())}`);
    $("thanks").textContent = "";
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

// ---- stats panel ---------------------------------------------------------------------------------------
let streamAbort = null;
let pollTimer = null;

function token() { return localStorage.getItem("selflearn.admin_token") || ""; }
$("token").value = token();

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem("selflearn.admin_token", $("token").value.trim());
  startStats();
});
$("days").addEventListener("change", () => { if (token()) startStats(); });

function stopStats() {
  if (streamAbort) streamAbort.abort();
  streamAbort = null;
  if (pollTimer) clearInterval(pollTimer);
  pollTimer = null;
}

async function startStats() {
  stopStats();
  clearError();
  const days = $("days").value;
  const headers = { Authorization: `Bearer ${token()}` };
  // One plain read first: it reports a bad token clearly and shows the figures at once.
  try {
    renderStats(await api("GET", `/api/admin/llm-learning?days=${days}`, undefined, headers));
  } catch (e) {
    $("live").textContent = "";
    showError(e.status === 401 ? `Admin token refused — ${e.message}` : `Could not load the stats — ${e.message}`);
    return;
  }
  streamStats(days, headers);
}

// EventSource cannot send an Authorization header, so the stream is read with fetch and parsed here.
async function streamStats(days, headers) {
  const controller = new AbortController();
  streamAbort = controller;
  try {
    const res = await fetch(`/api/admin/llm-learning/stream?days=${days}`, { headers, signal: controller.signal });
    if (!res.ok || !res.body) throw new Error(`stream answered ${res.status}`);
    $("live").textContent = "● live";
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (event === "snapshot" && data.length) renderStats(JSON.parse(data.join("\n")));
      }
    }
    throw new Error("stream ended");
  } catch (e) {
    if (controller.signal.aborted) return;
    // No stream (a proxy that buffers, a dropped connection): poll instead.
    $("live").textContent = "○ polling every 5 s";
    pollTimer = setInterval(async () => {
      try { renderStats(await api("GET", `/api/admin/llm-learning?days=${days}`, undefined, headers)); }
      catch (err) { showError(`Could not refresh the stats — ${err.message}`); }
    }, 5000);
  }
}

function renderStats(s) {
  $("stats-body").hidden = false;
  const t = s.totals;
  $("stat-explanations").textContent = String(t.explanations);
  $("stat-votes").textContent = String(t.votes);
  $("stat-feedback-rate").textContent = pct(t.feedback_rate);
  $("stat-positive-rate").textContent = pct(t.positive_rate);
  $("stat-positive-ci").textContent = t.positive_rate_ci ? `95% CI ${pct(t.positive_rate_ci[0])}–${pct(t.positive_rate_ci[1])}` : "";
  $("stat-avg-rating").textContent = t.avg_rating === null ? "—" : `${num(t.avg_rating, 2)} ★`;
  $("stat-cost").textContent = usd(t.cost_per_explanation);
  $("stat-latency").textContent = ms(t.avg_latency_ms);

  loadSearch();
  const alerts = $("alerts");
  alerts.replaceChildren(...s.alerts.slice(0, 5).map((a) => el("div", { class: "alert", role: "note" }, `⚠ ${a.created_at.slice(0, 16).replace("T", " ")} — ${a.message}`)));

  $("curve").replaceChildren(learningCurve(s.daily));
  $("cost-quality").replaceChildren(costQuality(s.cost_vs_quality));
  const figCols = [
    ["Explanations", (r) => r.explanations], ["Votes", (r) => r.votes], ["Feedback", (r) => pct(r.feedback_rate)],
    ["Positive", (r) => pct(r.positive_rate)], ["Avg ★", (r) => num(r.avg_rating)], ["Cost/expl.", (r) => usd(r.cost_per_explanation)],
    ["Latency", (r) => ms(r.avg_latency_ms)],
  ];
  $("versions").replaceChildren(table([["Prompt version", (r) => `${r.prompt_name} ${r.prompt_version}`], ...figCols], s.per_prompt_version));
  $("signals").replaceChildren(table([["Signal", (r) => r.signal], ...figCols], s.per_signal));
  const tickerCols = [["Ticker", (r) => r.ticker], ["Votes", (r) => r.votes], ["Positive", (r) => pct(r.positive_rate)], ["Avg ★", (r) => num(r.avg_rating)]];
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

function learningCurve(daily) {
  const points = daily.filter((d) => d.positive_rate !== null);
  if (!points.length) return el("div", { class: "empty" }, "No votes yet: the curve starts with the first vote.");
  const W = 480, H = 180, L = 44, R = 10, T = 10, B = 24;
  const n = daily.length;
  const x = (i) => L + (n === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const y = (v) => T + (1 - v) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Daily positive rate" });
  for (const v of [0, 0.5, 1]) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e3e6eb" }));
    root.append(svg("text", { x: 4, y: y(v) + 4, "font-size": 10, fill: "#667085" }, pct(v)));
  }
  const idx = daily.map((d, i) => [d, i]).filter(([d]) => d.positive_rate !== null);
  const band = idx.map(([d, i]) => `${x(i)},${y(d.positive_rate_ci[1])}`).concat(idx.slice().reverse().map(([d, i]) => `${x(i)},${y(d.positive_rate_ci[0])}`));
  root.append(svg("polygon", { points: band.join(" "), fill: "#2f6fed22" }));
  root.append(svg("polyline", { points: idx.map(([d, i]) => `${x(i)},${y(d.positive_rate)}`).join(" "), fill: "none", stroke: "#2f6fed", "stroke-width": 2 }));
  for (const [d, i] of idx) {
    root.append(svg("circle", { cx: x(i), cy: y(d.positive_rate), r: 3, fill: "#2f6fed" }, svg("title", {}, `${d.day}: ${pct(d.positive_rate)} of ${d.votes} votes`)));
  }
  root.append(svg("text", { x: L, y: H - 6, "font-size": 10, fill: "#667085" }, daily[0].day));
  root.append(svg("text", { x: W - R, y: H - 6, "font-size": 10, fill: "#667085", "text-anchor": "end" }, daily[n - 1].day));
  return root;
}

function costQuality(rows) {
  const points = rows.filter((r) => r.positive_rate !== null && r.cost_per_explanation !== null);
  if (!points.length) return el("div", { class: "empty" }, "No votes yet: each model and prompt version appears once it has one.");
  const W = 480, H = 180, L = 44, R = 10, T = 10, B = 24;
  const top = Math.max(...points.map((p) => p.cost_per_explanation));
  const maxCost = top || 1;
  const x = (c) => L + (c / maxCost) * (W - L - R);
  const y = (v) => T + (1 - v) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Cost per explanation against positive rate" });
  for (const v of [0, 0.5, 1]) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e3e6eb" }));
    root.append(svg("text", { x: 4, y: y(v) + 4, "font-size": 10, fill: "#667085" }, pct(v)));
  }
  root.append(svg("text", { x: W - R, y: H - 6, "font-size": 10, fill: "#667085", "text-anchor": "end" }, `${top ? usd(maxCost) : "$0 (all free)"} / explanation`));
  for (const p of points) {
    const label = `${p.model} ${p.prompt_version}`;
    root.append(svg("circle", { cx: x(p.cost_per_explanation), cy: y(p.positive_rate), r: 5, fill: "#1f9d55" }, svg("title", {}, `${label}: ${usd(p.cost_per_explanation)}, ${pct(p.positive_rate)} positive (${p.votes} votes)`)));
    root.append(svg("text", { x: x(p.cost_per_explanation) + 7, y: y(p.positive_rate) + 4, "font-size": 10, fill: "#1d2330" }, label));
  }
  return root;
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
    ? `⚠ Search exhausted at champion ${s.champion_version}: ${s.exhausted_reason}. Generation has stopped.`
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
      ["P(beats control)", (a) => pct(a.prob_beats_control)], ["Avg ★", (a) => num(a.avg_rating)], ["Cost/expl.", (a) => usd(a.cost_per_explanation)],
    ];
    const status = e.status === "concluded" ? `concluded: ${e.decision || ""}${e.winner_arm_id ? ` (winner ${e.winner_arm_id})` : ""}` : e.status;
    const note = el("p", { class: "muted" }, "These figures count every vote as independent (per-vote Wilson interval). The optimizer decides on sessions: a session-clustered, always-valid interval for the lift, with futility, novelty and fallback-rate checks and per-signal segments; see ", el("code", {}, `GET /api/experiments/${e.experiment_id}`), ".");
    return el("div", { class: "experiment" }, el("p", {}, el("strong", {}, e.experiment_id), ` — ${e.prompt_name || ""} — ${status}`), table(cols, e.arms), note);
  });
}

for (const b of document.querySelectorAll("[data-export]")) {
  b.addEventListener("click", async () => {
    clearError();
    const format = b.getAttribute("data-export");
    try {
      const res = await fetch(`/api/admin/llm-learning/export?format=${format}&table=daily&days=${$("days").value}`, { headers: { Authorization: `Bearer ${token()}` } });
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

if (token()) startStats();
