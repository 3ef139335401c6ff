"""Budget spend counted from the stream: per source partition and budget scope (every client,
every department), the tokens and cost of the current period of each period kind.

Why every scope, not only those with a budget: a budget set mid-period must see the period's
earlier spend, and counting is two dictionary updates per event, cheaper than asking which
scopes have budgets. Why per source partition: a department's events arrive on every
partition, possibly at several workers; each worker publishes its partitions' counts and a
reader sums them (:class:`tokenaudit.infra.budget_view.BudgetView`).

Exact across crashes like the rest of the worker state: the value lives in the state (so in
the changelog) and carries the last source offset applied, so a replayed event changes
nothing. The processor hands over only events it counts (copies dropped by the dedup step
never arrive here). A copy that arrives after its window closed goes out as a late delta: it
is recognised while the window's ids are held (until its close is committed), and counted a
second time after that: the spend errs on the side of a budget (more, never less).

A period rolls over on event time: the first event of a later period starts it from zero; an
event of an earlier period (late) changes nothing, since no budget reads a past period.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tokenaudit.infra.prices import PriceTable
from tokenaudit.schemas.budgets import PERIODS, BudgetSpend, period_bounds
from tokenaudit.schemas.event_ids import ID_BYTES
from tokenaudit.streams.state import State
from tokenaudit.streams.state_keys import spend_key

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

# A spend value: [last source offset applied, then one block per period kind (PERIODS order)].
S_OFFSET = 0
B_START, B_END, B_INPUT, B_OUTPUT, B_COST, B_UNPRICED, B_EVENTS = range(7)
BLOCK = 7
_DAY_MS = 86_400_000


def block(period: str) -> int:
    """Where the block of ``period`` starts in a spend value."""
    return 1 + PERIODS.index(period) * BLOCK


def empty_value() -> list[Any]:
    return [-1] + [0, 0, 0, 0, 0.0, 0, 0] * len(PERIODS)


class Pricing:
    """Per-token prices as floats, per model and UTC day (prices change at the start of a day).

    The price file's Decimals are exact; a budget's running cost is a float sum like the
    record's ``cost`` (a double): a budget needs no cent-exact total, the monthly report has one."""

    def __init__(self, table: PriceTable | None) -> None:
        self.table = table
        self._cache: dict[str, tuple[int, tuple[float, float] | None]] = {}  # model -> (day start, prices)

    def per_token(self, model: str, ts: int) -> tuple[float, float] | None:
        """(input, output) price of one token of ``model`` at ``ts`` (epoch ms); None: unpriced."""
        if self.table is None:
            return None
        day = ts - ts % _DAY_MS
        cached = self._cache.get(model)
        if cached is not None and cached[0] == day:
            return cached[1]
        entry = self.table.price_at(model, datetime.fromtimestamp(day / 1000, UTC).date())
        prices = None if entry is None else (float(entry.input_per_1k) / 1000, float(entry.output_per_1k) / 1000)
        self._cache[model] = (day, prices)
        return prices


class SpendCounter:
    """The spend values of the partitions this worker owns, in its state."""

    def __init__(self, state: State, period_seconds: int | None, prices: PriceTable | None) -> None:
        self.state = state
        self.period_seconds = period_seconds
        self.pricing = Pricing(prices)
        # the latest period of each kind seen: (start, end); most events fall in it
        self._current: list[tuple[int, int]] = [(0, 0)] * len(PERIODS)

    @classmethod
    def from_settings(cls, settings: Settings, state: State) -> SpendCounter:
        """A price file that does not parse stops the worker here, with the file's error."""
        table = PriceTable.load(settings.price_table) if settings.price_table else None
        return cls(state, settings.budget_period_seconds, table)

    def _bounds(self, ts: int) -> list[tuple[int, int]]:
        current = self._current
        out = []
        for i, period in enumerate(PERIODS):
            start, end = current[i]
            if not start <= ts < end:
                start, end = period_bounds(ts, period, self.period_seconds)
                if start > current[i][0]:
                    current[i] = (start, end)
            out.append((start, end))
        return out

    def count(self, p: int, offset: int, ev: Mapping[str, Any]) -> None:
        """One event of partition ``p`` at ``offset`` (counted once: a replay changes nothing)."""
        client, dept = ev["client_id"], ev["department"]
        inp, outp = ev["input_tokens"], ev["output_tokens"]
        ts = ev["ts"]
        bounds = self._bounds(ts)
        prices = self.pricing.per_token(ev["model"], ts)
        cost = 0.0 if prices is None else inp * prices[0] + outp * prices[1]
        data, st = self.state.data, self.state
        for scope, scope_id in (("client", client), ("department", dept)):
            if not scope_id:
                continue
            key = spend_key(p, scope, scope_id)
            v = data.get(key)
            if v is None:
                v = empty_value()
                st.put(p, key, v)
            elif offset <= v[S_OFFSET]:
                continue  # applied before (a replay)
            v[S_OFFSET] = offset
            b = 1
            for start, end in bounds:
                if start > v[b + B_START]:  # a new period: from zero
                    v[b : b + BLOCK] = [start, end, 0, 0, 0.0, 0, 0]
                if start == v[b + B_START]:  # (an earlier period's event changes nothing)
                    v[b + B_INPUT] += inp
                    v[b + B_OUTPUT] += outp
                    v[b + B_EVENTS] += 1
                    if prices is None:
                        v[b + B_UNPRICED] += inp + outp
                    else:
                        v[b + B_COST] += cost
                b += BLOCK
            st.dirty[key] = p

    def count_late(self, p: int, offset: int, ev: Mapping[str, Any], ids: bytearray | None, event_id: bytes) -> None:
        """An event of a closed window (a late delta): not counted when the window's ids, still
        held until its close is committed, show it is a copy (the check of the dedup step)."""
        if ids is not None:
            i = ids.find(event_id)
            while i > 0 and i % ID_BYTES:  # a hit across two ids is not one
                i = ids.find(event_id, i + 1)
            if i >= 0:
                return
        self.count(p, offset, ev)

    def record(self, p: int, scope: str, scope_id: str, period: str, position: int, now_ms: int) -> BudgetSpend | None:
        """The spend record of a scope on partition ``p`` for the budget's ``period`` kind;
        ``position``: the last source offset of ``p`` processed (everything up to it is in the
        counts). None when the scope has no events on ``p``."""
        v = self.state.get(spend_key(p, scope, scope_id))
        if v is None:
            return None
        b = block(period)
        return {
            "scope": scope,
            "scope_id": scope_id,
            "period_start": v[b + B_START],
            "period_end": v[b + B_END],
            "partition": p,
            "offset": max(position, v[S_OFFSET]),
            "input_tokens": v[b + B_INPUT],
            "output_tokens": v[b + B_OUTPUT],
            "cost": float(v[b + B_COST]),
            "unpriced_tokens": v[b + B_UNPRICED],
            "events": v[b + B_EVENTS],
            "updated_at": now_ms,
        }
