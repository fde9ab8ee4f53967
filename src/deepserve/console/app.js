// deepserve console: plain JavaScript against the server's own API (no build step).
// The key is kept in this tab's sessionStorage and sent as a bearer token.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("deepserve-key") || "", role: null, currency: "", live: null, history: [] };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(!!options.body), ...(options.headers || {}) } });
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: { message: text } }; }
  if (!res.ok) {
    const err = new Error((body && body.error && body.error.message) || res.status + " " + res.statusText);
    err.status = res.status;
    throw err;
  }
  return body;
}

function showError(err) {
  const p = $("error");
  p.textContent = err ? String(err.message || err) : "";
  p.hidden = !err;
}

const money = (x) => (x == null ? "–" : Number(x).toFixed(6) + (state.currency ? " " + state.currency : ""));
const num = (x) => (x == null ? "–" : Number(x).toLocaleString("en-US"));
const when = (ts) => (ts == null ? "never" : new Date(ts * 1000).toISOString().slice(0, 16).replace("T", " "));

// --- who is this key -------------------------------------------------------------
async function identify() {
  showError(null);
  state.role = null;
  let label = "";
  try {
    const me = await api("/admin/whoami");
    state.role = "admin"; state.currency = me.currency || "";
    label = "admin (" + me.front + (me.keys ? ", keys in the ledger" : "") + ")";
  } catch (e) {
    if (!state.key) {
      // no key: is this a local server with keys off? (usage too when it keeps a ledger)
      try {
        await api("/v1/models"); state.role = "local"; label = "local mode: keys are off";
        try { const u = await api("/v1/usage?days=1"); state.role = "local-ledger"; state.currency = u.currency || ""; } catch (e4) { /* no ledger */ }
      } catch (e2) { label = "enter a key"; }
    } else {
      try {
        const u = await api("/v1/usage?days=30");
        state.role = "tenant"; state.currency = u.currency || "";
        label = u.key_id ? "key " + u.key_id + (u.team ? " (team " + u.team + ")" : "") : "local mode: keys are off";
        if (!u.key_id) state.role = "local-ledger";
      } catch (e3) {
        if (e3.status === 404) { state.role = "tenant"; label = "key accepted (no usage ledger)"; }
        else { label = e3.status === 401 ? "key refused: " + e3.message : "error: " + e3.message; }
      }
    }
  }
  $("who").textContent = label;
  document.querySelectorAll("nav button[data-role]").forEach((b) => {
    const role = b.dataset.role;
    b.hidden = !(state.role === "admin" || (role === "tenant" && (state.role === "tenant" || state.role === "local-ledger")));
  });
  await loadModels();
  const active = document.querySelector("nav button.active");
  if (active && active.hidden) openTab("playground");
}

async function loadModels() {
  const select = $("pg-model");
  select.replaceChildren();
  try {
    const list = await api("/v1/models");
    for (const m of list.data) select.append(el("option", { value: m.id }, m.tier ? m.id + " (tier " + m.tier + ")" : m.id));
  } catch (e) { /* shown by identify */ }
}

// --- tabs ------------------------------------------------------------------------
function openTab(name) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("active", s.id === name));
  clearInterval(state.live); state.live = null;
  showError(null);
  const load = { usage: loadUsage, keys: loadKeys, spend: loadSpend, report: loadReport, live: startLive }[name];
  if (load) load().catch(showError);
}

// --- playground --------------------------------------------------------------------
function addMessage(role, text) {
  const body = el("div", { class: "text" }, text);
  const stats = el("div", { class: "stats" });
  const node = el("div", { class: "msg " + role }, el("b", {}, role), body, stats);
  $("pg-log").append(node);
  $("pg-log").scrollTop = $("pg-log").scrollHeight;
  return { body, stats, node };
}

function describe(t0, tFirst, tEnd, usage, streamed) {
  const parts = [];
  if (tFirst) parts.push("TTFT " + Math.round(tFirst - t0) + " ms");
  if (usage) {
    const out = usage.completion_tokens || 0;
    // streamed: the tokens after the first over the time after it; else over the whole call
    const n = streamed && tFirst ? out - 1 : out;
    const span = (tEnd - (streamed && tFirst ? tFirst : t0)) / 1000;
    if (n > 0 && span > 0) parts.push((n / span).toFixed(1) + " tokens/s");
    const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
    parts.push(usage.prompt_tokens + " prompt tokens (" + cached + " cached)");
    parts.push(out + " output tokens");
    if (usage.cost != null) parts.push("cost " + Number(usage.cost).toFixed(8) + " " + (usage.currency || ""));
  }
  parts.push("total " + Math.round(tEnd - t0) + " ms");
  return parts.filter(Boolean).join(" · ");
}

async function send(ev) {
  ev.preventDefault();
  showError(null);
  const text = $("pg-input").value.trim();
  if (!text) return;
  const messages = [];
  const system = $("pg-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  addMessage("user", text);
  $("pg-input").value = "";
  const stream = $("pg-stream").checked;
  const req = { model: $("pg-model").value, messages, temperature: Number($("pg-temperature").value),
    max_tokens: Number($("pg-max-tokens").value), stream };
  if (stream) req.stream_options = { include_usage: true };
  const out = addMessage("assistant", "");
  $("pg-send").disabled = true;
  const t0 = performance.now();
  let tFirst = null, usage = null, answer = "";
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(req) });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || res.status + " " + res.statusText);
    }
    if (!stream) {
      const body = await res.json();
      tFirst = null; answer = body.choices[0].message.content || ""; usage = body.usage;
      out.body.textContent = answer;
    } else {
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            for (const c of chunk.choices || []) {
              const piece = (c.delta && (c.delta.content || c.delta.reasoning_content)) || "";
              if (piece) { if (tFirst === null) tFirst = performance.now(); answer += piece; out.body.textContent = answer; }
            }
          }
        }
      }
    }
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    out.stats.textContent = describe(t0, tFirst, performance.now(), usage, stream);
  } catch (e) {
    out.stats.textContent = "failed";
    showError(e);
  } finally {
    $("pg-send").disabled = false;
  }
}

// --- charts (SVG, no library) ----------------------------------------------------------
const COLORS = ["#2f6fed", "#e07a1f", "#1f9d55", "#b42318", "#7a5af8", "#0e9384", "#c11574", "#667085"];

function barChart(container, days, series, dated = true) {
  // series: [{name, values: {date: number}}]; stacked bars per day
  const W = 1160, H = 220, pad = 34;
  const totals = days.map((d) => series.reduce((s, x) => s + (x.values[d] || 0), 0));
  const top = Math.max(...totals, 1e-12);
  const bw = (W - pad * 2) / Math.max(days.length, 1);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const add = (tag, attrs, text) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text) n.textContent = text; svg.append(n); return n; };
  add("line", { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, stroke: "#d9dee7" });
  add("text", { x: 4, y: 14, "font-size": 11, fill: "#667085" }, top.toPrecision(3));
  days.forEach((d, i) => {
    let y = H - pad;
    series.forEach((s, j) => {
      const v = s.values[d] || 0;
      const h = (v / top) * (H - pad * 2);
      if (h > 0) add("rect", { x: pad + i * bw + 2, y: y - h, width: Math.max(bw - 4, 1), height: h, fill: COLORS[j % COLORS.length] }).append(Object.assign(document.createElementNS(ns, "title"), { textContent: `${s.name} ${d}: ${v}` }));
      y -= h;
    });
    if (dated && (days.length <= 16 || i % Math.ceil(days.length / 16) === 0)) add("text", { x: pad + i * bw + bw / 2, y: H - pad + 14, "font-size": 10, "text-anchor": "middle", fill: "#667085" }, d.slice(5));
  });
  series.slice(0, 8).forEach((s, j) => {
    add("rect", { x: pad + j * 190, y: H - 12, width: 10, height: 10, fill: COLORS[j % COLORS.length] });
    add("text", { x: pad + j * 190 + 14, y: H - 3, "font-size": 11, fill: "#1d2430" }, String(s.name).slice(0, 28));
  });
  container.replaceChildren(svg);
}

function lastDays(n) {
  const out = [], today = Math.floor(Date.now() / 86400000);
  for (let i = n - 1; i >= 0; i--) out.push(new Date((today - i) * 86400000).toISOString().slice(0, 10));
  return out;
}

function card(label, value) {
  return el("div", { class: "card" }, el("div", { class: "v" }, value), el("div", { class: "k" }, label));
}

// --- tenant usage ---------------------------------------------------------------------
async function loadUsage() {
  const u = await api("/v1/usage?days=30");
  state.currency = u.currency || state.currency;
  const cards = [card("cost, last 30 days", money(u.total_cost))];
  if (u.key_id) {
    cards.push(card("budget", u.budget == null ? "unlimited" : money(u.budget)));
    cards.push(card("remaining budget", u.remaining_budget == null ? "unlimited" : money(u.remaining_budget)));
    cards.push(card("tokens used / quota", num(u.tokens_used) + " / " + (u.token_quota == null ? "∞" : num(u.token_quota))));
  }
  $("usage-summary").replaceChildren(...cards);
  barChart($("usage-chart"), lastDays(30), [{ name: "cost", values: Object.fromEntries(u.daily.map((b) => [b.date, b.cost])) }]);
  $("usage-table").tBodies[0].replaceChildren(...u.daily.map((b) => el("tr", {},
    el("td", {}, b.date), el("td", {}, num(b.requests)), el("td", {}, num(b.input_cache_hit_tokens)),
    el("td", {}, num(b.input_cache_miss_tokens)), el("td", {}, num(b.output_tokens)), el("td", {}, money(b.cost)))));
}

// --- admin: keys -----------------------------------------------------------------------
async function loadKeys() {
  const list = await api("/admin/keys");
  $("keys-table").tBodies[0].replaceChildren(...list.data.map((k) => {
    const actions = el("td", {});
    if (k.status !== "revoked") {
      actions.append(el("button", { type: "button", onclick: () => keyAction(k.id, "revoke") }, "Revoke"), " ",
        el("button", { type: "button", onclick: () => keyAction(k.id, "rotate") }, "Rotate"));
    }
    return el("tr", { "data-key": k.id },
      el("td", {}, k.id), el("td", {}, k.team || "–"), el("td", { class: "status-" + k.status }, k.status),
      el("td", {}, money(k.spent) + " / " + (k.budget == null ? "∞" : k.budget)),
      el("td", {}, num(k.tokens_used) + " / " + (k.token_quota == null ? "∞" : num(k.token_quota))),
      el("td", {}, (k.rpm || "–") + " / " + (k.tpm || "–")), el("td", {}, k.models ? k.models.join(", ") : "all"),
      el("td", {}, when(k.expires_at)), actions);
  }));
}

function showSecret(k, verb) {
  const box = $("key-secret");
  box.replaceChildren(el("b", {}, `Key ${k.id} ${verb}. Its secret, shown this once: `), el("code", { id: "new-secret" }, k.key));
  box.hidden = false;
}

async function keyAction(id, action) {
  showError(null);
  try {
    const k = await api(`/admin/keys/${encodeURIComponent(id)}/${action}`, { method: "POST", body: "{}" });
    if (action === "rotate") showSecret(k, "rotated"); else $("key-secret").hidden = true;
    await loadKeys();
  } catch (e) { showError(e); }
}

async function createKey(ev) {
  ev.preventDefault();
  showError(null);
  const form = new FormData(ev.target);
  const body = {};
  for (const [name, value] of form.entries()) {
    if (value === "") continue;
    if (["budget"].includes(name)) body[name] = Number(value);
    else if (["token_quota", "rpm", "tpm"].includes(name)) body[name] = parseInt(value, 10);
    else if (name === "models") body.models = value.split(",").map((s) => s.trim()).filter(Boolean);
    else if (name === "expires_at") body.expires_at = new Date(value).toISOString();
    else body[name] = value;
  }
  try {
    const k = await api("/admin/keys", { method: "POST", body: JSON.stringify(body) });
    showSecret(k, "created");
    ev.target.reset();
    await loadKeys();
  } catch (e) { showError(e); }
}

// --- admin: spend, report, live ----------------------------------------------------------
async function loadSpend() {
  const group = $("spend-group").value, days = $("spend-days").value;
  const s = await api(`/admin/spend?group_by=${group}&days=${days}`);
  state.currency = s.currency || state.currency;
  barChart($("spend-chart"), lastDays(Number(days)), s.series.map((x) => ({ name: x.name == null ? "(none)" : x.name, values: Object.fromEntries(x.daily.map((b) => [b.date, b.cost])) })));
  $("spend-table").tBodies[0].replaceChildren(...s.series.map((x) => el("tr", {},
    el("td", {}, x.name == null ? "(none)" : x.name), el("td", {}, num(x.requests)), el("td", {}, money(x.cost)))));
}

async function loadReport() {
  const r = await api(`/admin/report?by=model&gpu_hour_cost=${encodeURIComponent($("report-gpu").value)}`);
  state.currency = r.currency || state.currency;
  const t = r.total || {};
  const pct = (x) => (x == null ? "–" : (x * 100).toFixed(1) + " %");
  $("report-cards").replaceChildren(card("revenue", money(t.revenue)), card("revenue at list prices", money(t.theoretical_revenue)),
    card("cost (" + r.cost_basis + ")", money(t.cost)), card("profit margin on cost", pct(t.margin)),
    card("at list prices", pct(t.theoretical_margin)), card("requests", num(t.requests)),
    card("cache hit rate", pct(t.cache_hit_rate)));
  $("report-table").tBodies[0].replaceChildren(...(r.groups || []).map((g) => el("tr", {},
    el("td", {}, g.group), el("td", {}, num(g.requests)), el("td", {}, num(g.prompt_tokens)),
    el("td", {}, num(g.output_tokens)), el("td", {}, money(g.revenue)), el("td", {}, money(g.theoretical_revenue)))));
}

async function pollLive() {
  const s = await api("/admin/stats");
  if (s.front === "server") {
    state.history_live = (state.history_live || []).concat([s.output_tokens_per_s]).slice(-60);
    $("live-cards").replaceChildren(card("output tokens/s", s.output_tokens_per_s.toFixed(1)),
      card("running / max", s.running + " / " + s.max_num_seqs), card("waiting", s.waiting),
      card("KV cache in use", (s.kv_cache_usage * 100).toFixed(1) + " %"),
      card("prefix cache hit rate", (s.prefix_cache_hit_rate * 100).toFixed(1) + " %"),
      card("utilization", (s.utilization * 100).toFixed(1) + " %"));
    const slots = [...Array(60).keys()].map(String), first = 60 - state.history_live.length;
    barChart($("live-chart"), slots, [{ name: "output tokens/s (every 2 s)", values: Object.fromEntries(state.history_live.map((v, i) => [String(first + i), v])) }], false);
  } else {
    const cards = [card("utilization", (s.utilization * 100).toFixed(1) + " %")];
    for (const [tier, backends] of Object.entries(s.tiers)) {
      cards.push(card("tier " + tier + ": replicas up", backends.filter((b) => b.up).length + " / " + backends.length));
      cards.push(card("tier " + tier + ": in flight", backends.reduce((n, b) => n + b.outstanding, 0)));
    }
    $("live-cards").replaceChildren(...cards);
  }
  $("live-raw").textContent = JSON.stringify(s, null, 2);
}

async function startLive() {
  await pollLive();
  state.live = setInterval(() => pollLive().catch(showError), 2000);
}

// --- wiring -----------------------------------------------------------------------------
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("deepserve-key", state.key);
  identify();
});
$("tabs").addEventListener("click", (ev) => { if (ev.target.dataset.tab) openTab(ev.target.dataset.tab); });
$("pg-form").addEventListener("submit", send);
$("pg-clear").addEventListener("click", () => { state.history = []; $("pg-log").replaceChildren(); });
$("key-create").addEventListener("submit", createKey);
$("spend-load").addEventListener("click", () => loadSpend().catch(showError));
$("report-load").addEventListener("click", () => loadReport().catch(showError));
$("api-key").value = state.key;
identify();
