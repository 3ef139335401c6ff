"""The price table (TOML): what a model's tokens cost, per 1,000 tokens, from which UTC day.

Parsed here, in the platform layer, because three rooms read it: the cost report
(:mod:`tokenaudit.reports.prices`, the format is described there), the stream worker that
counts cost budgets' spend, and the inference app that reserves a cost budget's worst case.
Everything is :class:`decimal.Decimal` (TOML floats are parsed straight into Decimal).
"""

from __future__ import annotations

import hashlib
import itertools
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tokenaudit.errors import PriceTableError

_PRICE_KEYS = ("input_per_1k", "output_per_1k")
_DATE_KEYS = ("effective_from", "effective_to")


@dataclass(frozen=True)
class ModelPrice:
    input_per_1k: Decimal
    output_per_1k: Decimal
    effective_from: date | None = None  # inclusive; None: since always
    effective_to: date | None = None  # exclusive; None: until further notice

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        return (Decimal(input_tokens) * self.input_per_1k + Decimal(output_tokens) * self.output_per_1k) / 1000

    def in_force(self, day: date) -> bool:
        return (self.effective_from is None or self.effective_from <= day) and (
            self.effective_to is None or day < self.effective_to
        )


@dataclass(frozen=True)
class PriceTable:
    models: dict[str, tuple[ModelPrice, ...]]  # each model's entries, by effective_from
    currency: str = ""
    source: str = "<price table>"
    sha256: str = ""  # of the file's bytes: which prices a report used

    @classmethod
    def load(cls, path: Path | str) -> PriceTable:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise PriceTableError(
                f"price table {path} does not exist (set TOKENAUDIT_PRICE_TABLE or --prices)"
            ) from None
        except OSError as exc:
            raise PriceTableError(f"price table {path} is unreadable: {exc}") from None
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise PriceTableError(f"price table {path} is not UTF-8 text") from None
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
        for name, raw in models_raw.items():
            where = f'price table {source}: [models."{name}"]'
            entries = raw if isinstance(raw, list) else [raw]
            parsed = sorted((_entry(entry, where) for entry in entries), key=lambda e: e.effective_from or date.min)
            for a, b in itertools.pairwise(parsed):
                if a.effective_to is None or b.effective_from is None or a.effective_to > b.effective_from:
                    raise PriceTableError(
                        f"{where}: entries overlap ({_span(a)} and {_span(b)}); give each an "
                        "effective_from / effective_to so that at most one is in force on any day"
                    )
            models[name] = tuple(parsed)
        currency = data.get("currency", "")
        if not isinstance(currency, str):
            raise PriceTableError(f"price table {source}: currency must be a string")
        return cls(models, currency, source, hashlib.sha256(text.encode()).hexdigest())

    def change_days(self) -> list[date]:
        """Every day on which some entry starts or stops being in force: between two of them,
        each model has one price (or none)."""
        bounds = {e.effective_from for entries in self.models.values() for e in entries}
        bounds |= {e.effective_to for entries in self.models.values() for e in entries}
        return sorted(d for d in bounds if d is not None)

    def price_at(self, model: str, day: date) -> ModelPrice | None:
        """The entry of ``model`` in force on ``day``, or None (unpriced)."""
        for entry in self.models.get(model, ()):
            if entry.in_force(day):
                return entry
        return None


def _entry(entry: Any, where: str) -> ModelPrice:
    if not isinstance(entry, dict):
        raise PriceTableError(f"{where} must be a table with {' and '.join(_PRICE_KEYS)}")
    extra = sorted(set(entry) - set(_PRICE_KEYS) - set(_DATE_KEYS))
    if extra:
        raise PriceTableError(
            f"{where}: unknown key(s) {extra}; expected {' and '.join(_PRICE_KEYS)} "
            f"(and optionally {' and '.join(_DATE_KEYS)})"
        )
    prices = []
    for key in _PRICE_KEYS:
        if key not in entry:
            raise PriceTableError(f"{where}: missing {key}")
        prices.append(_price(entry[key], f"{where}.{key}"))
    start, end = (_day(entry.get(key), f"{where}.{key}") for key in _DATE_KEYS)
    if start is not None and end is not None and end <= start:
        raise PriceTableError(f"{where}: effective_to {end} must be after effective_from {start}")
    return ModelPrice(prices[0], prices[1], start, end)


def _day(value: Any, where: str) -> date | None:
    """A TOML date (or a date-time at 00:00 UTC): prices change at the start of a UTC day."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value.astimezone(UTC) if value.tzinfo is not None else value
        if moment.time() != datetime.min.time():
            raise PriceTableError(f"{where}: prices change at the start of a UTC day; give a date like 2026-03-15")
        return moment.date()
    if isinstance(value, date):
        return value
    raise PriceTableError(f"{where}: expected a date like 2026-03-15, got {value!r}")


def _span(entry: ModelPrice) -> str:
    return f"[{entry.effective_from or '...'}, {entry.effective_to or '...'})"


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
