"""The budgets contract: the records of the ``budgets`` and ``spend`` topics, their keys, the
period arithmetic and the budget anomaly's identity.

One declaration, used by the CLI that sets budgets, the stream worker that counts spend and
raises the 50/80/100% alerts, the inference app that enforces hard budgets, and the usage API
that shows them: each of them must agree on what "this period" is and on how a scope is keyed,
or a budget would be spent in one process and unspent in another.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from typing import Literal, TypedDict, get_args

from tokenaudit.errors import BudgetError

Scope = Literal["client", "department"]
Unit = Literal["tokens", "cost"]
Period = Literal["day", "month"]

SCOPES: tuple[Scope, ...] = get_args(Scope)
UNITS: tuple[Unit, ...] = get_args(Unit)
PERIODS: tuple[Period, ...] = get_args(Period)
ALERT_LEVELS: tuple[float, ...] = (0.5, 0.8, 1.0)  # the budget anomalies, each once per period
BUDGET_RULE = "budget"  # the anomaly rule name of a budget alert
MAX_LIMIT = 1e15  # a limit beyond any real spend is a typo, not a budget

_SEP = "\x1f"


class Budget(TypedDict):
    """budget v1: the value on the budgets topic (key: :func:`budget_key`)."""

    scope: str
    scope_id: str
    unit: str
    limit: float
    period: str
    hard: bool
    updated_at: int


class BudgetSpend(TypedDict):
    """budget_spend v1: one scope's spend in one period from one usage-topic partition (key:
    :func:`spend_key`). A scope's spend is the sum over partitions of the current period."""

    scope: str
    scope_id: str
    period_start: int
    period_end: int
    partition: int
    offset: int
    input_tokens: int
    output_tokens: int
    cost: float
    unpriced_tokens: int
    events: int
    updated_at: int


def budget_key(scope: str, scope_id: str) -> bytes:
    """One key per scope: compaction keeps each scope's latest budget; a tombstone removes it."""
    return f"{scope}{_SEP}{scope_id}".encode()


def parse_budget_key(key: bytes) -> tuple[str, str]:
    scope, _, scope_id = key.decode().partition(_SEP)
    return scope, scope_id


def spend_key(scope: str, scope_id: str, partition: int) -> bytes:
    """One key per scope and usage-topic partition, so workers that own different partitions
    never overwrite each other's counts."""
    return f"{scope}{_SEP}{scope_id}{_SEP}{partition}".encode()


def budget(scope: str, scope_id: str, unit: str, limit: float, period: str, hard: bool, updated_at: int) -> Budget:
    """A valid budget record, or :class:`BudgetError` saying what is wrong (nothing is stored)."""
    if scope not in SCOPES:
        raise BudgetError(f"unknown budget scope {scope!r}: one of {', '.join(SCOPES)}")
    if not scope_id or scope_id != scope_id.strip():
        raise BudgetError(f"a {scope} budget needs a non-empty {scope} name without surrounding spaces")
    if unit not in UNITS:
        raise BudgetError(f"unknown budget unit {unit!r}: one of {', '.join(UNITS)}")
    if period not in PERIODS:
        raise BudgetError(f"unknown budget period {period!r}: one of {', '.join(PERIODS)}")
    if not (isinstance(limit, int | float) and math.isfinite(limit) and 0 < limit <= MAX_LIMIT):
        raise BudgetError(f"a budget limit must be a number > 0 and <= {MAX_LIMIT:g}, not {limit!r}")
    if unit == "tokens" and limit != int(limit):
        raise BudgetError(f"a token budget is a whole number of tokens, not {limit!r}")
    return {
        "scope": scope,
        "scope_id": scope_id,
        "unit": unit,
        "limit": float(limit),
        "period": period,
        "hard": bool(hard),
        "updated_at": updated_at,
    }


def period_bounds(ts_ms: int, period: str, period_seconds: int | None = None) -> tuple[int, int]:
    """[start, end) in epoch ms of the period holding ``ts_ms``: the UTC day or month, or, when
    ``period_seconds`` is set (TOKENAUDIT_BUDGET_PERIOD_SECONDS, for tests and demos), the
    epoch-aligned slice of that many seconds."""
    if period_seconds:
        size = period_seconds * 1000
        start = ts_ms - ts_ms % size
        return start, start + size
    t = datetime.fromtimestamp(ts_ms / 1000, UTC)
    if period == "day":
        begin = t.replace(hour=0, minute=0, second=0, microsecond=0)
        start = int(begin.timestamp() * 1000)
        return start, start + 86_400_000
    if period == "month":
        begin = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (
            begin.replace(year=begin.year + 1, month=1) if begin.month == 12 else begin.replace(month=begin.month + 1)
        )
        return int(begin.timestamp() * 1000), int(following.timestamp() * 1000)
    raise BudgetError(f"unknown budget period {period!r}: one of {', '.join(PERIODS)}")


def spent(unit: str, input_tokens: int, output_tokens: int, cost: float) -> float:
    """A spend in the budget's unit."""
    return float(input_tokens + output_tokens) if unit == "tokens" else cost


def budget_anomaly_id(scope: str, scope_id: str, period_start: int, level: float) -> str:
    """Deterministic (rule, scope, period, level): each alert has one id whoever raises it and
    however often, so a replay or a second worker cannot make it twice."""
    text = _SEP.join((BUDGET_RULE, scope, scope_id, str(period_start), f"{level:g}"))
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:24]
