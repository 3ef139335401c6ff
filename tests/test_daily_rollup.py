"""The daily pre-aggregate (infra/daily_rollup.py, reports/rollup_source.py) over a real chDB store:
every rollup report answers the same from whole days of the daily table as from the windows,
with replayed and superseded versions stored, and after a late version lands in a built day
(the day is stale and read from the windows until it is built again); a write during a build
leaves the day stale. Plus the range arithmetic, without a store."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from tests.support.usage_seed import ROLLUP_COLUMNS
from tokenaudit.infra import daily_rollup
from tokenaudit.infra.daily_rollup import DailyBuilder, build_day, current_days, stale_days
from tokenaudit.infra.store import Store
from tokenaudit.reports import queries, rollup_source
from tokenaudit.reports.params import parse_report_params
from tokenaudit.reports.rollup_source import _gaps, _whole_days

COLUMNS = ROLLUP_COLUMNS + ["api_key_id", "latency_hist"]
NOW = datetime.now(UTC).replace(hour=12, minute=30, second=0, microsecond=0)
TODAY = datetime(NOW.year, NOW.month, NOW.day, tzinfo=UTC)
FIRST = TODAY - timedelta(days=4)  # four whole days before today, and half of today
CLIENTS = {"acme-web": "sales", "beta-app": "support", "gamma-bot": "research"}


def _rows(version: int, seed: int) -> list[list[Any]]:
    """One row per (client, model, 2-hour window) from FIRST to NOW; a third of them without a
    full latency histogram (the reports' "not covered"; cells: schemas/latency_hist.py)."""
    rng = random.Random(seed)
    rows = []
    ws = FIRST
    while ws < NOW:
        for client, dept in CLIENTS.items():
            for model in ("t5-tiny", "gpt2-tiny"):
                req = rng.randint(1, 30)
                inp, out = rng.randint(10, 900) * req, rng.randint(5, 300) * req
                cells = (rng.randint(0, 3) * 100 + rng.randint(5, 30), rng.randint(0, 3) * 100 + rng.randint(31, 64))
                hist = {} if rng.random() < 0.33 else {cells[0]: req - 1, cells[1]: 1}  # input bucket x latency
                rows.append(
                    [client, dept, model, ws, ws + timedelta(minutes=1), req, req % 3, inp, out, inp + out]
                    + [12.5 * req, rng.uniform(5, 900), 900, req % 2, version, f"key-{client}", hist]
                )
        ws += timedelta(hours=2)
    return rows


@pytest.fixture
def store(ch_client, ch_database):
    s = Store(ch_client, ch_database)
    s.migrate()
    final = _rows(version=5, seed=1)
    s.insert("usage_rollup", _rows(version=2, seed=2), COLUMNS)  # superseded versions
    s.insert("usage_rollup", final, COLUMNS)
    s.insert("usage_rollup", final[::3], COLUMNS)  # a replay
    s.final = final
    return s


def _reports(store: Store) -> dict[str, Any]:
    """Every rollup report the dashboard and the CLI run, over ranges of whole and partial days."""
    rng = {"since": (FIRST + timedelta(hours=5)).isoformat(), "until": NOW.isoformat()}
    days = {"since": FIRST.isoformat(), "until": NOW.isoformat()}
    out: dict[str, Any] = {}
    for name, raw in (("partial", rng), ("days", days)):
        for by in ("client", "department", "model", "day", "hour"):
            out[f"usage_{by}_{name}"] = queries.usage(store, parse_report_params("usage", {**raw, "by": by}))
        out[f"top_{name}"] = queries.top(store, parse_report_params("top", {**raw, "limit": "10"}))
        scoped = parse_report_params("top", {**raw, "limit": "10", "model": "t5-tiny"})
        out[f"top_scoped_{name}"] = queries.top(store, scoped, "beta-app")
        for bucket in ("client", "input", "day", "hour"):
            params = parse_report_params("latency", {**raw, "bucket": bucket})
            out[f"latency_{bucket}_{name}"] = queries.latency(store, params)
    out["month"] = queries.month_tokens(store, parse_report_params("report", {"month": FIRST.strftime("%Y-%m")}))
    start, end = int(FIRST.timestamp()), int(NOW.timestamp())
    for group in ((), ("client_id",), ("model", "department")):
        out[f"buckets_{group}"] = queries.usage_buckets(store, start, 86400, start, end, group, {})
        out[f"buckets_hours_{group}"] = queries.usage_buckets(store, start, 3600, start, end, group, {})
        out[f"buckets_offset_{group}"] = queries.usage_buckets(store, start + 600, 86400, start + 600, end, group, {})
    filters = {"model": ("gpt2-tiny",), "client_id": ("acme-web", "gamma-bot")}
    out["buckets_filtered"] = queries.usage_buckets(store, start, 86400, start, end, ("client_id",), filters)
    return out


def _windows_only(store: Store, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The reports as they read before the daily table: every window, FINAL."""
    with monkeypatch.context() as m:
        m.setattr(rollup_source, "current_days", lambda *a: {})
        return _reports(store)


def _expected_by_day(rows: list[list[Any]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in rows:
        out[r[3].date().isoformat()] += r[9]
    return dict(out)


def test_daily_rows_answer_every_report_as_the_windows_do(store, monkeypatch):
    expected = _windows_only(store, monkeypatch)
    by_day = {r["day"]: r["total_tokens"] for r in expected["usage_day_days"]}
    assert by_day == _expected_by_day(store.final)  # the windows' answer is the seeded truth
    assert current_days(store, FIRST.date(), TODAY.date()) == {}
    assert _reports(store) == expected  # nothing built: the windows

    built = DailyBuilder(store, settle_seconds=0, quiet_seconds=0).run_once(NOW)
    assert sorted(built) == [(FIRST + timedelta(days=i)).date() for i in range(4)]  # today is not settled
    assert sorted(current_days(store, FIRST.date(), TODAY.date())) == sorted(built)
    assert _reports(store) == expected


def test_a_late_version_makes_its_day_stale_until_rebuilt(store, monkeypatch):
    builder = DailyBuilder(store, settle_seconds=0, quiet_seconds=0)
    builder.run_once(NOW)
    late_day = (FIRST + timedelta(days=1)).date()
    late = [list(r) for r in store.final if r[3].date() == late_day][:4]
    for r in late:  # what the sink writes for a late delta: the row again, more, a higher version
        r[5] += 1
        r[7] += 1000
        r[9] += 1000
        r[14] += 1
        r[16] = {**r[16], 3: r[16].get(3, 0) + 1} if r[16] else {}  # covered rows stay covered
    store.insert("usage_rollup", late, COLUMNS)
    store.insert("usage_rollup", late[:2], COLUMNS)  # and a replay of it
    assert late_day not in current_days(store, FIRST.date(), TODAY.date())
    expected = _windows_only(store, monkeypatch)
    by_day = {r["day"]: r["total_tokens"] for r in expected["usage_day_days"]}
    assert by_day[late_day.isoformat()] == _expected_by_day(store.final)[late_day.isoformat()] + 4000
    assert _reports(store) == expected  # the stale day from the windows, the others from the daily rows

    assert builder.run_once(NOW) == [late_day]  # only the stale day is built again
    assert late_day in current_days(store, FIRST.date(), TODAY.date())
    assert _reports(store) == expected


def test_a_write_during_a_build_leaves_the_day_stale(store):
    day = FIRST.date()
    token = stale_days(store, TODAY.date())[day]  # the count the build reads first
    row = list(store.final[0])
    row[14] += 1
    store.insert("usage_rollup", [row], COLUMNS)  # lands before the build reads the windows
    build_day(store, day, token)
    assert day not in current_days(store, day, day)
    assert day in stale_days(store, TODAY.date())


def test_a_day_is_built_once_its_count_stayed_still(monkeypatch):
    day = date(2026, 1, 1)
    counts, calls = {day: 5}, []
    monkeypatch.setattr(daily_rollup, "stale_days", lambda store, before: dict(counts))
    monkeypatch.setattr(daily_rollup, "build_day", lambda store, d, token: calls.append((d, token)))
    builder = DailyBuilder(store=None, settle_seconds=0, quiet_seconds=3600)  # type: ignore[arg-type]
    assert builder.run_once() == []  # first seen now: not still for an hour yet
    builder._seen[day] = (5, builder._seen[day][1] - 3601)
    counts[day] = 6  # it moved: its clock starts again
    assert builder.run_once() == []
    builder._seen[day] = (6, builder._seen[day][1] - 3601)
    assert builder.run_once() == [day]
    assert calls == [(day, 6)]


def test_whole_days_and_the_gaps_between_them():
    t = datetime(2026, 3, 10, 6, tzinfo=UTC)
    assert _whole_days(t, t + timedelta(hours=20)) is None
    assert _whole_days(t, t + timedelta(days=3)) == (date(2026, 3, 11), date(2026, 3, 12))
    midnight = datetime(2026, 3, 10, tzinfo=UTC)
    assert _whole_days(midnight, midnight + timedelta(days=1)) == (date(2026, 3, 10), date(2026, 3, 10))
    days = [date(2026, 3, 11), date(2026, 3, 13)]
    assert _gaps(t, t + timedelta(days=4), days) == [
        (t, datetime(2026, 3, 11, tzinfo=UTC)),
        (datetime(2026, 3, 12, tzinfo=UTC), datetime(2026, 3, 13, tzinfo=UTC)),
        (datetime(2026, 3, 14, tzinfo=UTC), t + timedelta(days=4)),
    ]
    assert _gaps(midnight, midnight + timedelta(days=1), [date(2026, 3, 10)]) == []


def test_the_sink_keeps_the_daily_rows_current_in_the_background(store):
    """sinks/service.py's builder thread, as `tokenaudit sink` starts it (the store's own lock)."""
    import threading

    from tests.support.waiting import wait_for
    from tokenaudit.settings import load_settings
    from tokenaudit.sinks.service import _build_daily

    stop = threading.Event()
    thread = threading.Thread(target=_build_daily, args=(load_settings(daily_rollup_seconds=0.2), store, stop))
    thread.start()
    try:
        wait_for(lambda: FIRST.date() in current_days(store, FIRST.date(), TODAY.date()), 30, "built in the background")
        days = current_days(store, FIRST.date(), TODAY.date())
        assert sorted(days) == [(FIRST + timedelta(days=i)).date() for i in range(4)]  # today is not settled
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
