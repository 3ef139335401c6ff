// The Budgets panel of the dashboard (app.js calls it with its `api`, so the signed-in key asks and
// the API scopes the answer: an admin sees every budget, a client key its client's and its
// department's). One small request, in parallel with the other panels. The share spent is a
// <meter> (no inline style: the page's Content-Security-Policy forbids it); text only through
// textContent. A module of its own: app.js has one job per panel already and is long enough.
"use strict";
window.tokenauditBudgets = (function () {
  const NUM = new Intl.NumberFormat("en-US");
  const COST = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 4 });

  // tokens as whole numbers; a cost budget is priced with the price file (its currency)
  function amount(value, unit) {
    return unit === "cost" ? COST.format(value) : NUM.format(value);
  }

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }

  function budgetRow(b) {
    const tr = document.createElement("tr");
    tr.dataset.scope = b.scope + ":" + b.scope_id;
    const share = b.limit > 0 ? (100 * b.spent) / b.limit : 100;
    cell(tr, b.scope);
    cell(tr, b.scope_id);
    cell(tr, amount(b.limit, b.unit) + (b.unit === "cost" ? " in cost" : " tokens") + " / " + b.period, "num");
    cell(tr, amount(b.spent, b.unit), "num").dataset.value = String(b.spent);
    cell(tr, amount(b.remaining, b.unit), "num").dataset.value = String(b.remaining);
    const used = cell(tr, "", "used");
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = b.limit;
    meter.low = 0.5 * b.limit; // the stream's alert levels: 50 %, 80 %, 100 %
    meter.high = 0.8 * b.limit;
    meter.optimum = 0;
    meter.value = Math.min(b.spent, b.limit);
    const pct = document.createElement("span");
    pct.textContent = " " + share.toFixed(1) + " %";
    used.append(meter, pct);
    cell(tr, b.hard ? "hard" : "soft", b.hard ? "hard" : "");
    cell(tr, String(b.resets_at).replace("T", " ").replace("Z", " UTC"));
    return tr;
  }

  // fills the panel ("no budgets" when the scope has none); `client`: an admin's filter, or empty
  async function load(api, client) {
    const body = await api("/v1/budgets", { client: client });
    document.getElementById("budget-rows").replaceChildren(...body.rows.map(budgetRow));
    document.getElementById("budgets-none").classList.toggle("hidden", body.rows.length > 0);
  }

  return { load: load };
})();
