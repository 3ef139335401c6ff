"""The rollup rows a report reads: whole current days from the daily pre-aggregate, the rest
from the windows themselves (usage_rollup FINAL).

Why: a long range (the dashboard's 30 days) is mostly whole days, and the daily table
(infra/daily_rollup.py) holds a day in ~1/30 of its windows' rows while staying exact: a day is
read from it only while no rollup row of that day was written after it was built. Each day
comes from exactly one of the two tables, so the sums are the windows' sums. A report whose
groups split a day (minute or hour buckets, buckets not aligned to UTC midnight) passes
``whole_days=False`` or a bucket test, and reads the windows only.

Both branches expose the same columns under the rollup's names (``window_start`` is the day's
start in the daily rows), plus ``last_window`` (the latest window summed in), ``hist_covered``
(the histograms that count every request of their window) and ``hist_uncovered`` (the requests
of the others), so a report's WHERE clause and aggregates apply to both unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from tokenaudit.infra.daily_rollup import current_days
from tokenaudit.infra.store import Store

_COVERED = "arraySum(mapValues(latency_hist)) = requests"
#: the columns a report may ask for -> (the expression over usage_rollup, over usage_rollup_daily)
_DERIVED = {
    "last_window": ("window_start AS last_window", "last_window"),
    "hist_covered": (
        f"if({_COVERED}, latency_hist, CAST(map(), 'Map(UInt16, UInt64)')) AS hist_covered",
        "latency_hist AS hist_covered",
    ),
    "hist_uncovered": (f"if({_COVERED}, 0, requests) AS hist_uncovered", "latency_uncovered AS hist_uncovered"),
}
#: what the token reports read (each report names only what it reads: a store migrated before a
#: column was added still answers the reports that do not need it)
TOTALS = (
    "client_id",
    "department",
    "model",
    "window_start",
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "truncated",
    "latency_ms_sum",
)
LATENCY = ("client_id", "model", "window_start", "requests", "hist_covered", "hist_uncovered")
_DAY = timedelta(days=1)


def _whole_days(since: datetime, until: datetime) -> tuple[date, date] | None:
    """The first and last UTC day lying entirely in [since, until), or None."""
    first = since.astimezone(UTC).date()
    if datetime(first.year, first.month, first.day, tzinfo=UTC) < since:
        first += _DAY
    last = (until.astimezone(UTC) - _DAY).date()
    return (first, last) if first <= last else None


def rollup_source(
    store: Store,
    where: str,
    bound: dict[str, Any],
    since: datetime,
    until: datetime,
    columns: tuple[str, ...],
    whole_days: bool | Callable[[datetime], bool] = True,
) -> str:
    """A ``FROM`` subquery of ``columns`` of the rollup rows of [since, until) that ``where``
    selects (bound values in ``bound``, to which this adds the days it reads from the daily table).
    ``whole_days``: False when the report's groups split a day; a test of a day's start when
    only some days fall in one group (a bucketed report)."""
    raw_select = "SELECT " + ", ".join(_DERIVED[c][0] if c in _DERIVED else c for c in columns)
    raw_select += " FROM {db}.usage_rollup FINAL"
    daily_select = "SELECT " + ", ".join(_DERIVED[c][1] if c in _DERIVED else c for c in columns)
    daily_select += " FROM {db}.usage_rollup_daily FINAL"
    days: dict[date, int] = {}
    span = _whole_days(since, until) if whole_days else None
    if span is not None:
        days = current_days(store, *span)
        if callable(whole_days):
            days = {d: t for d, t in days.items() if whole_days(datetime(d.year, d.month, d.day, tzinfo=UTC))}
    if not days:
        return f"({raw_select} PREWHERE {where})"
    bound["daily_tokens"] = sorted(days.items())
    # the windows outside the daily days, as time ranges: the sorting key (day first) skips the rest
    gaps = []
    for i, (lo, hi) in enumerate(_gaps(since, until, sorted(days))):
        bound[f"gap_lo_{i}"], bound[f"gap_hi_{i}"] = int(lo.timestamp() * 1000), int(hi.timestamp() * 1000)
        gaps.append(
            f"(window_start >= fromUnixTimestamp64Milli({{gap_lo_{i}:Int64}}, 'UTC') "
            f"AND window_start < fromUnixTimestamp64Milli({{gap_hi_{i}:Int64}}, 'UTC'))"
        )
    raw = f"{raw_select} PREWHERE {where} AND ({' OR '.join(gaps)}) UNION ALL " if gaps else ""
    return (
        f"({raw}{daily_select} PREWHERE {where} "
        # the token after FINAL (WHERE): it is the version column, not part of the key
        "WHERE (toDate(window_start), token) IN {daily_tokens:Array(Tuple(Date, UInt64))})"
    )


def _gaps(since: datetime, until: datetime, days: list[date]) -> list[tuple[datetime, datetime]]:
    """[since, until) less the given whole days, as ordered disjoint ranges."""
    out = []
    start = since
    for d in days:
        day = datetime(d.year, d.month, d.day, tzinfo=UTC)
        if day > start:
            out.append((start, day))
        start = day + _DAY
    if start < until:
        out.append((start, until))
    return out
