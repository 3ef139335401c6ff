"""The budgets contract (schemas/budgets.py): records round-trip through Avro, bad budgets are
refused with the reason, periods are the UTC day or month (or the test period), and alert ids
are stable per (scope, period, level)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tokenaudit.errors import BudgetError
from tokenaudit.schemas import BUDGET, SPEND, decode, encode
from tokenaudit.schemas.budgets import (
    budget,
    budget_anomaly_id,
    budget_key,
    parse_budget_key,
    period_bounds,
    spend_key,
)


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


def test_budget_and_spend_round_trip_through_avro():
    b = budget("department", "research", "cost", 12.5, "month", True, ms(2026, 12, 1))
    assert decode(encode(BUDGET, b), BUDGET) == b
    spend = {
        "scope": "client",
        "scope_id": "acme",
        "period_start": ms(2026, 12, 1),
        "period_end": ms(2026, 12, 2),
        "partition": 3,
        "offset": 41,
        "input_tokens": 100,
        "output_tokens": 20,
        "cost": 0.5,
        "unpriced_tokens": 0,
        "events": 2,
        "updated_at": ms(2026, 12, 1, 10),
    }
    assert decode(encode(SPEND, spend), SPEND) == spend


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("team", "x", "tokens", 10, "day"), "unknown budget scope"),
        (("client", "", "tokens", 10, "day"), "non-empty"),
        (("client", "acme", "dollars", 10, "day"), "unknown budget unit"),
        (("client", "acme", "tokens", 10, "week"), "unknown budget period"),
        (("client", "acme", "tokens", 0, "day"), "> 0"),
        (("client", "acme", "tokens", -5, "day"), "> 0"),
        (("client", "acme", "cost", float("nan"), "day"), "> 0"),
        (("client", "acme", "tokens", 1.5, "day"), "whole number"),
    ],
)
def test_bad_budgets_are_refused_with_the_reason(args, reason):
    with pytest.raises(BudgetError, match=reason):
        budget(*args, hard=False, updated_at=0)


def test_periods_are_utc_days_and_months_or_the_test_period():
    t = ms(2026, 12, 31, 23, 59)
    assert period_bounds(t, "day") == (ms(2026, 12, 31), ms(2027, 1, 1))
    assert period_bounds(t, "month") == (ms(2026, 12, 1), ms(2027, 1, 1))
    assert period_bounds(ms(2027, 2, 14), "month") == (ms(2027, 2, 1), ms(2027, 3, 1))
    start, end = period_bounds(t + 7_000, "month", period_seconds=30)
    assert end - start == 30_000 and start <= t + 7_000 < end and start % 30_000 == 0


def test_keys_and_alert_ids():
    assert parse_budget_key(budget_key("client", "a\u00e9")) == ("client", "a\u00e9")
    assert spend_key("client", "a", 0) != spend_key("client", "a", 1)
    ids = {budget_anomaly_id("client", "a", 0, level) for level in (0.5, 0.8, 1.0)}
    assert len(ids) == 3
    assert budget_anomaly_id("client", "a", 0, 0.5) == budget_anomaly_id("client", "a", 0, 0.5)
    assert budget_anomaly_id("client", "a", 0, 0.5) != budget_anomaly_id("department", "a", 0, 0.5)
    assert budget_anomaly_id("client", "a", 0, 0.5) != budget_anomaly_id("client", "a", 1, 0.5)
