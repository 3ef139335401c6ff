"""Budget spend counted from the stream: per source partition, client and department (every
one, not only those with a budget), the tokens and cost of the current day and month.

Why every scope: a budget set mid-period must see the period's earlier spend. Why one value per
(client, department) pair: an event touches one value, and a client's or a department's spend
is the sum of its pairs (a client that changes department has two). Why per source partition:
a department's events arrive on every partition, possibly at several workers; each worker
publishes its partitions' sums and a reader sums them
(:class:`tokenaudit.infra.budget_view.BudgetView`). Per event only the day's sums change; the
month is the days before today (folded in when the day rolls over) plus today, so the hot path
does the work of one period (measured: bench/bench_stream_processor.py).

Exact across crashes like the rest of the worker state: the value lives in the state (so in
the changelog) and carries the last source offset applied, so a replayed event changes
nothing. The processor hands over only events it counts (copies dropped by the dedup step
never arrive here). A copy that arrives after its window closed goes out as a late delta: it
is recognised while the window's ids are held (until its close is committed), and counted a
second time after that: the spend errs on the side of a budget (more, never less).

Periods roll over on event time: the first event of a later day starts the day from zero (and
the month too, when it is a later month); an event of an earlier day of the same month counts
in the month only, one of an earlier month changes nothing (no budget reads a past period).
With ``TOKENAUDIT_BUDGET_PERIOD_SECONDS`` the day and the month are the same period.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tokenaudit.infra.prices import PriceTable
from tokenaudit.schemas.budgets import BudgetSpend, period_bounds
from tokenaudit.schemas.event_ids import ID_BYTES
from tokenaudit.streams.state import State
from tokenaudit.streams.state_keys import SEP, SPEND_PREFIX

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

# A spend value: the last source offset applied, the day's and the month's bounds (epoch ms),
# the day's sums, and the sums of the month's earlier days.
S_OFFSET, S_DAY_START, S_DAY_END, S_MONTH_START, S_MONTH_END = range(5)
S_DAY = 5  # input, output, cost, unpriced tokens, events
S_MONTH_BEFORE = 10  # the same sums, over the month's days before the current one
_INPUT, _OUTPUT, _COST, _UNPRICED, _EVENTS = range(5)
_DAY_MS = 86_400_000


def empty_value() -> list[Any]:
    return [-1, 0, 0, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0.0, 0, 0]


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
        self._day = (0, 0)  # the latest day and month seen (most events fall in them)
        self._month = (0, 0)
        # p -> (scope, scope id) -> its spend keys on p: built from the state at first use
        # (restored keys included), then kept by count()
        self._index: dict[int, dict[tuple[str, str], set[str]]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, state: State) -> SpendCounter:
        """A price file that does not parse stops the worker here, with the file's error."""
        table = PriceTable.load(settings.price_table) if settings.price_table else None
        return cls(state, settings.budget_period_seconds, table)

    # --- counting (per event) -------------------------------------------------------------------
    def count(self, p: int, offset: int, ev: Mapping[str, Any]) -> None:
        """One event of partition ``p`` at ``offset`` (counted once: a replay changes nothing)."""
        st = self.state
        key = f"b{SEP}{p}{SEP}{ev['client_id']}{SEP}{ev['department']}"
        v = st.data.get(key)
        if v is None:
            v = empty_value()
            st.put(p, key, v)
            index = self._index.get(p)
            if index is not None:
                _add(index, key)
        elif offset <= v[S_OFFSET]:
            return  # applied before (a replay)
        v[S_OFFSET] = offset
        st.dirty[key] = p
        ts = ev["ts"]
        at = S_DAY if v[S_DAY_START] <= ts < v[S_DAY_END] else self._roll(v, ts)
        if at < 0:
            return
        inp, outp = ev["input_tokens"], ev["output_tokens"]
        v[at + _INPUT] += inp
        v[at + _OUTPUT] += outp
        v[at + _EVENTS] += 1
        prices = self.pricing.per_token(ev["model"], ts) if self.pricing.table is not None else None
        if prices is None:
            v[at + _UNPRICED] += inp + outp
        else:
            v[at + _COST] += inp * prices[0] + outp * prices[1]

    def _roll(self, v: list[Any], ts: int) -> int:
        """Where an event outside the value's day goes: a later day starts (the finished day
        folded into the month, or the month started over); an earlier day of the same month
        counts in the month's earlier days; anything older nowhere (-1)."""
        day, month = self._bounds(ts)
        if day[0] < v[S_DAY_START]:
            return S_MONTH_BEFORE if month[0] == v[S_MONTH_START] else -1
        if month[0] == v[S_MONTH_START]:
            for i in range(5):
                v[S_MONTH_BEFORE + i] += v[S_DAY + i]
        else:
            v[S_MONTH_START], v[S_MONTH_END] = month
            v[S_MONTH_BEFORE : S_MONTH_BEFORE + 5] = [0, 0, 0.0, 0, 0]
        v[S_DAY_START], v[S_DAY_END] = day
        v[S_DAY : S_DAY + 5] = [0, 0, 0.0, 0, 0]
        return S_DAY

    def _bounds(self, ts: int) -> tuple[tuple[int, int], tuple[int, int]]:
        day, month = self._day, self._month
        if not day[0] <= ts < day[1]:
            day = period_bounds(ts, "day", self.period_seconds)
            month = day if self.period_seconds else period_bounds(ts, "month")
            if day[0] > self._day[0]:
                self._day, self._month = day, month
        return day, month

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

    # --- reading (per publish) ------------------------------------------------------------------
    def keys_of(self, p: int, scope: str, scope_id: str) -> set[str]:
        """The state keys of a scope's values on ``p``."""
        index = self._index.get(p)
        if index is None:  # first use since the partition came (its state restored): one scan
            index = self._index[p] = {}
            for key in self.state.keys_of(p):
                if key.startswith(SPEND_PREFIX):
                    _add(index, key)
        return index.get((scope, scope_id), set())

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: their indexes are built again from the state at their next use."""
        for p in partitions:
            self._index.pop(p, None)

    def record(self, p: int, scope: str, scope_id: str, period: str, position: int, now_ms: int) -> BudgetSpend | None:
        """The spend record of a scope on partition ``p`` for a budget of ``period`` (day or
        month): the sum of its (client, department) values in the latest such period among
        them. ``position``: the last source offset of ``p`` processed (everything up to it is in
        the counts). None when the scope has no events on ``p``."""
        data = self.state.data
        values = [data[k] for k in self.keys_of(p, scope, scope_id) if k in data]
        if not values:
            return None
        month = period == "month" and not self.period_seconds
        start_at, end_at = (S_MONTH_START, S_MONTH_END) if month else (S_DAY_START, S_DAY_END)
        start = max(v[start_at] for v in values)
        sums: list[Any] = [0, 0, 0.0, 0, 0]  # input, output, cost, unpriced, events
        end, offset = 0, -1
        for v in values:
            offset = max(offset, v[S_OFFSET])
            if v[start_at] != start:
                continue
            end = v[end_at]
            for i in range(5):
                sums[i] += v[S_DAY + i] + (v[S_MONTH_BEFORE + i] if month else 0)
        return {
            "scope": scope,
            "scope_id": scope_id,
            "period_start": start,
            "period_end": end,
            "partition": p,
            "offset": max(position, offset),
            "input_tokens": sums[_INPUT],
            "output_tokens": sums[_OUTPUT],
            "cost": float(sums[_COST]),
            "unpriced_tokens": sums[_UNPRICED],
            "events": sums[_EVENTS],
            "updated_at": now_ms,
        }


def _add(index: dict[tuple[str, str], set[str]], key: str) -> None:
    _, _, client, department = key.split(SEP)
    index.setdefault(("client", client), set()).add(key)
    if department:
        index.setdefault(("department", department), set()).add(key)
