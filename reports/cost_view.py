"""``/v1/report?detail=department``: the priced month at department level (the dashboard's cost panel).

Why: the full answer lists every client line and the token rows per (department, client, model,
day): at 2,000 clients and 5 models that is 300k rows and 50 MB by the month's end, ~3.5 s to
build and send (bench/bench_dashboard.py). The panel shows department subtotals and the total.
Those are computed exactly as the full report computes them (client lines priced, cents
allocated, summed per department), from tokens summed per span of days in which no price
changes rather than per day: the cost is linear in the tokens, so each client line's exact cost
is the same, and the rows are ~1/30 as many.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from tokenaudit.errors import PriceTableError
from tokenaudit.infra.store import Store
from tokenaudit.reports.params import ReportParams
from tokenaudit.reports.prices import PriceTable, cost_report, priced_answer
from tokenaudit.reports.queries import month_tokens


def department_answer(
    store: Store, params: ReportParams, client: str | None, price_table: Path | None
) -> dict[str, Any]:
    """The answer's ``rows`` (empty: no token rows at this detail), ``cost`` and ``cost_error``."""
    if params.month_start is None or params.month_end is None:
        raise ValueError("the cost report needs its month: parse the parameters for it")
    if price_table is None:
        return {"rows": [], **priced_answer([], None)}
    try:
        prices = PriceTable.load(price_table)
    except PriceTableError as exc:
        return {"rows": [], "cost": None, "cost_error": str(exc)}
    first, end = params.month_start.date(), (params.month_end - timedelta(days=1)).date()
    periods = [first, *(d for d in prices.change_days() if first < d <= end)]
    lines = cost_report(month_tokens(store, params, client, periods), prices)
    cost = {"currency": prices.currency, "rows": [line for line in lines if line["level"] != "client"]}
    return {"rows": [], "cost": cost, "cost_error": None}
