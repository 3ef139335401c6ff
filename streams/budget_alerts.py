"""The ``budget`` anomalies: 50%, 80% and 100% of each budget, each once per period.

The spend a level is judged on is the scope's whole spend, summed over every source
partition's published spend record (:class:`tokenaudit.infra.budget_view.BudgetView`), so a
department counted by several workers is judged on all of it. Who raises a scope's alerts:
the worker that owns the scope's *alert partition* (a fixed hash of the scope onto the source
partitions), whatever partitions its events arrive on, so two workers never both raise one.

Which levels were raised in a period is worker state, kept in the alert partition (so in its
changelog, and it moves with the partition in a rebalance): a restart or a new owner does not
raise them again. The state is written only once the anomalies are delivered, so a crash
between the two raises a level again (same anomaly id: the anomalies table keeps one row),
never loses one. The anomaly id is :func:`~tokenaudit.schemas.budgets.budget_anomaly_id` of
(rule, scope, period, level).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tokenaudit.schemas import records
from tokenaudit.schemas.budgets import ALERT_LEVELS, BUDGET_RULE, Budget, budget_anomaly_id, budget_key, spent
from tokenaudit.streams.state import State
from tokenaudit.streams.state_keys import alerts_key

# A scope's spend in a period: (period start, period end, input tokens, output tokens, cost)
SpendOf = Callable[[str, str, str], tuple[int, int, int, int, float]]
# [period start, the levels raised in it]
AlertUpdate = tuple[int, str, list[Any]]  # (partition, state key, value)


def alert_partition(scope: str, scope_id: str, partitions: int) -> int:
    """The source partition whose owner raises the scope's alerts (stable: CRC-32 of its key)."""
    return zlib.crc32(budget_key(scope, scope_id)) % partitions


class BudgetAlerts:
    def __init__(self, state: State, partitions: int) -> None:
        self.state = state
        self.partitions = partitions

    def due(
        self, budgets: Mapping[tuple[str, str], Budget], owned: Iterable[int], spend_of: SpendOf, now_ms: int
    ) -> tuple[list[records.Anomaly], list[AlertUpdate]]:
        """The anomalies to raise now, and the state updates to apply once they are delivered
        (:meth:`raised`)."""
        mine = set(owned)
        anomalies: list[records.Anomaly] = []
        updates: list[AlertUpdate] = []
        for (scope, scope_id), b in sorted(budgets.items()):
            p = alert_partition(scope, scope_id, self.partitions)
            if p not in mine:
                continue
            start, _end, inp, outp, cost = spend_of(scope, scope_id, b["period"])
            amount = spent(b["unit"], inp, outp, cost)
            key = alerts_key(p, scope, scope_id)
            value = self.state.get(key)
            before: list[float] = list(value[1]) if value is not None and value[0] == start else []
            new = [level for level in ALERT_LEVELS if level not in before and amount >= level * b["limit"]]
            if not new:
                continue
            anomalies.extend(budget_anomaly(b, start, level, amount, now_ms) for level in new)
            updates.append((p, key, [start, sorted(before + new)]))
        return anomalies, updates

    def raised(self, updates: Iterable[AlertUpdate]) -> None:
        for p, key, value in updates:
            self.state.put(p, key, value)


def budget_anomaly(b: Budget, period_start: int, level: float, amount: float, now_ms: int) -> records.Anomaly:
    """window_start: the period start; client_id empty for a department budget (department set)."""
    scope, scope_id = b["scope"], b["scope_id"]
    threshold = level * b["limit"]
    unit = "tokens" if b["unit"] == "tokens" else "in cost"
    a = records.anomaly(
        BUDGET_RULE,
        scope_id if scope == "client" else "",
        scope_id if scope == "department" else "",
        "",
        period_start,
        amount,
        threshold,
        f"{scope} {scope_id} spent {amount:g} {unit} this {b['period']}: "
        f"{level:.0%} of its budget of {b['limit']:g} reached",
        now_ms,
    )
    a["anomaly_id"] = budget_anomaly_id(scope, scope_id, period_start, level)
    a["severity"] = "critical" if level >= 1.0 else "warning"
    return a
