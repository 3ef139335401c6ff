"""Price table (TOML) and the monthly cost report built from it.

Format (prices per 1,000 tokens, in one currency; strings or numbers)::

    currency = "USD"                 # optional, shown in the report

    [models."t5-tiny"]               # one price for all time
    input_per_1k = 0.0004
    output_per_1k = "0.0016"

    [[models."gpt2-tiny"]]           # or dated entries: [effective_from, effective_to), UTC days
    input_per_1k = 0.0003
    output_per_1k = 0.0012
    effective_to = 2026-03-15
    [[models."gpt2-tiny"]]
    input_per_1k = 0.0004
    output_per_1k = 0.0016
    effective_from = 2026-03-15

Everything is :class:`decimal.Decimal` (TOML floats are parsed straight into Decimal, never
through binary floats), so the cost of a line is exact: tokens x price / 1000. The report
rounds once, at the end: the grand total is the exact total rounded half-up to the cent,
and the cents are allocated to the client lines by the largest-remainder method, so the
lines add up to the total exactly and the total equals ``usage_rollup`` x prices to the cent.

Prices change at the start of a UTC day (a time of day is refused): the report's input is
tokens per (department, client, model, day), and every window of a day has the same entry in
force, so pricing per day is pricing per window, at 1/1440 of the rows of one-minute windows.
Tokens with no entry in force are listed as ``unpriced`` lines with their counts, never costed
0 and never failing the report; the total says it excludes them and names the price file's
SHA-256, so a monthly report can be reproduced from the same file.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from tokenaudit.errors import PriceTableError
from tokenaudit.infra.prices import ModelPrice, PriceTable

__all__ = ["ModelPrice", "PriceTable", "PriceTableError", "cost_report", "priced_answer"]

CENT = Decimal("0.01")
_SUMS = ("requests", "input_tokens", "output_tokens", "total_tokens")


def _allocate_cents(exact: list[Decimal], total: Decimal) -> list[Decimal]:
    """Round each amount to cents so they sum to ``total`` (largest-remainder method)."""
    floors = [e.quantize(CENT, rounding=ROUND_DOWN) for e in exact]
    left = int((total - sum(floors, Decimal(0))) / CENT)
    by_remainder = sorted(range(len(exact)), key=lambda i: (exact[i] - floors[i], -i), reverse=True)
    for i in by_remainder[: max(left, 0)]:
        floors[i] += CENT
    return floors


def _as_day(value: Any) -> date | None:
    if value is None or isinstance(value, datetime):
        return value.date() if isinstance(value, datetime) else None
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def cost_report(token_rows: list[dict[str, Any]], prices: PriceTable) -> list[dict[str, Any]]:
    """Client lines grouped by department, a subtotal per department, ``unpriced`` lines (one per
    department, client and model with tokens no entry prices) and a grand total.

    ``token_rows`` are queries.month_tokens rows (department, client_id, model, day, tokens); a
    row without a day can be priced only by an undated entry. Tokens without a price are never
    costed 0: they are listed, and the total's ``note`` says how many it excludes."""
    lines: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "exact": Decimal(0)}
    )
    unpriced: dict[tuple[str, str, str], dict[str, Any]] = defaultdict(lambda: dict.fromkeys(_SUMS, 0))
    for row in token_rows:
        day = _as_day(row.get("day"))
        entries = prices.models.get(row["model"], ())
        if day is None:
            undated = len(entries) == 1 and entries[0].effective_from is None and entries[0].effective_to is None
            price = entries[0] if undated else None
        else:
            price = prices.price_at(row["model"], day)
        if price is None:
            gap = unpriced[(row["department"], row["client_id"], row["model"])]
            for field in _SUMS:
                gap[field] += int(row[field])
            continue
        line = lines[(row["department"], row["client_id"])]
        for field in _SUMS:
            line[field] += int(row[field])
        line["exact"] += price.cost(int(row["input_tokens"]), int(row["output_tokens"]))
    keys = sorted(lines)
    exact_total = sum((lines[k]["exact"] for k in keys), Decimal(0))
    total = exact_total.quantize(CENT, rounding=ROUND_HALF_UP)
    cents = _allocate_cents([lines[k]["exact"] for k in keys], total)
    out: list[dict[str, Any]] = []

    def report_line(
        level: str, department: str, client: str, model: str, parts: list[dict[str, Any]], cost: str, note: str = ""
    ) -> dict[str, Any]:
        return {
            "level": level,
            "department": department,
            "client_id": client,
            "model": model,
            **{s: sum(p[s] for p in parts) for s in _SUMS},
            "cost": cost,
            "currency": prices.currency,
            "note": note,
        }

    departments = sorted({k[0] for k in keys})
    for department in departments:
        members = [(k, c) for k, c in zip(keys, cents, strict=True) if k[0] == department]
        for key, cost in members:
            out.append(report_line("client", department, key[1], "*", [lines[key]], str(cost)))
        subtotal = sum((c for _, c in members), Decimal(0))
        out.append(report_line("department", department, "*", "*", [lines[k] for k, _ in members], str(subtotal)))
    for missing in sorted(unpriced):
        out.append(
            report_line(
                "unpriced",
                missing[0],
                missing[1],
                missing[2],
                [unpriced[missing]],
                "",
                "no price in force; not in the total",
            )
        )
    note = f"prices sha256 {prices.sha256}" if prices.sha256 else ""
    if unpriced:
        gap_tokens = sum(g["total_tokens"] for g in unpriced.values())
        models = sorted({k[2] for k in unpriced})
        note += f"{'; ' if note else ''}excludes {gap_tokens} unpriced tokens ({', '.join(models)})"
    out.append(report_line("total", "*", "*", "*", [lines[k] for k in keys], str(total), note))
    return out


def priced_answer(token_rows: list[dict[str, Any]], price_table: Path | None) -> dict[str, Any]:
    """The ``cost`` part of the usage API's ``/v1/report`` answer: the cost report with the price
    table the API is configured with (read at each call, so an edited table applies at once),
    or why there is none (no table configured, a table that does not parse). Tokens of a model
    without a price in force are ``unpriced`` lines of the report, never a cost of 0."""
    if price_table is None:
        return {"cost": None, "cost_error": "no price table configured (TOKENAUDIT_PRICE_TABLE)"}
    try:
        prices = PriceTable.load(price_table)
        rows = cost_report(token_rows, prices)
    except PriceTableError as exc:
        return {"cost": None, "cost_error": str(exc)}
    return {"cost": {"currency": prices.currency, "rows": rows}, "cost_error": None}
