"""Which spend records to publish on the ``spend`` topic at a tick: one per budget scope and
owned source partition, only when it changed since it was last published.

Only scopes that have a budget are published (every scope is counted: :mod:`.spend`), in the
period kind of their budget. A record's ``offset`` is the partition's processed position, so it
moves even when the scope's own counts do not: the inference app releases its locally counted
requests on it. Such a move alone republishes a record only while its period is current.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from tokenaudit.schemas.budgets import Budget, BudgetSpend, spend_key
from tokenaudit.streams.spend import SpendCounter

_Signature = tuple[int, int, int, float, int, int]


class SpendPublisher:
    def __init__(self, counter: SpendCounter) -> None:
        self.counter = counter
        self._published: dict[bytes, tuple[_Signature, int]] = {}  # key -> (counts, offset)

    def due(
        self,
        budgets: Mapping[tuple[str, str], Budget],
        partitions: Iterable[int],
        position: Callable[[int], int],
        now_ms: int,
    ) -> list[tuple[bytes, BudgetSpend]]:
        """The records to send now (keyed by :func:`spend_key`); call :meth:`sent` once they are."""
        owned = sorted(partitions)
        out = []
        for (scope, scope_id), budget in budgets.items():
            for p in owned:
                record = self.counter.record(p, scope, scope_id, budget["period"], position(p), now_ms)
                if record is None:
                    continue
                key = spend_key(scope, scope_id, p)
                last = self._published.get(key)
                counts = _signature(record)
                if last is not None and last[0] == counts:
                    current = record["period_start"] <= now_ms < record["period_end"]
                    if last[1] == record["offset"] or not current:
                        continue
                out.append((key, record))
        return out

    def sent(self, records: Iterable[tuple[bytes, BudgetSpend]]) -> None:
        for key, record in records:
            self._published[key] = (_signature(record), record["offset"])

    def forget(self) -> None:
        """After a rebalance: publish everything owned again (a new owner starts from scratch)."""
        self._published.clear()


def _signature(r: BudgetSpend) -> _Signature:
    return (r["period_start"], r["input_tokens"], r["output_tokens"], r["cost"], r["unpriced_tokens"], r["events"])
