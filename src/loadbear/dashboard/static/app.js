// The loadbear dashboard: a small single-page app over /dashboard/api/*.
// Every string from the ledger goes into the page through textContent (never innerHTML), and
// the page's CSP forbids inline scripts, so a hostile feature name or prompt stays text.
"use strict";

const KEY_STORE = "loadbear.dashboard.key";
const PREF_STORE = "loadbear.dashboard.prefs";
const { stackedBars, lineChart } = window.LBCharts;

const state = {
  key: sessionStorage.getItem(KEY_STORE),
  me: null,
  prefs: Object.assign({ tenant: "", days: 14, group: "model" }, JSON.parse(sessionStorage.getItem(PREF_STORE) || "{}")),
  pages: [], // explorer cursors: pages[i] = cursor of page i (null for the first)
  filters: {},
};

// -- small DOM helpers --------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const fmt = {
  usd(micro) {
    const v = (micro || 0) / 1e6;
    const digits = Math.abs(v) >= 1 || v === 0 ? 2 : 4;
    return "$" + v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  },
  usdAxis(micro) {
    const v = micro / 1e6;
    if (v === 0) return "$0";
    return "$" + v.toLocaleString("en-US", { maximumFractionDigits: v < 1 ? 3 : 2 });
  },
  int(n) { return (n || 0).toLocaleString("en-US"); },
  compact(n) {
    if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(n >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(n * 100) / 100);
  },
  pct(r) { return r === null || r === undefined ? "—" : (r * 100).toFixed(1) + "%"; },
  ms(n) { return n === null || n === undefined ? "—" : n.toLocaleString("en-US") + " ms"; },
  time(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+Z?$/, "").replace(/Z$/, "") : "—"; },
};

function kpi(name, label, value, display, sub) {
  return h("div", { class: "kpi", "data-kpi": name, "data-value": value },
    h("div", { class: "kpi-label" }, label),
    h("div", { class: "kpi-value" }, display),
    sub ? h("div", { class: "kpi-sub" }, sub) : null);
}

function card(title, body, extra) {
  return h("section", { class: "card" },
    h("header", { class: "card-head" }, h("h2", {}, title), extra || null),
    body);
}

function table(cols, rows, opts = {}) {
  const head = h("tr", {}, cols.map((c) => h("th", { class: c.num ? "num" : null }, c.label)));
  const body = rows.length
    ? rows.map((r) => {
      const tr = h("tr", { class: opts.onclick ? "clickable" : null, "data-id": r.id || null },
        cols.map((c) => h("td", { class: c.num ? "num" : null }, c.render ? c.render(r) : r[c.key])));
      if (opts.onclick) tr.addEventListener("click", () => opts.onclick(r));
      return tr;
    })
    : [h("tr", {}, h("td", { class: "empty", colspan: cols.length }, opts.empty || "No data in this period."))];
  return h("table", { class: "table", "data-table": opts.name || null }, h("thead", {}, head), h("tbody", {}, body));
}

function badge(text, kind) {
  return h("span", { class: `badge badge-${kind || text}` }, text);
}

// -- API ----------------------------------------------------------------------------------

class AuthFailed extends Error {}

function period() {
  const to = new Date();
  const from = new Date(to.getTime() - (state.prefs.days - 1) * 86400000);
  const day = (d) => d.toISOString().slice(0, 10);
  return { from: day(from), to: day(to) };
}

async function api(path, params = {}, withPeriod = true) {
  const q = new URLSearchParams();
  if (state.me && state.me.role === "admin" && state.prefs.tenant) q.set("tenant", state.prefs.tenant);
  if (withPeriod) for (const [k, v] of Object.entries(period())) q.set(k, v);
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  const res = await fetch(`/dashboard/api/${path}${q.toString() ? "?" + q : ""}`, {
    headers: { Authorization: `Bearer ${state.key}` },
  });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) throw new AuthFailed((body.error && body.error.message) || "Unauthorized");
  if (!res.ok) throw new Error((body.error && body.error.message) || `HTTP ${res.status}`);
  return body;
}

function savePrefs() { sessionStorage.setItem(PREF_STORE, JSON.stringify(state.prefs)); }

// -- shell --------------------------------------------------------------------------------

const PAGES = [
  ["overview", "Overview"], ["tenants", "Tenants"], ["reliability", "Reliability"],
  ["cache", "Cache"], ["interactions", "Interactions"], ["evals", "Evaluations"],
];

function route() {
  const [page, arg] = (location.hash.replace(/^#\/?/, "") || "overview").split("/");
  return { page: PAGES.some(([p]) => p === page) ? page : "overview", arg: arg ? decodeURIComponent(arg) : null };
}

function renderLogin(message) {
  document.body.replaceChildren(h("div", { class: "login" },
    h("form", { class: "login-card", id: "login-form" },
      h("div", { class: "brand brand-dark" }, h("span", { class: "brand-mark" }, "lb"), "loadbear"),
      h("h1", {}, "Dashboard"),
      h("p", { class: "muted" }, "Sign in with the admin key, or a tenant API key with the usage:read scope. " +
        "The key stays in this browser tab (sessionStorage)."),
      h("input", { id: "key-input", type: "password", placeholder: "lb_… or admin key", autocomplete: "off",
        "aria-label": "API key" }),
      message ? h("div", { class: "error", id: "login-error" }, message) : null,
      h("button", { type: "submit", id: "login-button", class: "primary" }, "Sign in"))));
  document.getElementById("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    state.key = document.getElementById("key-input").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    await start();
  });
  document.getElementById("key-input").focus();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  state.me = null;
  renderLogin();
}

function renderShell() {
  const me = state.me;
  const nav = h("nav", { class: "nav" }, PAGES.map(([p, label]) =>
    h("a", { href: `#/${p}`, "data-page": p, class: "nav-link" }, label)));
  const controls = h("div", { class: "controls" });
  if (me.role === "admin") {
    const sel = h("select", { id: "tenant-select", "aria-label": "Tenant" },
      h("option", { value: "" }, "All tenants"),
      me.tenants.map((t) => h("option", { value: t.slug }, t.name || t.slug)));
    sel.value = state.prefs.tenant;
    sel.addEventListener("change", () => { state.prefs.tenant = sel.value; savePrefs(); state.pages = []; render(); });
    controls.append(sel);
  }
  const range = h("select", { id: "range-select", "aria-label": "Period" },
    [7, 14, 30, 90].map((d) => h("option", { value: d }, `Last ${d} days`)));
  range.value = String(state.prefs.days);
  range.addEventListener("change", () => { state.prefs.days = Number(range.value); savePrefs(); render(); });
  controls.append(range,
    h("span", { class: "who", id: "who" }, me.role === "admin" ? "Admin" : `Tenant · ${me.tenant.name || me.tenant.slug}`),
    h("button", { class: "ghost", id: "sign-out", onclick: signOut }, "Sign out"));
  document.body.replaceChildren(
    h("header", { class: "topbar" },
      h("div", { class: "brand" }, h("span", { class: "brand-mark" }, "lb"), "loadbear"), nav, controls),
    h("main", { id: "view", class: "view" }));
}

async function render() {
  const { page, arg } = route();
  document.querySelectorAll(".nav-link").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  const view = document.getElementById("view");
  view.setAttribute("data-loading", "1");
  try {
    const el = await PAGE_RENDERERS[page](arg);
    if (route().page !== page) return; // the user moved on meanwhile
    view.replaceChildren(el);
    window.LBCharts.flush();
    view.setAttribute("data-page", page);
  } catch (err) {
    if (err instanceof AuthFailed) return signOut();
    view.replaceChildren(h("div", { class: "card error-card", id: "page-error" }, err.message));
  } finally {
    view.removeAttribute("data-loading");
  }
}

async function start() {
  if (!state.key) return renderLogin();
  try {
    state.me = await api("me", {}, false);
  } catch (err) {
    sessionStorage.removeItem(KEY_STORE);
    state.key = null;
    return renderLogin(err.message);
  }
  if (state.me.role !== "admin") state.prefs.tenant = "";
  else if (state.prefs.tenant && !state.me.tenants.some((t) => t.slug === state.prefs.tenant)) state.prefs.tenant = "";
  renderShell();
  await render();
}

window.addEventListener("hashchange", () => { if (state.me) render(); });

// -- pages --------------------------------------------------------------------------------

function pageHead(title, sub) {
  return h("div", { class: "page-head" }, h("h1", {}, title), sub ? h("p", { class: "muted" }, sub) : null);
}

function scopeText() {
  const p = period();
  const who = state.me.role === "admin" ? (state.prefs.tenant || "all tenants") : state.me.tenant.slug;
  return `${who} · ${p.from} to ${p.to} (UTC)`;
}

async function pageOverview() {
  const d = await api("overview", { group_by: state.prefs.group });
  const t = d.totals;
  const chart = h("div", { class: "chart-box", id: "spend-chart" });
  const toggle = h("div", { class: "toggle", id: "group-toggle" }, ["model", "feature"].map((g) =>
    h("button", { class: g === d.group_by ? "on" : null, "data-group": g,
      onclick: () => { state.prefs.group = g; savePrefs(); render(); } }, `By ${g}`)));
  const savings = h("div", { class: "chart-box", id: "savings-chart" });
  const tokens = h("div", { class: "chart-box", id: "tokens-chart" });
  const requests = h("div", { class: "chart-box", id: "requests-chart" });
  const el = h("div", {},
    pageHead("Overview", scopeText()),
    h("div", { class: "kpis" },
      kpi("cost", "Spend", t.cost_micro_usd, fmt.usd(t.cost_micro_usd)),
      kpi("saved-cache", "Saved by cache", t.saved_cache_micro_usd, fmt.usd(t.saved_cache_micro_usd)),
      kpi("saved-routing", "Saved by routing", t.saved_routing_micro_usd, fmt.usd(t.saved_routing_micro_usd)),
      kpi("requests", "Requests", t.requests, fmt.int(t.requests)),
      kpi("tokens", "Tokens", t.prompt_tokens + t.completion_tokens, fmt.compact(t.prompt_tokens + t.completion_tokens),
        `${fmt.int(t.prompt_tokens)} in · ${fmt.int(t.completion_tokens)} out`)),
    h("div", { class: "grid grid-2-1" },
      card("Spend per day", chart, toggle),
      card("Savings per day", savings)),
    h("div", { class: "grid grid-2" },
      card("Tokens per day", tokens),
      card("Requests per day", requests)));
  stackedBars(chart, d.days, d.series, fmt.usdAxis, { label: "spend per day" });
  stackedBars(savings, d.days, [
    { name: "Cache", values: d.saved_cache_micro_usd, color: "#10b981" },
    { name: "Routing", values: d.saved_routing_micro_usd, color: "#0ea5e9" }], fmt.usdAxis, { label: "savings" });
  stackedBars(tokens, d.days, [
    { name: "Prompt", values: d.prompt_tokens, color: "#6366f1" },
    { name: "Completion", values: d.completion_tokens, color: "#a5b4fc" }], fmt.compact, { label: "tokens" });
  stackedBars(requests, d.days, [{ name: "Requests", values: d.requests, color: "#0f766e" }], fmt.compact,
    { label: "requests", legend: false });
  return el;
}

function budgetCell(b) {
  if (!b) return h("span", { class: "muted" }, "no budget");
  const used = b.monthly_budget_usd ? Math.min(1, b.spent_usd / b.monthly_budget_usd) : 0;
  const kind = b.hard_limit_reached ? "bad" : b.soft_threshold_reached ? "warn" : "good";
  const fill = h("div", { class: `meter-fill meter-${kind}` });
  fill.style.width = (used * 100).toFixed(1) + "%";
  return h("div", { class: "budget" },
    h("div", { class: "meter" }, fill),
    h("div", { class: "budget-text" }, `${fmt.usd(Math.round(b.spent_usd * 1e6))} of ${fmt.usd(Math.round(b.monthly_budget_usd * 1e6))}`,
      h("span", { class: "muted" }, ` · ${b.month}`)));
}

async function pageTenants() {
  const d = await api("tenants");
  const overviewTable = table([
    { label: "Tenant", render: (r) => h("span", { "data-tenant": r.slug }, r.name || r.slug) },
    { label: "Requests", num: true, render: (r) => fmt.int(r.requests) },
    { label: "Spend (period)", num: true, render: (r) => h("span", { "data-cost": r.cost_micro_usd }, fmt.usd(r.cost_micro_usd)) },
    { label: "Budget (this month)", render: (r) => budgetCell(r.budget) },
  ], d.data.map((r) => ({ ...r, id: r.slug })), { name: "tenants", empty: "No tenants." });
  const cards = d.data.map((t) => h("section", { class: "card tenant-card", "data-tenant-card": t.slug },
    h("header", { class: "card-head" }, h("h2", {}, t.name || t.slug),
      h("span", { class: "muted" }, `${fmt.usd(t.cost_micro_usd)} · ${fmt.int(t.requests)} requests`)),
    h("div", { class: "grid grid-2 tight" },
      h("div", {}, h("h3", {}, "Top features by cost"), table([
        { label: "Feature", key: "name" },
        { label: "Requests", num: true, render: (r) => fmt.int(r.requests) },
        { label: "Cost", num: true, render: (r) => fmt.usd(r.cost_micro_usd) }], t.features, { name: "features" })),
      h("div", {}, h("h3", {}, "Top users by cost"), table([
        { label: "User", key: "name" },
        { label: "Requests", num: true, render: (r) => fmt.int(r.requests) },
        { label: "Cost", num: true, render: (r) => fmt.usd(r.cost_micro_usd) }], t.users, { name: "users" })))));
  return h("div", {}, pageHead("Tenants", scopeText()), card("Spend against budget", overviewTable), ...cards);
}

async function pageReliability() {
  const d = await api("reliability");
  const t = d.totals;
  const rates = h("div", { class: "chart-box", id: "rates-chart" });
  const lat = h("div", { class: "chart-box", id: "latency-chart" });
  const ttft = h("div", { class: "chart-box", id: "ttft-chart" });
  const models = table([
    { label: "Model", key: "model" },
    { label: "Provider", key: "provider" },
    { label: "Breaker", render: (r) => h("span", { "data-breaker": r.model }, badge(r.breaker.replace("_", "-"), r.breaker)) },
    { label: "Requests", num: true, render: (r) => fmt.int(r.requests) },
    { label: "Errors", num: true, render: (r) => fmt.int(r.errors) },
    { label: "Failures in a row", num: true, render: (r) => fmt.int(r.consecutive_failures) },
    { label: "Trips", num: true, render: (r) => fmt.int(r.trips) },
  ], d.models.map((m) => ({ ...m, id: m.model })), { name: "models", empty: "No models." });
  const el = h("div", {},
    pageHead("Reliability", scopeText()),
    h("div", { class: "kpis" },
      kpi("error-rate", "Error rate", t.error_rate, fmt.pct(t.error_rate), `${fmt.int(t.errors)} of ${fmt.int(t.requests)}`),
      kpi("fallback-rate", "Fallback rate", t.fallback_rate, fmt.pct(t.fallback_rate), `${fmt.int(t.fallbacks)} answered by a fallback`),
      kpi("degraded-rate", "Degraded rate", t.degraded_rate, fmt.pct(t.degraded_rate), `${fmt.int(t.degraded)} degraded answers`),
      kpi("latency-p50", "Latency p50", t.latency_p50_ms, fmt.ms(t.latency_p50_ms), `p95 ${fmt.ms(t.latency_p95_ms)}`),
      kpi("ttft-p50", "Time to first token p50", t.ttft_p50_ms, fmt.ms(t.ttft_p50_ms), `p95 ${fmt.ms(t.ttft_p95_ms)}`)),
    card("Error, fallback and degraded rates", rates),
    h("div", { class: "grid grid-2" }, card("Latency", lat), card("Time to first token", ttft)),
    card("Models and circuit breakers", models));
  const pct = (v) => (v * 100).toFixed(v < 0.1 && v > 0 ? 1 : 0) + "%";
  lineChart(rates, d.days, [
    { name: "Errors", values: d.error_rate, color: "#ef4444" },
    { name: "Fallbacks", values: d.fallback_rate, color: "#f59e0b" },
    { name: "Degraded", values: d.degraded_rate, color: "#8b5cf6" }], pct, { label: "rates" });
  const msAxis = (v) => fmt.compact(v) + " ms";
  lineChart(lat, d.days, [
    { name: "p50", values: d.latency_p50_ms, color: "#4f46e5" },
    { name: "p95", values: d.latency_p95_ms, color: "#4f46e5", dashed: true }], msAxis, { label: "latency" });
  lineChart(ttft, d.days, [
    { name: "p50", values: d.ttft_p50_ms, color: "#0ea5e9" },
    { name: "p95", values: d.ttft_p95_ms, color: "#0ea5e9", dashed: true }], msAxis, { label: "ttft" });
  return el;
}

async function pageCache() {
  const d = await api("cache");
  const t = d.totals;
  const rate = h("div", { class: "chart-box", id: "hit-rate-chart" });
  const saved = h("div", { class: "chart-box", id: "cache-savings-chart" });
  const el = h("div", {},
    pageHead("Cache", scopeText()),
    h("div", { class: "kpis" },
      kpi("hit-rate", "Hit rate", t.hit_rate, fmt.pct(t.hit_rate)),
      kpi("hits", "Cached answers", t.hits, fmt.int(t.hits), `of ${fmt.int(t.requests)} requests`),
      kpi("cache-saved", "Saved by cache", t.saved_micro_usd, fmt.usd(t.saved_micro_usd))),
    h("div", { class: "grid grid-2" }, card("Hit rate per day", rate), card("Savings per day", saved)),
    h("div", { class: "grid grid-2" },
      card("By kind", table([
        { label: "Kind", key: "kind" },
        { label: "Hits", num: true, render: (r) => fmt.int(r.hits) },
        { label: "Saved", num: true, render: (r) => fmt.usd(r.saved_micro_usd) }], d.kinds, { name: "kinds", empty: "No cache hits." })),
      card("By feature", table([
        { label: "Feature", key: "feature" },
        { label: "Requests", num: true, render: (r) => fmt.int(r.requests) },
        { label: "Hit rate", num: true, render: (r) => fmt.pct(r.hit_rate) },
        { label: "Saved", num: true, render: (r) => fmt.usd(r.saved_micro_usd) }], d.features, { name: "cache-features" }))));
  lineChart(rate, d.days, [{ name: "Hit rate", values: d.hit_rate, color: "#10b981" }],
    (v) => (v * 100).toFixed(0) + "%", { label: "hit rate", legend: false });
  stackedBars(saved, d.days, [{ name: "Saved", values: d.saved_micro_usd, color: "#10b981" }], fmt.usdAxis,
    { label: "cache savings", legend: false });
  return el;
}

// -- interactions -------------------------------------------------------------------------

function filterSelect(name, label, options) {
  const sel = h("select", { name, "data-filter": name, "aria-label": label },
    h("option", { value: "" }, `${label}: any`),
    options.map((o) => Array.isArray(o) ? h("option", { value: o[0] }, o[1]) : h("option", { value: o }, o)));
  sel.value = state.filters[name] || "";
  sel.addEventListener("change", () => { state.filters[name] = sel.value; state.pages = []; render(); });
  return sel;
}

function filterDate(name, label) {
  const inp = h("input", { type: "date", name, "data-filter": name, "aria-label": label, title: label });
  inp.value = state.filters[name] || "";
  inp.addEventListener("change", () => { state.filters[name] = inp.value; state.pages = []; render(); });
  return h("label", { class: "date-filter" }, h("span", {}, label), inp);
}

async function pageInteractions(id) {
  if (id) return pageInteraction(id);
  const page = state.pages.length ? state.pages.length - 1 : 0;
  const cursor = state.pages[page] || null;
  const params = { ...state.filters, cursor, limit: 25 };
  const [choices, list] = await Promise.all([api("filters"), api("interactions", params, false)]);
  const bar = h("div", { class: "filters", id: "filters" },
    filterSelect("user", "User", choices.users),
    filterSelect("feature", "Feature", choices.features),
    filterSelect("model", "Model", choices.models),
    filterSelect("status", "Status", ["ok", "error", "degraded", "cancelled"]),
    filterSelect("cached", "Cached", [["true", "cached"], ["false", "not cached"]]),
    filterDate("from", "From"), filterDate("to", "To"),
    h("button", { class: "ghost", id: "clear-filters", onclick: () => { state.filters = {}; state.pages = []; render(); } }, "Clear"));
  const rows = table([
    { label: "Time (UTC)", render: (r) => fmt.time(r.created_at) },
    state.me.role === "admin" ? { label: "Tenant", key: "tenant" } : null,
    { label: "User", render: (r) => r.user || h("span", { class: "muted" }, "—") },
    { label: "Feature", key: "feature" },
    { label: "Model", key: "model" },
    { label: "Status", render: (r) => h("span", {}, badge(r.status), r.cached ? badge("cached", "cached") : null,
      r.attempt_count > 1 ? badge(`${r.attempt_count} attempts`, "muted") : null) },
    { label: "Tokens", num: true, render: (r) => fmt.int(r.prompt_tokens + r.completion_tokens) },
    { label: "Cost", num: true, render: (r) => fmt.usd(r.cost_micro_usd) },
    { label: "Latency", num: true, render: (r) => fmt.ms(r.latency_ms) },
  ].filter(Boolean), list.data, { name: "interactions", empty: "No interactions match these filters.",
    onclick: (r) => { location.hash = `#/interactions/${r.id}`; } });
  const pager = h("div", { class: "pager" },
    h("button", { class: "ghost", id: "newer", disabled: page === 0 ? true : null,
      onclick: () => { state.pages.pop(); render(); } }, "← Newer"),
    h("span", { class: "muted", id: "page-no" }, `Page ${page + 1}`),
    h("button", { class: "ghost", id: "older", disabled: list.has_more ? null : true,
      onclick: () => { if (!state.pages.length) state.pages.push(null); state.pages.push(list.next_cursor); render(); } }, "Older →"));
  return h("div", {}, pageHead("Interactions", "Every request in the ledger, newest first. Click a row for its detail."),
    bar, card(`${list.data.length}${list.has_more ? "+" : ""} interactions`, h("div", {}, rows, pager)));
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]).flat());
}

async function pageInteraction(id) {
  const d = await api(`interactions/${encodeURIComponent(id)}`, {}, false);
  const content = d.content_allowed
    ? h("div", { class: "grid grid-2 tight" },
      h("div", {}, h("h3", {}, "Prompt"), h("pre", { class: "content", id: "prompt-text" },
        typeof d.prompt === "string" ? d.prompt : JSON.stringify(d.prompt, null, 2) || "(not stored)")),
      h("div", {}, h("h3", {}, "Answer"), h("pre", { class: "content", id: "response-text" }, d.response || "(not stored)")))
    : h("p", { class: "muted", id: "content-hidden" },
      "Prompt and answer are not shown: this tenant does not allow storing content (store_content is off).");
  return h("div", { id: "interaction-detail", "data-id": d.id },
    h("a", { href: "#/interactions", class: "back" }, "← All interactions"),
    pageHead(`Interaction ${d.id.slice(0, 8)}…`, `${d.tenant} · ${fmt.time(d.created_at)} UTC`),
    h("div", { class: "kpis" },
      kpi("detail-cost", "Cost", d.cost_micro_usd, fmt.usd(d.cost_micro_usd), d.saved_micro_usd ? `saved ${fmt.usd(d.saved_micro_usd)}` : null),
      kpi("detail-tokens", "Tokens", d.prompt_tokens + d.completion_tokens, fmt.int(d.prompt_tokens + d.completion_tokens),
        `${fmt.int(d.prompt_tokens)} in · ${fmt.int(d.completion_tokens)} out`),
      kpi("detail-latency", "Latency", d.latency_ms, fmt.ms(d.latency_ms)),
      kpi("detail-ttft", "First token", d.ttft_ms, fmt.ms(d.ttft_ms))),
    h("div", { class: "grid grid-2" },
      card("Request", kv([
        ["Status", h("span", {}, badge(d.status), d.cached ? badge("cached", "cached") : null)],
        ["Feature", d.feature], ["User", d.user], ["Requested model", d.requested_model],
        ["Served model", d.model], ["Provider", d.provider], ["Route", d.route_reason ? `${d.route} — ${d.route_reason}` : d.route],
        ["Finish reason", d.finish_reason], d.error ? ["Error", `${d.error_type || ""} ${d.error}`] : null,
        d.cached ? ["Cache", `${d.cache_kind || "exact"}${d.cache_similarity ? ` (similarity ${d.cache_similarity.toFixed(3)})` : ""}`] : null,
        ["Request id", d.request_id], ["Interaction id", d.id]])),
      card("Feedback", d.feedback.length
        ? h("ul", { class: "feedback", id: "feedback-list" }, d.feedback.map((f) => h("li", {},
          badge(f.scale === "thumbs" ? (f.rating > 0 ? "thumbs up" : "thumbs down") : `${f.rating} of 5 stars`, f.negative ? "error" : "ok"),
          h("span", {}, f.comment || ""), f.correction ? h("div", { class: "muted" }, `Correction: ${f.correction}`) : null,
          h("div", { class: "muted small" }, `${f.user || "anonymous"} · ${fmt.time(f.created_at)}`))))
        : h("p", { class: "muted", id: "feedback-list" }, "No feedback."))),
    card("Attempts", table([
      { label: "#", key: "attempt_no", num: true },
      { label: "Provider", key: "provider" }, { label: "Model", key: "model" },
      { label: "Status", render: (r) => badge(r.status, r.status === "ok" ? "ok" : r.status === "skipped" ? "muted" : "error") },
      { label: "Error", render: (r) => r.error_type ? `${r.error_type}${r.http_status ? ` (${r.http_status})` : ""}` : "" },
      { label: "Tokens", num: true, render: (r) => fmt.int(r.prompt_tokens + r.completion_tokens) },
      { label: "Cost", num: true, render: (r) => fmt.usd(r.cost_micro_usd) },
      { label: "Latency", num: true, render: (r) => fmt.ms(r.latency_ms) },
      { label: "First token", num: true, render: (r) => fmt.ms(r.ttft_ms) }], d.attempts,
    { name: "attempts", empty: d.cached ? "Answered from the cache: no upstream call." : "No upstream attempts." })),
    card("Retrieved sources", d.sources.length
      ? h("ol", { class: "sources", id: "sources" }, d.sources.map((s) => h("li", {},
        h("strong", {}, s.title || s.document || s.chunk_id), s.found ? null : h("span", { class: "muted" }, " (deleted since)"),
        s.excerpt ? h("div", { class: "muted small" }, s.excerpt) : null)))
      : h("p", { class: "muted", id: "sources" }, "No retrieval for this request.")),
    card("Prompt and answer", content));
}

// -- evaluations --------------------------------------------------------------------------

function metricCols(runs) {
  const names = new Set();
  runs.forEach((r) => Object.keys(r.metrics || {}).forEach((k) => names.add(k)));
  const pref = ["pass_rate", "retrieval.recall@5", "retrieval.mrr", "generation.faithfulness", "generation.answer_correct"];
  return [...names].sort((a, b) => ((pref.indexOf(a) + 1 || 99) - (pref.indexOf(b) + 1 || 99)) || a.localeCompare(b)).slice(0, 5);
}

async function pageEvals() {
  const runs = (await api("evals", {}, false)).data;
  const cols = metricCols(runs);
  const runLabel = (r) => `${r.label || r.id.slice(0, 8)} · ${fmt.time(r.created_at)}`;
  const selA = h("select", { id: "run-a", "aria-label": "Run A" }, runs.map((r) => h("option", { value: r.id }, runLabel(r))));
  const selB = h("select", { id: "run-b", "aria-label": "Run B" }, runs.map((r) => h("option", { value: r.id }, runLabel(r))));
  if (runs.length > 1) { selA.value = runs[1].id; selB.value = runs[0].id; }
  const out = h("div", { id: "comparison" });
  const compare = async () => {
    out.replaceChildren(h("p", { class: "muted" }, "Comparing…"));
    try {
      out.replaceChildren(renderComparison(await api("evals/compare", { a: selA.value, b: selB.value }, false)));
    } catch (err) {
      out.replaceChildren(h("div", { class: "error" }, err.message));
    }
  };
  const list = table([
    { label: "Run", render: (r) => h("span", {}, h("strong", {}, r.label || r.id.slice(0, 8)), h("div", { class: "muted small" }, r.id)) },
    state.me.role === "admin" ? { label: "Tenant", key: "tenant" } : null,
    { label: "Created", render: (r) => fmt.time(r.created_at) },
    { label: "Dataset", key: "dataset" }, { label: "Model", key: "model" },
    { label: "Status", render: (r) => badge(r.status, r.status === "completed" ? "ok" : r.status === "failed" ? "error" : "muted") },
    { label: "Cases", num: true, render: (r) => r.cases ?? "—" },
    ...cols.map((c) => ({ label: c, num: true, render: (r) => {
      const v = (r.metrics || {})[c];
      return v === undefined || v === null ? "—" : c === "pass_rate" ? fmt.pct(v) : v.toFixed(3);
    } })),
  ].filter(Boolean), runs, { name: "runs", empty: "No evaluation runs yet: run `loadbear eval run`." });
  return h("div", {}, pageHead("Evaluations", "Runs of the evaluation suite, newest first."),
    card("Runs", list),
    runs.length > 1
      ? card("Compare two runs", h("div", {}, h("div", { class: "filters" },
        h("label", { class: "date-filter" }, h("span", {}, "A (reference)"), selA),
        h("label", { class: "date-filter" }, h("span", {}, "B (new)"), selB),
        h("button", { class: "primary", id: "compare-button", onclick: compare }, "Compare")), out))
      : null);
}

function deltaCell(v, lowerIsBetter) {
  if (v === null || v === undefined) return h("span", { class: "muted" }, "—");
  const good = lowerIsBetter ? v < 0 : v > 0;
  return h("span", { class: v === 0 ? "muted" : good ? "delta-good" : "delta-bad" }, (v > 0 ? "+" : "") + v.toFixed(4));
}

function renderComparison(c) {
  const num = (v) => (v === null || v === undefined ? "—" : Number(v).toFixed(4));
  const flips = (title, rows, id) => h("div", { "data-flips": id }, h("h3", {}, `${title} (${rows.length})`), rows.length
    ? h("ul", { class: "flips" }, rows.map((r) => h("li", {}, h("strong", {}, r.case_id), ` ${r.a} → ${r.b}`,
      r.query ? h("div", { class: "muted small" }, r.query) : null)))
    : h("p", { class: "muted" }, "None."));
  return h("div", { class: "comparison" },
    h("div", { class: "grid grid-2 tight" },
      ["a", "b"].map((k) => h("div", { class: "run-head", "data-run": k },
        h("div", { class: "muted small" }, k === "a" ? "A · reference" : "B · new"),
        h("strong", {}, c[k].label || c[k].id.slice(0, 8)),
        h("div", { class: "muted small" }, `${c[k].model} · ${c[k].dataset} · ${fmt.time(c[k].created_at)}`)))),
    !c.same_dataset ? h("p", { class: "warn" }, "The runs used different datasets: deltas compare different cases.") : null,
    c.fingerprint_changes.length ? h("p", { class: "muted" }, "Pipeline changes: " +
      c.fingerprint_changes.map((f) => `${f.field}: ${f.a ?? "—"} → ${f.b ?? "—"}`).join("; ")) : null,
    table([
      { label: "Metric", key: "name" },
      { label: "A", num: true, render: (r) => num(r.a) },
      { label: "B", num: true, render: (r) => num(r.b) },
      { label: "Δ", num: true, render: (r) => deltaCell(r.delta, /latency|cost/.test(r.name)) }], c.metrics, { name: "compare-metrics" }),
    h("div", { class: "grid grid-2 tight" },
      flips("Regressions", c.flips.regressions, "regressions"), flips("Fixes", c.flips.fixes, "fixes")));
}

const PAGE_RENDERERS = {
  overview: pageOverview, tenants: pageTenants, reliability: pageReliability, cache: pageCache,
  interactions: pageInteractions, evals: pageEvals,
};

start();
