"""The daily pre-aggregate of usage_rollup (migration 0014): which days are current, and building them.

Why: a 30-day report over 10M rollup windows spends its time reading every window (~0.3-0.5 s
per scan on two cores, FINAL or not); the day's sums per (client, department, key, model) are
~30x fewer rows. Exactness does not rest on a materialized view summing what was inserted
(replayed and late versions would be added): a day is built from ``usage_rollup FINAL``, tagged
with the day's write count read *before* the build, and used only while that count has not
moved. Every insert into usage_rollup bumps its day's count (a view on the table), so a late
delta or a replay makes the day stale, and readers fall back to the windows until the next build.

Builds run in the sink's process (the store's lock serialises them with the sink's inserts). A
day is built only once its count has stayed the same for ``quiet_seconds``: an insert counted by
the view but not yet committed (ClickHouse commits the table's last part when the insert ends)
has long ended by then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from tokenaudit.infra.store import Store

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

log = logging.getLogger(__name__)

#: the rollup sums and maxima a day keeps (the reports read these names from either table)
SUMS = ("requests", "errors", "input_tokens", "output_tokens", "total_tokens", "truncated", "latency_ms_sum")
_KEY = "client_id, department, api_key_id, model"


def settle_seconds(settings: Settings) -> float:
    """How long after a window starts its row can still change: the window itself, the grace
    the worker waits for stragglers, the idle timeout that closes quiet windows, and the
    sink's batch before the row reaches ClickHouse."""
    return (
        settings.window_seconds + settings.grace_seconds + settings.idle_timeout_seconds + settings.sink_batch_seconds
    )


def current_days(store: Store, first: date, last: date) -> dict[date, int]:
    """Days in [first, last] whose daily rows are current: day -> the token to read them by."""
    rows = store.query(
        "SELECT b.day AS day, b.token AS token FROM "
        "(SELECT day, max(token) AS token FROM {db}.usage_rollup_days "
        "WHERE day BETWEEN {first:Date} AND {last:Date} GROUP BY day) AS b "
        "INNER JOIN (SELECT day, sum(writes) AS writes FROM {db}.usage_rollup_day_writes "
        "WHERE day BETWEEN {first:Date} AND {last:Date} GROUP BY day) AS w ON b.day = w.day "
        "WHERE b.token = w.writes",
        {"first": first, "last": last},
    )
    return {r["day"]: int(r["token"]) for r in rows}


def stale_days(store: Store, before: date) -> dict[date, int]:
    """Days before ``before`` with rollup rows whose daily rows are missing or stale: day -> writes."""
    rows = store.query(
        "SELECT w.day AS day, w.writes AS writes FROM "
        "(SELECT day, sum(writes) AS writes FROM {db}.usage_rollup_day_writes WHERE day < {before:Date} "
        "GROUP BY day) AS w LEFT JOIN (SELECT day, max(token) AS token FROM {db}.usage_rollup_days "
        "WHERE day < {before:Date} GROUP BY day) AS b ON w.day = b.day "
        "WHERE b.token != w.writes ORDER BY day DESC",
        {"before": before},
    )
    return {r["day"]: int(r["writes"]) for r in rows}


def build_day(store: Store, day: date, token: int) -> None:
    """Sum one day's windows (FINAL: each window once) into usage_rollup_daily, then record it."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    bound = {"since_ms": int(start.timestamp() * 1000), "until_ms": int((start + timedelta(days=1)).timestamp() * 1000)}
    bound["token"] = token
    covered = "arraySum(mapValues(latency_hist)) = requests"
    store.command(
        f"INSERT INTO {{db}}.usage_rollup_daily ({_KEY}, window_start, {', '.join(SUMS)}, latency_ms_max, "
        "latency_hist, latency_uncovered, last_window, token) "
        f"SELECT {_KEY}, fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC'), "
        + "".join(f"sum({c}), " for c in SUMS)
        + f"max(latency_ms_max), sumMapIf(latency_hist, {covered}), sumIf(requests, NOT ({covered})), "
        "max(window_start), {token:UInt64} FROM {db}.usage_rollup FINAL "
        "PREWHERE window_start >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
        "AND window_start < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC') "
        f"GROUP BY {_KEY} SETTINGS prefer_column_name_to_alias = 1",
        bound,
    )
    store.insert("usage_rollup_days", [[day, token]], ["day", "token"])


@dataclass
class DailyBuilder:
    """Builds the settled days whose write count has been still for ``quiet_seconds``."""

    store: Store
    settle_seconds: float  # a day is built once its last window can no longer change (settle_seconds)
    quiet_seconds: float = 60.0
    max_days: int = 31  # per round, newest first: bounds how long one round holds the store
    _seen: dict[date, tuple[int, float]] = field(default_factory=dict)

    def run_once(self, now: datetime | None = None) -> list[date]:
        """One round; the days built."""
        now = now or datetime.now(UTC)
        settled = (now - timedelta(seconds=self.settle_seconds)).date()
        clock = time.monotonic()
        built: list[date] = []
        stale = stale_days(self.store, settled)
        self._seen = {d: s for d, s in self._seen.items() if d in stale}
        for day, writes in stale.items():
            seen = self._seen.get(day)
            if seen is None or seen[0] != writes:
                self._seen[day] = seen = (writes, clock)
            if clock - seen[1] < self.quiet_seconds or len(built) >= self.max_days:
                continue
            build_day(self.store, day, writes)
            built.append(day)
            del self._seen[day]
        if built:
            log.info("daily rollups built for %d day(s), newest %s", len(built), built[0])
        return built
