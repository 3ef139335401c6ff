"""Price table (TOML) and the monthly cost report built from it.

Format (prices per 1,000 tokens, in one currency; strings or numbers)::

    currency = "USD"                 # optional, shown in the report

    [models."t5-tiny"]
    input_per_1k = 0.0004
    output_per_1k = "0.0016"

Everything is :class:`decimal.Decimal` (TOML floats are parsed straight into Decimal, never
through binary floats), so the cost of a line is exact: tokens x price / 1000. The report
rounds once, at the end: the grand total is the exact total rounded half-up to the cent,
and the cents are allocated to the client lines by the largest-remainder method, so the
lines add up to the total exactly and the total equals ``usage_rollup`` x prices to the cent.
"""

from __future__ import annotations

import tomllib
from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tokenaudit.errors import PriceTableError

CENT = Decimal("0.01")
_PRICE_KEYS = ("input_per_1k", "output_per_1k")


@dataclass(frozen=True)
class ModelPrice:
    input_per_1k: Decimal
    output_per_1k: Decimal

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        return (Decimal(input_tokens) * self.input_per_1k + Decimal(output_tokens) * self.output_per_1k) / 1000


@dataclass(frozen=True)
class PriceTable:
    models: dict[str, ModelPrice]
    currency: str = ""
    source: str = "<price table>"

    @classmethod
    def load(cls, path: Path | str) -> PriceTable:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise PriceTableError(
                f"price table {path} does not exist (set TOKENAUDIT_PRICE_TABLE or --prices)"
            ) from None
        except OSError as exc:
            raise PriceTableError(f"price table {path} is unreadable: {exc}") from None
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<price table>") -> PriceTable:
        try:
            data = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as exc:
            raise PriceTableError(f"price table {source} is not valid TOML: {exc}") from None
        unknown = sorted(set(data) - {"currency", "models"})
        if unknown:
            raise PriceTableError(
                f"price table {source}: unknown top-level key(s) {unknown}; expected currency, models"
            )
        models_raw = data.get("models")
        if not isinstance(models_raw, dict) or not models_raw:
            raise PriceTableError(f'price table {source}: no [models."<name>"] tables')
        models = {}
        for name, entry in models_raw.items():
            where = f'price table {source}: [models."{name}"]'
            if not isinstance(entry, dict):
                raise PriceTableError(f"{where} must be a table with {' and '.join(_PRICE_KEYS)}")
            extra = sorted(set(entry) - set(_PRICE_KEYS))
            if extra:
                raise PriceTableError(f"{where}: unknown key(s) {extra}; expected {' and '.join(_PRICE_KEYS)}")
            prices = []
            for key in _PRICE_KEYS:
                if key not in entry:
                    raise PriceTableError(f"{where}: missing {key}")
                prices.append(_price(entry[key], f"{where}.{key}"))
            models[name] = ModelPrice(*prices)
        currency = data.get("currency", "")
        if not isinstance(currency, str):
            raise PriceTableError(f"price table {source}: currency must be a string")
        return cls(models, currency, source)

    def price(self, model: str) -> ModelPrice:
        try:
            return self.models[model]
        except KeyError:
            raise PriceTableError(
                f"price table {self.source} has no price for model {model!r}; "
                f'add a [models."{model}"] table with input_per_1k and output_per_1k'
            ) from None


def _price(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, str, Decimal)):
        raise PriceTableError(f"{where}: expected a number like 0.0004, got {value!r}")
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise PriceTableError(f"{where}: expected a number like 0.0004, got {value!r}") from None
    if not price.is_finite() or price < 0:
        raise PriceTableError(f"{where}: expected a non-negative finite number, got {value!r}")
    return price


def _allocate_cents(exact: list[Decimal], total: Decimal) -> list[Decimal]:
    """Round each amount to cents so they sum to ``total`` (largest-remainder method)."""
    floors = [e.quantize(CENT, rounding=ROUND_DOWN) for e in exact]
    left = int((total - sum(floors, Decimal(0))) / CENT)
    by_remainder = sorted(range(len(exact)), key=lambda i: (exact[i] - floors[i], -i), reverse=True)
    for i in by_remainder[: max(left, 0)]:
        floors[i] += CENT
    return floors


def cost_report(token_rows: list[dict[str, Any]], prices: PriceTable) -> list[dict[str, Any]]:
    """Client lines grouped by department, a subtotal per department and a grand total.

    ``token_rows`` are queries.month_tokens rows (department, client_id, model, tokens).
    Every model in them must have a price: a missing one raises rather than costing 0.
    """
    missing = sorted({r["model"] for r in token_rows} - set(prices.models))
    if missing:
        raise PriceTableError(
            f'price table {prices.source} has no price for model(s) {missing}; add a [models."<name>"] table for each'
        )
    lines: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "exact": Decimal(0)}
    )
    for row in token_rows:
        line = lines[(row["department"], row["client_id"])]
        for key in ("requests", "input_tokens", "output_tokens", "total_tokens"):
            line[key] += int(row[key])
        line["exact"] += prices.price(row["model"]).cost(int(row["input_tokens"]), int(row["output_tokens"]))
    keys = sorted(lines)
    exact_total = sum((lines[k]["exact"] for k in keys), Decimal(0))
    total = exact_total.quantize(CENT, rounding=ROUND_HALF_UP)
    cents = _allocate_cents([lines[k]["exact"] for k in keys], total)
    out: list[dict[str, Any]] = []
    sums = ("requests", "input_tokens", "output_tokens", "total_tokens")

    def report_line(
        level: str, department: str, client: str, parts: list[dict[str, Any]], cost: Decimal
    ) -> dict[str, Any]:
        return {
            "level": level,
            "department": department,
            "client_id": client,
            **{s: sum(p[s] for p in parts) for s in sums},
            "cost": str(cost),
            "currency": prices.currency,
        }

    departments = sorted({k[0] for k in keys})
    for department in departments:
        members = [(k, c) for k, c in zip(keys, cents) if k[0] == department]
        for member, cost in members:
            out.append(report_line("client", department, member[1], [lines[member]], cost))
        out.append(
            report_line(
                "department", department, "*", [lines[k] for k, _ in members], sum((c for _, c in members), Decimal(0))
            )
        )
    out.append(report_line("total", "*", "*", [lines[k] for k in keys], total))
    return out


def priced_answer(token_rows: list[dict[str, Any]], price_table: Path | None) -> dict[str, Any]:
    """The ``cost`` part of the usage API's ``/v1/report`` answer: the cost report with the price
    table the API is configured with (read at each call, so an edited table applies at once),
    or why there is none (no table configured, a table that does not parse, a model without a
    price: never a cost of 0 for unpriced tokens)."""
    if price_table is None:
        return {"cost": None, "cost_error": "no price table configured (TOKENAUDIT_PRICE_TABLE)"}
    try:
        prices = PriceTable.load(price_table)
        rows = cost_report(token_rows, prices)
    except PriceTableError as exc:
        return {"cost": None, "cost_error": str(exc)}
    return {"cost": {"currency": prices.currency, "rows": rows}, "cost_error": None}
