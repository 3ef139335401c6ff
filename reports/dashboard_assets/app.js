// tokenaudit dashboard: every number comes from the usage API's routes, called with the key the
// user signed in with (the API scopes it); charts are Chart.js (vendor/). Text from the API is
// only ever set with textContent (or drawn on a canvas by Chart.js), never parsed as HTML.
"use strict";
(function () {
  const KEY_SLOT = "tokenaudit.key"; // sessionStorage: this tab only, gone when the tab closes
  const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 };
  // ranges of whole UTC days (today and the days before it): per-day buckets are calendar days,
  // and the API reads whole days from its daily pre-aggregate instead of every window
  const DAY_RANGES = new Set(["7d", "30d"]);
  // bucket_width of the OpenAI-shaped endpoint -> [seconds, max buckets per page, latency bucket]
  const WIDTHS = [["1m", 60, 1440, "minute"], ["1h", 3600, 168, "hour"], ["1d", 86400, 31, "day"]];
  const PANELS = ["tokens", "top", "cost", "latency-time", "latency-input", "scatter", "anomalies", "budgets"];
  const COLORS = ["#2e90fa", "#f79009", "#12b76a", "#9e77ed", "#f04438", "#0ba5ec", "#ee46bc", "#667085",
    "#84cc16", "#a15c07"];
  const STACKED = 9;
  const ID = /^[A-Za-z0-9][A-Za-z0-9_.:@+\/-]{0,127}$/; // what the API accepts as a filter value
  const NUM = new Intl.NumberFormat("en-US");
  const state = { key: null, admin: false, scope: null, charts: {}, timer: null, feed: null, loading: false };
  // read by the browser tests and the bench: when each panel was drawn (ms since navigation)
  const perf = (window.__dashboard = { panels: {}, allDrawnMs: null, loads: 0, range: null, feed: [] });

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, message, param) {
      super(message);
      this.status = status;
      this.param = param;
    }
  }

  async function api(path, params) {
    const url = new URL(path, window.location.origin);
    for (const [name, value] of Object.entries(params || {})) {
      if (value === undefined || value === null || value === "") continue;
      for (const v of Array.isArray(value) ? value : [value]) url.searchParams.append(name, String(v));
    }
    const response = await fetch(url, { headers: { Authorization: "Bearer " + state.key }, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const err = body && body.error ? body.error : {};
      throw new ApiError(response.status, err.message || "HTTP " + response.status, err.param);
    }
    return body;
  }

  // --- range and filters --------------------------------------------------------------------
  function currentRange() {
    const choice = $("range").value;
    let until = Math.floor(Date.now() / 1000);
    let since = until - (RANGES[choice] || 86400);
    if (DAY_RANGES.has(choice)) since = until - (until % 86400) - RANGES[choice] + 86400;
    if (choice === "custom" && $("custom-since").value && $("custom-until").value) {
      since = Math.floor(Date.parse($("custom-since").value + "Z") / 1000);
      until = Math.floor(Date.parse($("custom-until").value + "Z") / 1000);
    }
    return { since: since, until: until, sinceIso: iso(since), untilIso: iso(until) };
  }

  function iso(seconds) {
    return new Date(seconds * 1000).toISOString().replace(".000Z", "Z");
  }

  function filters() {
    if (!state.admin) return {};
    return {
      client: $("filter-client").value.trim(),
      department: $("filter-department").value.trim(),
      model: $("filter-model").value.trim(),
    };
  }

  function widthFor(range) {
    const span = range.until - range.since;
    // at most 360 points on a chart (an hour by minute, a week by hour, a month by day)
    return WIDTHS.find((w) => span / w[1] <= Math.min(w[2], 360)) || WIDTHS[WIDTHS.length - 1];
  }

  // --- panels --------------------------------------------------------------------------------
  function panel(name) {
    return $("panel-" + name);
  }

  function setState(name, value, message) {
    const el = panel(name);
    el.dataset.state = value;
    el.querySelector(".error").textContent = message || "";
    if (value === "drawn" || value === "error") perf.panels[name] = performance.now();
  }

  function chart(id, config) {
    if (state.charts[id]) state.charts[id].destroy();
    config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options);
    state.charts[id] = new window.Chart($(id), config);
  }

  function cell(row, text, numeric) {
    const td = document.createElement("td");
    td.textContent = text;
    if (numeric) td.className = "num";
    row.appendChild(td);
    return td;
  }

  function fillTable(tbodyId, rows, toCells) {
    const body = $(tbodyId);
    body.replaceChildren();
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const [text, numeric] of toCells(row)) cell(tr, text, numeric);
      body.appendChild(tr);
    }
  }

  function label(seconds, width) {
    const text = iso(seconds);
    return width[1] >= 86400 ? text.slice(0, 10) : text.slice(5, 16).replace("T", " ");
  }

  // every page of the OpenAI-shaped endpoint; a width finer than the stream's window is a 400,
  // answered by trying the next coarser one
  async function usagePages(params, width) {
    let pages = [];
    for (;;) {
      let page;
      try {
        page = await api("/v1/organization/usage/completions", { ...params, bucket_width: width[0], limit: width[2] });
      } catch (err) {
        const coarser = WIDTHS[WIDTHS.indexOf(width) + 1];
        if (err.param === "bucket_width" && coarser && pages.length === 0) {
          width = coarser;
          continue;
        }
        throw err;
      }
      pages = pages.concat(page.data);
      if (!page.has_more) return { pages: pages, width: width };
      params = { ...params, page: page.next_page };
    }
  }

  function series(pages, field) {
    const groups = new Map();
    pages.forEach((bucket, i) => {
      for (const r of bucket.results) {
        const name = field ? r[field] : "total";
        if (!groups.has(name)) groups.set(name, new Array(pages.length).fill(0));
        groups.get(name)[i] += r.input_tokens + r.output_tokens;
      }
    });
    return groups;
  }

  async function tokensPanel(range, f, topRows) {
    const base = { start_time: range.since, end_time: range.until, user_ids: f.client, project_ids: f.department,
      models: f.model };
    // the total (the panel's numbers, and the height of the stack) and the stacks asked at once:
    // the stacks need only the top clients, not the total (both coarsen a width the same way)
    const stacksAt = (width) => state.admin
      ? topRows.then((rows) => {
        const ids = rows.slice(0, STACKED).map((r) => r.client_id).filter((id) => ID.test(id));
        return ids.length ? usagePages({ ...base, user_ids: ids, group_by: "user_id" }, width) : null;
      })
      : usagePages({ ...base, group_by: "model" }, width);
    const stacked = stacksAt(widthFor(range));
    stacked.catch(() => null); // reported below, once the total is in
    const total = await usagePages(base, widthFor(range));
    const width = total.width;
    let tokens = 0;
    let requests = 0;
    for (const bucket of total.pages) {
      for (const r of bucket.results) {
        tokens += r.input_tokens + r.output_tokens;
        requests += r.num_model_requests;
      }
    }
    $("total-tokens").textContent = NUM.format(tokens);
    $("total-tokens").dataset.value = String(tokens);
    $("total-requests").textContent = NUM.format(requests);
    $("total-requests").dataset.value = String(requests);
    // stacked by client (an admin: the heaviest few, the rest as "other", so thousands of
    // clients cost one small answer) or by model (a client key)
    let parts = await stacked;
    if (parts && parts.width !== width) parts = await stacksAt(width); // the total settled on another width
    const stacks = parts ? series(parts.pages, state.admin ? "user_id" : "model") : new Map();
    const sum = series(total.pages, null).get("total") || new Array(total.pages.length).fill(0);
    const rest = sum.map((v, i) => v - [...stacks.values()].reduce((acc, data) => acc + (data[i] || 0), 0));
    const shown = [...stacks.entries()];
    if (rest.some((v) => v > 0)) shown.push(["other", rest]);
    $("tokens-stack").textContent = "stacked by " + (state.admin ? "client" : "model") + ", per " + width[0];
    const datasets = shown.map(([name, data], i) => ({
      label: name, data: data, fill: i === 0 ? "origin" : "-1", pointRadius: 0, borderWidth: 1,
      borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length] + "66",
    }));
    chart("chart-tokens", {
      type: "line",
      data: { labels: total.pages.map((b) => label(b.start_time, width)), datasets: datasets },
      options: { scales: { y: { stacked: true, beginAtZero: true } }, interaction: { mode: "index", intersect: false } },
    });
    return width;
  }

  async function topPanel(topRows) {
    const body = { rows: await topRows };
    fillTable("top-rows", body.rows, (r) => [[String(r.rank)], [r.client_id], [r.department],
      [NUM.format(r.total_tokens), true], [r.share_pct.toFixed(2) + " %", true]]);
    chart("chart-top", {
      type: "bar",
      data: { labels: body.rows.map((r) => r.client_id),
        datasets: [{ label: "share of tokens (%)", data: body.rows.map((r) => r.share_pct), backgroundColor: COLORS[0] }] },
      options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true, max: 100 } } },
    });
  }

  async function costPanel(f) {
    if (!$("cost-month").value) $("cost-month").value = new Date().toISOString().slice(0, 7);
    const body = await api("/v1/report", { month: $("cost-month").value, client: f.client, detail: "department" });
    const cost = body.cost;
    const departments = cost ? cost.rows.filter((r) => r.level !== "client") : [];
    fillTable("cost-rows", departments, (r) => [[r.level === "total" ? "total" : r.department],
      [NUM.format(r.total_tokens), true], [r.cost + (cost.currency ? " " + cost.currency : ""), true]]);
    const bars = departments.filter((r) => r.level === "department");
    chart("chart-cost", {
      type: "bar",
      data: { labels: bars.map((r) => r.department),
        datasets: [{ label: "cost" + (cost && cost.currency ? " (" + cost.currency + ")" : ""),
          data: bars.map((r) => Number(r.cost)), backgroundColor: COLORS[2] }] },
      options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } },
    });
    return cost ? "" : body.cost_error;
  }

  async function latencyTimePanel(range, f, width) {
    const body = await api("/v1/latency", { since: range.sinceIso, until: range.untilIso, bucket: width[3], ...f });
    chart("chart-latency-time", {
      type: "line",
      data: { labels: body.rows.map((r) => r.time.replace("T", " ").slice(0, 16)),
        datasets: [
          { label: "p50 ms", data: body.rows.map((r) => r.p50_latency_ms), borderColor: COLORS[0], pointRadius: 1 },
          { label: "p95 ms", data: body.rows.map((r) => r.p95_latency_ms), borderColor: COLORS[4], pointRadius: 1 },
        ] },
      options: { scales: { y: { beginAtZero: true } } },
    });
  }

  async function latencyInputPanel(range, f) {
    const body = await api("/v1/latency", { since: range.sinceIso, until: range.untilIso, bucket: "input", ...f });
    chart("chart-latency-input", {
      type: "bar",
      data: { labels: body.rows.map((r) => r.input_tokens),
        datasets: [
          { label: "p50 ms", data: body.rows.map((r) => r.p50_latency_ms), backgroundColor: COLORS[0] },
          { label: "p95 ms", data: body.rows.map((r) => r.p95_latency_ms), backgroundColor: COLORS[4] },
        ] },
      options: { scales: { x: { title: { display: true, text: "input tokens" } }, y: { beginAtZero: true } } },
    });
  }

  async function scatterPanel(range, f) {
    const body = await api("/v1/samples", { since: range.sinceIso, until: range.untilIso, limit: 2000, ...f });
    const byModel = new Map();
    for (const r of body.rows) {
      if (!byModel.has(r.model)) byModel.set(r.model, []);
      byModel.get(r.model).push({ x: r.input_tokens + r.output_tokens, y: r.latency_ms });
    }
    chart("chart-scatter", {
      type: "scatter",
      data: { datasets: [...byModel.entries()].map(([model, points], i) => ({
        label: model, data: points, backgroundColor: COLORS[i % COLORS.length], pointRadius: 2 })) },
      options: { scales: { x: { title: { display: true, text: "tokens" } },
        y: { title: { display: true, text: "latency ms" }, beginAtZero: true } } },
    });
  }

  function anomalyItem(a, fresh) {
    const li = document.createElement("li");
    if (fresh) li.className = "new";
    li.dataset.anomalyId = a.anomaly_id;
    const sev = document.createElement("span");
    sev.className = a.severity === "critical" ? "sev-critical" : "sev-warning";
    sev.textContent = a.severity;
    const text = document.createElement("span");
    text.textContent = " " + String(a.ts).replace("T", " ").slice(0, 19) + " " + a.client_id + " " + a.rule +
      ": observed " + a.observed + ", threshold " + a.threshold + (a.message ? " (" + a.message + ")" : "");
    li.append(sev, text);
    return li;
  }

  async function anomaliesPanel(range, f) {
    const body = await api("/v1/anomalies", { since: range.sinceIso, until: range.untilIso, limit: 50, ...f });
    const list = $("anomaly-list");
    list.replaceChildren(...body.rows.reverse().map((a) => anomalyItem(a, false)));
  }

  // --- the live feed: server-sent events read with fetch (EventSource cannot send the key) ----
  async function connectFeed() {
    if (state.feed) state.feed.abort();
    const control = new AbortController();
    state.feed = control;
    const panelEl = panel("anomalies");
    panelEl.dataset.feed = "connecting";
    const url = new URL("/v1/anomalies/stream", window.location.origin);
    for (const [name, value] of Object.entries(filters())) if (value) url.searchParams.set(name, value);
    try {
      const response = await fetch(url, { headers: { Authorization: "Bearer " + state.key }, signal: control.signal });
      if (!response.ok) throw new ApiError(response.status, "live feed: HTTP " + response.status);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (err) {
      if (control.signal.aborted) return;
    }
    if (state.feed === control && state.key) { // dropped: say so, and reconnect
      panelEl.dataset.feed = "reconnecting";
      $("feed-state").textContent = "reconnecting…";
      setTimeout(() => { if (state.feed === control) connectFeed(); }, 3000);
    }
  }

  function onEvent(chunk) {
    let event = "message";
    let data = "";
    for (const line of chunk.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (event === "ready") {
      panel("anomalies").dataset.feed = "live";
      $("feed-state").textContent = "live";
    } else if (event === "anomaly") {
      const anomaly = JSON.parse(data);
      const list = $("anomaly-list");
      list.prepend(anomalyItem(anomaly, true));
      while (list.children.length > 200) list.lastChild.remove();
      perf.feed.push({ anomaly_id: anomaly.anomaly_id, shownAt: Date.now() });
    }
  }

  // --- request search (only where the API has the ledger) -----------------------------------
  async function detectLedger() {
    try {
      await api("/v1/requests", { limit: 1 });
      $("panel-requests").classList.remove("hidden");
      $("panel-requests").dataset.state = "ready";
    } catch (err) {
      $("panel-requests").classList.add("hidden"); // 404: no ledger route on this API
    }
  }

  async function searchRequest(event) {
    event.preventDefault();
    const id = $("request-id").value.trim();
    const el = $("panel-requests");
    try {
      const body = await api("/v1/requests/" + encodeURIComponent(id), {});
      fillTable("request-rows", body.rows || [], (r) => [[r.ts], [r.request_id], [r.client_id], [r.model],
        [String(r.status_code), true], [NUM.format(r.total_tokens), true], [String(r.latency_ms), true]]);
      el.querySelector(".error").textContent = "";
    } catch (err) {
      el.querySelector(".error").textContent = err.message;
    }
  }

  // --- loading -------------------------------------------------------------------------------
  async function run(name, work) {
    try {
      const problem = await work();
      setState(name, "drawn", problem || "");
    } catch (err) {
      setState(name, "error", err.message);
    }
  }

  async function loadAll() {
    if (state.loading || !state.key) return;
    state.loading = true;
    const started = performance.now();
    const range = currentRange();
    const f = filters();
    perf.range = { since: range.sinceIso, until: range.untilIso, start_time: range.since, end_time: range.until };
    PANELS.forEach((name) => { panel(name).dataset.state = "loading"; });
    $("status").textContent = "loading…";
    const first = widthFor(range);
    let width = first;
    // one top-clients query feeds both the top panel and the stacking of the tokens panel
    const topRows = api("/v1/top", { since: range.sinceIso, until: range.untilIso, limit: 10, ...f }).then((b) => b.rows);
    topRows.catch(() => null); // its panels report the error
    const tokens = run("tokens", async () => { width = await tokensPanel(range, f, topRows); });
    await Promise.all([
      tokens,
      run("top", () => topPanel(topRows)),
      run("cost", () => costPanel(f)),
      // at once, with the width the tokens panel starts from; again in the one it settled on if
      // the API refused that one as finer than the stream's window
      run("latency-time", () => latencyTimePanel(range, f, first)).then(() => tokens).then(() =>
        width !== first ? run("latency-time", () => latencyTimePanel(range, f, width)) : null),
      run("latency-input", () => latencyInputPanel(range, f)),
      run("scatter", () => scatterPanel(range, f)),
      run("anomalies", () => anomaliesPanel(range, f)),
      // budgets.js: the current period's spend, whatever the range; an admin's client filter narrows it
      run("budgets", () => window.tokenauditBudgets.load(api, f.client)),
    ]);
    perf.loads += 1;
    if (perf.allDrawnMs === null) perf.allDrawnMs = performance.now();
    perf.lastLoadMs = performance.now() - started;
    $("status").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
    document.body.dataset.loaded = String(perf.loads);
    state.loading = false;
  }

  function schedule() {
    if (state.timer) clearInterval(state.timer);
    const seconds = Number($("refresh").value);
    state.timer = seconds > 0 ? setInterval(loadAll, seconds * 1000) : null;
  }

  // --- sign-in -------------------------------------------------------------------------------
  async function signIn(key) {
    state.key = key;
    let body;
    try {
      body = await api("/v1/top", { since: "1h", limit: 1 });
    } catch (err) {
      state.key = null;
      sessionStorage.removeItem(KEY_SLOT);
      $("signin-error").textContent = err.status === 401 ? "That key was not accepted." : err.message;
      return;
    }
    sessionStorage.setItem(KEY_SLOT, key);
    state.scope = body.scope;
    state.admin = body.scope === "*";
    $("whoami").textContent = state.admin ? "admin: all clients" : "client: " + body.scope;
    $("admin-filters").classList.toggle("hidden", !state.admin);
    $("signin").classList.add("hidden");
    $("dashboard").classList.remove("hidden");
    document.body.dataset.scope = body.scope;
    detectLedger();
    connectFeed();
    schedule();
    await loadAll();
  }

  function signOut() {
    sessionStorage.removeItem(KEY_SLOT);
    state.key = null;
    if (state.feed) state.feed.abort();
    state.feed = null;
    if (state.timer) clearInterval(state.timer);
    Object.values(state.charts).forEach((c) => c.destroy());
    state.charts = {};
    // nothing of this key's data stays in the page for the next one to see
    for (const id of ["top-rows", "cost-rows", "anomaly-list", "request-rows", "budget-rows"]) $(id).replaceChildren();
    $("budgets-none").classList.add("hidden");
    for (const id of ["total-tokens", "total-requests", "whoami"]) {
      $(id).textContent = "";
      delete $(id).dataset.value;
    }
    PANELS.forEach((name) => { panel(name).dataset.state = "pending"; });
    delete document.body.dataset.loaded;
    delete document.body.dataset.scope;
    $("dashboard").classList.add("hidden");
    $("signin").classList.remove("hidden");
  }

  document.addEventListener("DOMContentLoaded", () => {
    window.Chart.defaults.font.size = 11;
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      $("api-key").value = "";
      $("signin-error").textContent = "";
      signIn(key);
    });
    $("signout").addEventListener("click", signOut);
    $("apply").addEventListener("click", () => { connectFeed(); loadAll(); });
    $("range").addEventListener("change", () => {
      $("custom-range").classList.toggle("hidden", $("range").value !== "custom");
      if ($("range").value !== "custom") loadAll();
    });
    $("refresh").addEventListener("change", schedule);
    $("cost-month").addEventListener("change", () => run("cost", () => costPanel(filters())));
    $("request-form").addEventListener("submit", searchRequest);
    const linked = /^#range=(1h|24h|7d|30d)$/.exec(window.location.hash); // a shareable range, never a key
    if (linked) $("range").value = linked[1];
    const saved = sessionStorage.getItem(KEY_SLOT);
    if (saved) signIn(saved);
  });
})();
