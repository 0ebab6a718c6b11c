// Embeddable web components, no dependencies and no build step:
//
//   <script src="GATEWAY/static/components.js"></script>   (GATEWAY: e.g. http://127.0.0.1:8000)
//   <explanation-card ticker="AAPL" signal="BUY" context='{"rsi": 28.5}'></explanation-card>
//   <feedback-stats days="30"></feedback-stats>
//
// <explanation-card> asks the gateway for an explanation, shows it, and sends the reader's vote (thumbs up or
// down, optional 1-5 stars and a comment) with the same anonymous session id it asked with: a vote counts only
// from the session the explanation was served to. <feedback-stats> shows the learning figures (admin token).
// Both talk to the gateway this script was loaded from (or the one in their `api` attribute); a page of
// another origin must be listed in the gateway's ALLOWED_ORIGINS. Icons are inline SVG, never emoji, so they
// render on machines without an emoji font. Every text from the API goes in via textContent.
"use strict";

(() => {
  if (customElements.get("explanation-card")) return; // loaded twice: the first definition stands

  const SCRIPT_ORIGIN = document.currentScript && document.currentScript.src
    ? new URL(document.currentScript.src, location.href).origin
    : location.origin;
  const SESSION_KEY = "selflearn.session_id";
  const TOKEN_KEY = "selflearn.admin_token";

  // ---- helpers ------------------------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : v);
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

  // Icons drawn here (24x24, stroke in the text colour): a thumb, turned over for "down"; a five-point star.
  const THUMB = "M7 10.5 11.2 3.2c.8-1.3 3-.8 2.9 1L13.6 9H19.4c1.5 0 2.6 1.4 2.2 2.9l-1.9 7.4c-.3 1-1.1 1.7-2.2 1.7H7Z";
  function thumbIcon(down) {
    return svg("svg", { viewBox: "0 0 24 24", width: "22", height: "22", "aria-hidden": "true", focusable: "false", class: "icon" },
      svg("g", { transform: down ? "rotate(180 12 12)" : "" },
        svg("rect", { x: "2.5", y: "10", width: "4", height: "11", rx: "1" }),
        svg("path", { d: THUMB })));
  }
  const STAR = "12,2.5 14.8,8.7 21.5,9.3 16.4,13.8 18,20.5 12,17 6,20.5 7.6,13.8 2.5,9.3 9.2,8.7";
  const starIcon = () => svg("svg", { viewBox: "0 0 24 24", width: "22", height: "22", "aria-hidden": "true", focusable: "false" },
    svg("polygon", { points: STAR }));

  /** The gateway's base URL: the element's `api` attribute, else the origin this script came from. */
  function apiBase(host) {
    return (host.getAttribute("api") || SCRIPT_ORIGIN).replace(/\/+$/, "");
  }

  /** This browser's anonymous session id (per origin, kept in localStorage; made on first use). */
  function sessionId() {
    let id = null;
    try { id = localStorage.getItem(SESSION_KEY); } catch { /* storage blocked: a per-page id below */ }
    if (!id) {
      id = crypto.randomUUID ? crypto.randomUUID() : `s-${Date.now()}-${Math.random().toString(16).slice(2)}`;
      try { localStorage.setItem(SESSION_KEY, id); } catch { /* kept for this page only */ }
    }
    return id;
  }

  /** Calls the API; a non-2xx answer becomes an Error with the API's own message ({"error": {message}}). */
  async function call(base, method, path, body, headers = {}, signal = undefined) {
    const init = { method, headers: { ...headers }, signal };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(base + path, init);
    } catch (e) {
      if (e.name === "AbortError") throw e;
      // A refused CORS preflight looks the same as no network to a page: say both.
      throw new Error(`cannot reach ${base} (offline, or this page's origin is not in the gateway's ALLOWED_ORIGINS)`);
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

  const BASE_CSS = `
    :host { display: block; font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
      color: #1d2330; line-height: 1.45; --accent: #2f6fed; --good: #1f9d55; --bad: #d64545; --muted: #667085; --line: #e3e6eb; }
    :host([hidden]) { display: none; }
    .box { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 1rem 1.25rem; }
    button { font: inherit; cursor: pointer; border-radius: 6px; border: 1px solid var(--line); padding: .45rem .9rem; background: #fff; color: inherit; }
    button:focus-visible, input:focus-visible, select:focus-visible, textarea:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
    button:disabled { opacity: .55; cursor: progress; }
    .primary { background: var(--accent); border-color: var(--accent); color: #fff; }
    .secondary { background: #eef3ff; border-color: #c9d8fb; }
    .error { background: #fdecec; border: 1px solid #f5c2c2; color: #8a1c1c; padding: .5rem .8rem; border-radius: 8px; margin: .5rem 0; }
    .muted { color: var(--muted); font-size: .85rem; }
    label { display: flex; flex-direction: column; font-size: .8rem; color: var(--muted); gap: .2rem; }
    input, select, textarea { font: inherit; color: #1d2330; padding: .4rem .5rem; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
  `;

  // ---- <explanation-card> -------------------------------------------------------------------------------
  const CARD_CSS = BASE_CSS + `
    h2 { margin: 0 0 .5rem; font-size: 1.1rem; }
    .badge { display: inline-block; font-size: .75rem; padding: .1rem .5rem; border-radius: 99px; background: #eef3ff; color: var(--accent); vertical-align: middle; }
    .badge.SELL { background: #fdecec; color: var(--bad); }
    .badge.BUY { background: #e8f6ee; color: var(--good); }
    .explanation { font-size: 1.05rem; margin: .25rem 0 .75rem; white-space: pre-wrap; }
    .meta { display: flex; flex-wrap: wrap; gap: 1.25rem; margin: 0 0 1rem; font-size: .85rem; }
    .meta div { display: flex; gap: .35rem; }
    .meta dt { color: var(--muted); }
    .meta dd { margin: 0; font-variant-numeric: tabular-nums; }
    .feedback { border-top: 1px solid var(--line); padding-top: .75rem; display: grid; gap: .6rem; }
    .question { margin: 0; font-weight: 600; }
    .thumbs { display: flex; gap: .5rem; }
    .thumb { display: inline-flex; align-items: center; gap: .4rem; padding: .35rem .9rem; }
    .thumb .icon { fill: none; stroke: currentColor; stroke-width: 1.7; stroke-linejoin: round; }
    .thumb.up { color: var(--good); }
    .thumb.down { color: var(--bad); }
    .thumb[aria-pressed=true] { border-color: currentColor; }
    .thumb[aria-pressed=true] .icon { fill: currentColor; fill-opacity: .2; }
    .thumb-label { color: #1d2330; font-size: .9rem; }
    fieldset { border: none; padding: 0; margin: 0; }
    legend { font-size: .8rem; color: var(--muted); padding: 0; }
    .stars button { border: none; background: none; padding: 0 .1rem; color: #c5cad3; line-height: 0; }
    .stars svg { fill: currentColor; }
    .stars button[aria-checked=true] { color: #f5b301; }
    textarea { width: 100%; max-width: 36rem; }
    .thanks { margin: 0; color: var(--good); font-weight: 600; min-height: 1.2em; }
  `;

  class ExplanationCard extends HTMLElement {
    static get observedAttributes() { return ["ticker", "signal", "context"]; }

    constructor() {
      super();
      this.attachShadow({ mode: "open" });
      this._explanation = null;
      this._session = null; // the session id the shown explanation was asked with: its vote must carry it
      this._vote = { rating: null, stars: null };
      this._asked = "";
    }

    connectedCallback() {
      if (!this.shadowRoot.firstChild) this._renderShell();
      this._autoExplain();
    }

    attributeChangedCallback() {
      if (this.isConnected && this.shadowRoot.firstChild) this._autoExplain();
    }

    /** The explanation shown (the API's answer), or null. */
    get explanation() { return this._explanation; }
    /** The session id its vote will carry. */
    get sessionId() { return this._session; }

    /** With `ticker` and `signal` attributes, ask once per distinct request. */
    _autoExplain() {
      const ticker = this.getAttribute("ticker");
      const signal = this.getAttribute("signal");
      if (!ticker || !signal) return;
      const key = `${ticker}|${signal}|${this.getAttribute("context") || ""}`;
      if (key === this._asked) return;
      this._asked = key;
      let context = {};
      try {
        context = JSON.parse(this.getAttribute("context") || "{}");
      } catch {
        this._showError("the context attribute is not valid JSON");
        return;
      }
      this.explain({ ticker, signal, context }).catch(() => { /* shown on the card */ });
    }

    /** Ask for an explanation of {ticker, signal, context}; shows it and resolves with the API's answer. */
    async explain({ ticker, signal, context = {} }) {
      const r = this._refs;
      this._clearError();
      this._session = this.getAttribute("session-id") || sessionId();
      r.body.hidden = true;
      r.status.hidden = false;
      r.status.textContent = `Explaining ${ticker} ${signal}…`;
      try {
        const body = { ticker: String(ticker).trim().toUpperCase(), signal, context, session_id: this._session };
        const data = await call(apiBase(this), "POST", "/api/explanations", body);
        this._show(data);
        this.dispatchEvent(new CustomEvent("explanation", { detail: data, bubbles: true, composed: true }));
        return data;
      } catch (e) {
        r.status.hidden = true;
        this._showError(`Could not get an explanation — ${e.message}`);
        throw e;
      }
    }

    _renderShell() {
      const root = this.shadowRoot;
      root.append(el("style", {}, CARD_CSS));
      const r = {};
      r.error = el("div", { class: "error", role: "alert", part: "error", hidden: true });
      r.status = el("p", { class: "muted", role: "status", hidden: true });
      r.ticker = el("span", { id: "card-ticker" });
      r.signal = el("span", { id: "card-signal", class: "badge" });
      r.text = el("p", { id: "card-text", class: "explanation" });
      const meta = (label, id) => { r[id] = el("dd", { id: `card-${id}` }); return el("div", {}, el("dt", {}, label), r[id]); };
      r.up = el("button", { type: "button", id: "thumb-up", class: "thumb up", "aria-label": "Thumbs up: helpful", "aria-pressed": "false" },
        thumbIcon(false), el("span", { class: "thumb-label" }, "Helpful"));
      r.down = el("button", { type: "button", id: "thumb-down", class: "thumb down", "aria-label": "Thumbs down: not helpful", "aria-pressed": "false" },
        thumbIcon(true), el("span", { class: "thumb-label" }, "Not helpful"));
      r.stars = el("div", { id: "stars", class: "stars", role: "radiogroup", "aria-label": "Rating from 1 to 5 stars" });
      r.starsBox = el("fieldset", {}, el("legend", {}, "Stars (optional)"), r.stars);
      r.comment = el("textarea", { id: "comment", maxlength: "2000", rows: "2", placeholder: "What was good or missing?" });
      r.commentBox = el("label", {}, "Comment (optional)", r.comment);
      r.update = el("button", { type: "button", id: "update", class: "secondary", hidden: true, "aria-label": "Send my updated stars and comment" }, "Update my feedback");
      r.thanks = el("p", { id: "thanks", class: "thanks", role: "status", "aria-live": "polite" });
      r.body = el("div", { hidden: true },
        el("h2", {}, r.ticker, " ", r.signal),
        r.text,
        el("dl", { class: "meta" }, meta("Prompt", "version"), meta("Model", "model"), meta("Latency", "latency"), meta("Cost", "cost"), meta("Experiment", "experiment")),
        el("div", { class: "feedback" },
          el("p", { class: "question" }, "Was this explanation helpful?"),
          el("div", { class: "thumbs" }, r.up, r.down),
          r.starsBox, r.commentBox, r.update, r.thanks));
      root.append(el("div", { class: "box", part: "card" }, r.error, r.status, r.body));
      this._refs = r;
      r.up.addEventListener("click", () => this._thumb(1));
      r.down.addEventListener("click", () => this._thumb(-1));
      r.update.addEventListener("click", () => this._send());
      r.comment.addEventListener("input", () => { if (this._vote.rating !== null) r.update.hidden = false; });
    }

    _show(data) {
      const r = this._refs;
      this._explanation = data;
      this._vote = { rating: null, stars: null };
      r.status.hidden = true;
      r.body.hidden = false;
      r.ticker.textContent = data.ticker;
      r.signal.textContent = data.signal;
      r.signal.className = `badge ${data.signal}`;
      r.text.textContent = data.text;
      r.version.textContent = data.prompt_version;
      r.model.textContent = data.model;
      r.latency.textContent = ms(data.latency_ms);
      r.cost.textContent = usd(data.cost_usd);
      r.experiment.textContent = data.experiment_id || "none";
      r.comment.value = "";
      r.thanks.textContent = "";
      r.update.hidden = true;
      const noStars = this.getAttribute("stars") === "off";
      const noComment = this.getAttribute("comment") === "off";
      r.starsBox.hidden = noStars;
      r.commentBox.hidden = noComment;
      this._renderVote();
    }

    _renderVote() {
      const r = this._refs;
      r.up.setAttribute("aria-pressed", String(this._vote.rating === 1));
      r.down.setAttribute("aria-pressed", String(this._vote.rating === -1));
      r.stars.replaceChildren();
      for (let i = 1; i <= 5; i++) {
        const b = el("button", { type: "button", role: "radio", "aria-checked": String(this._vote.stars !== null && i <= this._vote.stars),
          "aria-label": `${i} star${i > 1 ? "s" : ""}`, "data-stars": String(i) }, starIcon());
        b.addEventListener("click", () => {
          this._vote.stars = this._vote.stars === i ? null : i; // the chosen star again clears it
          this._renderVote();
          if (this._vote.rating !== null) r.update.hidden = false;
        });
        r.stars.append(b);
      }
    }

    _thumb(rating) {
      this._vote.rating = rating;
      this._renderVote();
      this._send();
    }

    async _send() {
      const r = this._refs;
      const data = this._explanation;
      if (!data || this._vote.rating === null) return;
      this._clearError();
      r.thanks.textContent = "Sending…";
      const body = { rating: this._vote.rating, session_id: this._session };
      if (this._vote.stars !== null) body.stars = this._vote.stars;
      const comment = r.comment.value.trim();
      if (comment) body.comment = comment;
      try {
        const res = await call(apiBase(this), "POST", `/api/feedback/${encodeURIComponent(data.explanation_id)}`, body);
        r.thanks.textContent = "Thanks — recorded";
        r.update.hidden = true;
        this.dispatchEvent(new CustomEvent("vote", { detail: { explanation_id: data.explanation_id, ...body, session_id: undefined, feedback_id: res.feedback_id }, bubbles: true, composed: true }));
      } catch (e) {
        r.thanks.textContent = "";
        this._showError(`Your feedback was not recorded — ${e.message}`);
      }
    }

    _showError(message) {
      const box = this._refs.error;
      box.textContent = message;
      box.hidden = false;
      this.dispatchEvent(new CustomEvent("card-error", { detail: { message }, bubbles: true, composed: true }));
    }

    _clearError() {
      this._refs.error.hidden = true;
      this._refs.error.textContent = "";
    }
  }

  // ---- charts -------------------------------------------------------------------------------------------
  const W = 480, H = 190, L = 40, R = 12, T = 10, B = 30;
  const FONT = 10;
  const textWidth = (s) => s.length * FONT * 0.6; // a generous estimate for the label layout
  const yOf = (v) => T + (1 - v) * (H - T - B);

  function frame(label) {
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label });
    for (const v of [0, 0.5, 1]) {
      root.append(svg("line", { x1: L, x2: W - R, y1: yOf(v), y2: yOf(v), stroke: "#e3e6eb" }));
      root.append(svg("text", { x: L - 6, y: yOf(v) + 4, "font-size": FONT, fill: "#667085", "text-anchor": "end", class: "label" }, pct(v)));
    }
    return root;
  }

  /** Time labels for the x axis: as many as fit without touching, at evenly spaced points. */
  function timeTicks(t0, t1, widthS) {
    const day = 86400000;
    const fmt = (t) => {
      const iso = new Date(t).toISOString();
      if (widthS < 86400 && t1 - t0 <= day) return iso.slice(11, 16);
      if (widthS < 86400) return `${iso.slice(5, 10)} ${iso.slice(11, 16)}`;
      return iso.slice(0, 10);
    };
    const sample = `${fmt(t1)} UTC`;
    const slots = Math.max(2, Math.min(6, Math.floor((W - L - R) / (textWidth(sample) + 24)) + 1));
    const out = [];
    for (let i = 0; i < slots; i++) out.push(t0 + ((t1 - t0) * i) / (slots - 1));
    return out.map((t, i) => [t, i === slots - 1 ? `${fmt(t)} UTC` : fmt(t)]);
  }

  /** The learning curve: positive rate per window (minutes to days, as the data's age needs) with its 95% band. */
  function learningCurve(curve) {
    const points = (curve && curve.points ? curve.points : []).filter((p) => p.positive_rate !== null);
    if (!points.length) return el("div", { class: "empty" }, "No votes yet: the curve starts with the first vote.");
    const widthMs = curve.bucket_s * 1000;
    const mid = (p) => Date.parse(p.start) + widthMs / 2;
    const t0 = Date.parse(points[0].start);
    const t1 = Math.max(Date.parse(points[points.length - 1].end), Math.min(Date.parse(curve.until), t0 + 48 * widthMs));
    const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
    const root = frame("Positive rate over time, with its 95% interval");
    const band = points.map((p) => `${x(mid(p))},${yOf(p.positive_rate_ci[1])}`)
      .concat(points.slice().reverse().map((p) => `${x(mid(p))},${yOf(p.positive_rate_ci[0])}`));
    if (points.length > 1) root.append(svg("polygon", { points: band.join(" "), fill: "#2f6fed22" }));
    for (const p of points) { // each window's own interval, so a single point still shows its uncertainty
      root.append(svg("line", { x1: x(mid(p)), x2: x(mid(p)), y1: yOf(p.positive_rate_ci[0]), y2: yOf(p.positive_rate_ci[1]), stroke: "#2f6fed66", "stroke-width": 3 }));
    }
    root.append(svg("polyline", { points: points.map((p) => `${x(mid(p))},${yOf(p.positive_rate)}`).join(" "), fill: "none", stroke: "#2f6fed", "stroke-width": 2 }));
    for (const p of points) {
      const when = p.start.slice(0, 16).replace("T", " ");
      root.append(svg("circle", { cx: x(mid(p)), cy: yOf(p.positive_rate), r: 3, fill: "#2f6fed" },
        svg("title", {}, `${when} UTC (+${curve.bucket_s / 60} min): ${pct(p.positive_rate)} of ${p.votes} vote${p.votes === 1 ? "" : "s"}, 95% ${pct(p.positive_rate_ci[0])}–${pct(p.positive_rate_ci[1])}`)));
    }
    const ticks = timeTicks(t0, t1, curve.bucket_s);
    ticks.forEach(([t, label], i) => {
      const anchor = i === 0 ? "start" : i === ticks.length - 1 ? "end" : "middle";
      root.append(svg("text", { x: x(t), y: H - 8, "font-size": FONT, fill: "#667085", "text-anchor": anchor, class: "label" }, label));
    });
    return root;
  }

  /** Cost per explanation against positive rate, one point per model and prompt version; labels that would
   * collide are moved down, and one that cannot be placed is left to the point's tooltip. */
  function costQuality(rows) {
    const points = rows.filter((r) => r.positive_rate !== null && r.cost_per_explanation !== null);
    if (!points.length) return el("div", { class: "empty" }, "No votes yet: each model and prompt version appears once it has one.");
    const top = Math.max(...points.map((p) => p.cost_per_explanation));
    const maxCost = top || 1;
    const x = (c) => L + 6 + (c / maxCost) * (W - L - R - 12);
    const root = frame("Cost per explanation against positive rate");
    const axis = `${top ? usd(maxCost) : "$0 (all free)"} / explanation`;
    const placed = [{ x0: W - R - textWidth(axis), x1: W - R, y0: H - 8 - FONT, y1: H - 8 }];
    root.append(svg("text", { x: W - R, y: H - 8, "font-size": FONT, fill: "#667085", "text-anchor": "end", class: "label" }, axis));
    const overlaps = (b) => placed.some((p) => b.x0 < p.x1 && p.x0 < b.x1 && b.y0 < p.y1 && p.y0 < b.y1);
    const sorted = points.slice().sort((a, b) => b.positive_rate - a.positive_rate || a.cost_per_explanation - b.cost_per_explanation);
    for (const p of sorted) {
      const label = `${p.model} ${p.prompt_version}`;
      const cx = x(p.cost_per_explanation), cy = yOf(p.positive_rate);
      placed.push({ x0: cx - 5, x1: cx + 5, y0: cy - 5, y1: cy + 5 });
      root.append(svg("circle", { cx, cy, r: 5, fill: "#1f9d55" }, svg("title", {}, `${label}: ${usd(p.cost_per_explanation)}, ${pct(p.positive_rate)} positive (${p.votes} votes)`)));
    }
    for (const p of sorted) {
      const label = `${p.model} ${p.prompt_version}`;
      const cx = x(p.cost_per_explanation), cy = yOf(p.positive_rate);
      const w = textWidth(label);
      const right = cx + 8 + w <= W - R;
      const x0 = right ? cx + 8 : cx - 8 - w;
      let spot = null;
      for (const dy of [4, 16, -8, 28, -20, 40, -32]) {
        const base = cy + dy;
        const box = { x0, x1: x0 + w, y0: base - FONT, y1: base + 2 };
        if (box.y0 >= 0 && box.y1 <= H - B + FONT && !overlaps(box)) { spot = box; break; }
      }
      if (!spot) continue; // no room: the point's tooltip names it
      placed.push(spot);
      if (Math.abs(spot.y1 - 2 - (cy + 4)) > 1) { // moved off its point: a thin line says whose label it is
        root.append(svg("line", { x1: cx, y1: cy, x2: right ? spot.x0 - 1 : spot.x1 + 1, y2: spot.y1 - 5, stroke: "#98a2b3", "stroke-width": 0.6 }));
      }
      root.append(svg("text", { x: right ? spot.x0 : spot.x1, y: spot.y1 - 2, "font-size": FONT, fill: "#1d2330", "text-anchor": right ? "start" : "end", class: "label" }, label));
    }
    return root;
  }

  // ---- <feedback-stats> ---------------------------------------------------------------------------------
  const STATS_CSS = BASE_CSS + `
    form { display: flex; flex-wrap: wrap; gap: .75rem; align-items: flex-end; }
    .live { font-size: .8rem; color: var(--muted); }
    .tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr)); gap: .6rem; margin: 1rem 0; }
    .tile { border: 1px solid var(--line); border-radius: 8px; padding: .6rem .75rem; display: flex; flex-direction: column; }
    .tile .label { font-size: .75rem; color: var(--muted); }
    .tile .value { font-size: 1.4rem; font-weight: 600; font-variant-numeric: tabular-nums; }
    .tile .ci { font-size: .7rem; color: var(--muted); }
    .alert { background: #fff7e6; border: 1px solid #f3d59b; color: #7a4b00; padding: .5rem .75rem; border-radius: 6px; margin: .3rem 0; font-size: .9rem; }
    .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 1rem; }
    figure { margin: 0; }
    figcaption { font-size: .8rem; color: var(--muted); margin-bottom: .3rem; }
    .chart svg { width: 100%; height: auto; background: #fafbfc; border: 1px solid var(--line); border-radius: 6px; }
    .chart .empty { color: var(--muted); font-size: .85rem; padding: 1rem; border: 1px dashed var(--line); border-radius: 6px; }
  `;
  const WIDTH_NAMES = { 300: "5 minutes", 900: "15 minutes", 1800: "30 minutes", 3600: "hour", 10800: "3 hours", 21600: "6 hours", 43200: "12 hours", 86400: "day", 172800: "2 days", 604800: "week", 1209600: "2 weeks", 2592000: "30 days" };

  class FeedbackStats extends HTMLElement {
    constructor() {
      super();
      this.attachShadow({ mode: "open" });
      this._token = null;
      this._abort = null;
      this._poll = null;
      this.snapshot = null;
    }

    /** The admin token (a property, never an attribute, so it is not in the page's HTML). */
    get token() {
      if (this._token) return this._token;
      try { return localStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
    }
    set token(value) {
      this._token = value ? String(value) : null;
      if (this._refs) this._refs.token.value = this._token || "";
      if (this.isConnected && this._token) this.start();
    }

    connectedCallback() {
      if (Object.prototype.hasOwnProperty.call(this, "token")) { // set before this element was upgraded
        const value = this.token;
        delete this.token;
        this._token = value ? String(value) : null;
      }
      if (!this.shadowRoot.firstChild) this._renderShell();
      if (this.token) this.start();
    }

    disconnectedCallback() { this.stop(); }

    _renderShell() {
      const r = {};
      r.token = el("input", { id: "token", type: "password", autocomplete: "off", placeholder: "Bearer token" });
      r.token.value = this.token;
      r.days = el("select", { id: "days" }, ...[[1, "1 day"], [7, "7 days"], [30, "30 days"], [90, "90 days"], [365, "1 year"]].map(([v, t]) => el("option", { value: String(v) }, t)));
      r.days.value = this.getAttribute("days") || "30";
      r.live = el("span", { id: "live", class: "live", "aria-live": "polite" });
      const form = el("form", { part: "form" },
        el("label", {}, "Admin token", r.token), el("label", {}, "Window", r.days),
        el("button", { type: "submit", class: "primary", "aria-label": "Show the learning statistics" }, "Show stats"), r.live);
      r.error = el("div", { class: "error", role: "alert", part: "error", hidden: true });
      const tile = (label, id, ci) => {
        r[id] = el("span", { class: "value", id: `stat-${id}` }, "—");
        if (ci) r[ci] = el("span", { class: "ci", id: `stat-${ci}` });
        return el("div", { class: "tile" }, el("span", { class: "label" }, label), r[id], ...(ci ? [r[ci]] : []));
      };
      r.caption = el("figcaption", {}, "Learning curve: positive rate over time");
      r.curve = el("div", { id: "curve", class: "chart" });
      r.costQuality = el("div", { id: "cost-quality", class: "chart" });
      r.alerts = el("div", { class: "alerts" });
      r.body = el("div", { hidden: true },
        el("div", { class: "tiles" }, tile("Explanations", "explanations"), tile("Votes", "votes"), tile("Feedback rate", "feedback-rate"),
          tile("Positive rate", "positive-rate", "positive-ci"), tile("Avg rating", "avg-rating"), tile("Cost / explanation", "cost"), tile("Avg latency", "latency")),
        r.alerts,
        el("div", { class: "grid" },
          el("figure", {}, r.caption, r.curve),
          el("figure", {}, el("figcaption", {}, "Cost versus quality (per model and prompt version)"), r.costQuality)));
      this.shadowRoot.append(el("style", {}, STATS_CSS), el("div", { part: "stats" }, form, r.error, r.body));
      this._refs = r;
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        this._token = r.token.value.trim();
        if (this.hasAttribute("remember-token")) {
          try { localStorage.setItem(TOKEN_KEY, this._token); } catch { /* not kept */ }
        }
        this.start();
      });
      r.days.addEventListener("change", () => { if (this.token) this.start(); });
    }

    get days() { return this._refs ? this._refs.days.value : this.getAttribute("days") || "30"; }

    stop() {
      if (this._abort) this._abort.abort();
      this._abort = null;
      if (this._poll) clearInterval(this._poll);
      this._poll = null;
    }

    /** One plain read (a bad token is reported at once), then the live stream, or polling without one. */
    async start() {
      this.stop();
      this._clearError();
      const days = this.days;
      const headers = { Authorization: `Bearer ${this.token}` };
      const path = `/api/admin/llm-learning?days=${days}`;
      const controller = new AbortController();
      this._abort = controller;
      try {
        this._render(await call(apiBase(this), "GET", path, undefined, headers, controller.signal));
      } catch (e) {
        if (controller.signal.aborted) return;
        this._refs.live.textContent = "";
        this._showError(e.status === 401 ? `Admin token refused — ${e.message}` : `Could not load the stats — ${e.message}`);
        return;
      }
      try {
        await this._stream(days, headers, controller);
      } catch {
        if (controller.signal.aborted) return;
        // No stream (a proxy that buffers, a dropped connection): poll instead.
        this._refs.live.textContent = "○ polling every 5 s";
        this._poll = setInterval(async () => {
          try { this._render(await call(apiBase(this), "GET", path, undefined, headers)); }
          catch (err) { this._showError(`Could not refresh the stats — ${err.message}`); }
        }, 5000);
      }
    }

    // EventSource cannot send an Authorization header, so the stream is read with fetch and parsed here.
    async _stream(days, headers, controller) {
      const res = await fetch(`${apiBase(this)}/api/admin/llm-learning/stream?days=${days}`, { headers, signal: controller.signal });
      if (!res.ok || !res.body) throw new Error(`stream: ${res.status}`);
      this._refs.live.textContent = "● live";
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
          if (event === "snapshot" && data.length) this._render(JSON.parse(data.join("\n")));
        }
      }
      throw new Error("stream ended");
    }

    _render(s) {
      const r = this._refs;
      this.snapshot = s;
      r.body.hidden = false;
      const t = s.totals;
      r.explanations.textContent = String(t.explanations);
      r.votes.textContent = String(t.votes);
      r["feedback-rate"].textContent = pct(t.feedback_rate);
      r["positive-rate"].textContent = pct(t.positive_rate);
      r["positive-ci"].textContent = t.positive_rate_ci ? `95% CI ${pct(t.positive_rate_ci[0])}–${pct(t.positive_rate_ci[1])}` : "";
      r["avg-rating"].textContent = t.avg_rating === null ? "—" : `${num(t.avg_rating, 2)} / 5`;
      r.cost.textContent = usd(t.cost_per_explanation);
      r.latency.textContent = ms(t.avg_latency_ms);
      r.alerts.replaceChildren(...(s.alerts || []).slice(0, 5).map((a) => el("div", { class: "alert", role: "note" }, `${a.created_at.slice(0, 16).replace("T", " ")} — ${a.message}`)));
      const curve = s.learning_curve;
      const per = curve && curve.bucket_s ? WIDTH_NAMES[curve.bucket_s] || `${curve.bucket_s} s` : null;
      r.caption.textContent = per ? `Learning curve: positive rate per ${per}, with its 95% interval` : "Learning curve: positive rate over time";
      r.curve.replaceChildren(learningCurve(curve));
      r.costQuality.replaceChildren(costQuality(s.cost_vs_quality || []));
      this.dispatchEvent(new CustomEvent("stats", { detail: s, bubbles: true, composed: true }));
    }

    _showError(message) {
      this._refs.error.textContent = message;
      this._refs.error.hidden = false;
      this.dispatchEvent(new CustomEvent("stats-error", { detail: { message }, bubbles: true, composed: true }));
    }

    _clearError() {
      this._refs.error.hidden = true;
      this._refs.error.textContent = "";
    }
  }

  customElements.define("explanation-card", ExplanationCard);
  customElements.define("feedback-stats", FeedbackStats);
  // What the dashboard page (app.js) shares with the components: the session, the API call and the formats.
  window.SelfLearn = Object.freeze({
    sessionId,
    apiBase: () => SCRIPT_ORIGIN,
    api: (method, path, body, headers = {}) => call(SCRIPT_ORIGIN, method, path, body, headers),
    format: Object.freeze({ pct, num, ms, usd }),
  });
})();
