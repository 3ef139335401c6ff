"""The fixed reports over seeded chDB tables: exact totals whatever was replayed, every
grouping, top share, latency buckets, anomalies, and parameter validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.support.usage_seed import CLIENTS, seed_anomalies, seed_rollups, totals, utcnow
from tokenaudit.infra.store import Store
from tokenaudit.reports.params import QueryParamError, parse_month, parse_report_params, parse_time
from tokenaudit.reports.queries import run_raw

SUMS = ("requests", "errors", "input_tokens", "output_tokens", "total_tokens")


@pytest.fixture
def store(ch_client, ch_database):
    s = Store(ch_client, ch_database)
    s.migrate()
    return s


@pytest.fixture
def seeded(store):
    now = utcnow()
    rows = seed_rollups(store, now)
    return store, rows, now


@pytest.mark.parametrize(
    ("by", "key", "index"), [("client", "client_id", 0), ("department", "department", 1), ("model", "model", 2)]
)
def test_usage_by_key_is_exact_despite_replays(seeded, by, key, index):
    store, rows, _ = seeded
    got = run_raw(store, "usage", {"since": "2h", "by": by})
    expected = totals(rows, index)
    assert {r[key]: {s: r[s] for s in SUMS} for r in got} == expected
    assert [r["total_tokens"] for r in got] == sorted((r["total_tokens"] for r in got), reverse=True)
    if by == "client":
        assert {r["client_id"]: r["department"] for r in got} == CLIENTS


def test_usage_by_hour_and_day_sum_to_the_same_total(seeded):
    store, rows, _now = seeded
    grand = sum(r[9] for r in rows)
    for by in ("hour", "day"):
        got = run_raw(store, "usage", {"since": "2h", "by": by})
        assert sum(r["total_tokens"] for r in got) == grand
        assert [r[by] for r in got] == sorted(r[by] for r in got)
    hours = run_raw(store, "usage", {"since": "2h", "by": "hour"})
    assert all(h["hour"].endswith(":00:00Z") for h in hours)


def test_usage_by_minute_is_exact_per_minute(seeded):
    store, rows, _now = seeded
    got = run_raw(store, "usage", {"since": "2h", "by": "minute"})
    expected: dict[str, int] = {}
    for r in rows:  # the seed's windows are one minute each
        minute = r[3].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:00Z")
        expected[minute] = expected.get(minute, 0) + r[9]
    assert {g["minute"]: g["total_tokens"] for g in got} == expected
    assert [g["minute"] for g in got] == sorted(expected)


def test_usage_time_range_filters_windows(seeded):
    store, rows, now = seeded
    cutoff = now - timedelta(minutes=10)
    got = run_raw(store, "usage", {"since": cutoff.isoformat(), "by": "department"})
    expected = totals([r for r in rows if r[3] >= cutoff], 1)
    assert {r["department"]: r["total_tokens"] for r in got} == {k: v["total_tokens"] for k, v in expected.items()}
    older = run_raw(store, "usage", {"since": "1d", "until": cutoff.isoformat(), "by": "department"})
    assert sum(r["total_tokens"] for r in got) + sum(r["total_tokens"] for r in older) == sum(r[9] for r in rows)


def test_top_ranks_clients_with_share(seeded):
    store, rows, _ = seeded
    got = run_raw(store, "top", {"since": "2h", "limit": "2"})
    per_client = totals(rows, 0)
    grand = sum(v["total_tokens"] for v in per_client.values())
    ranked = sorted(per_client, key=lambda c: -per_client[c]["total_tokens"])[:2]
    assert [r["client_id"] for r in got] == ranked
    assert [r["rank"] for r in got] == [1, 2]
    for r in got:
        assert r["share_pct"] == pytest.approx(100 * per_client[r["client_id"]]["total_tokens"] / grand, abs=0.01)


def test_client_scope_only_returns_that_client(seeded):
    store, rows, _ = seeded
    got = run_raw(store, "usage", {"since": "2h", "by": "model", "client": "acme-batch"})
    expected = totals([r for r in rows if r[0] == "acme-batch"], 2)
    assert {r["model"]: r["total_tokens"] for r in got} == {k: v["total_tokens"] for k, v in expected.items()}


def test_latency_of_rollups_without_histograms_is_not_covered(seeded):
    # rows as written before rollup schema v4 (no histogram): counted, never guessed
    store, rows, _ = seeded
    got = run_raw(store, "latency", {"since": "2h"})
    assert {r["input_tokens"] for r in got} == {"not covered"}
    assert all(r["p50_latency_ms"] is None for r in got)
    assert sum(r["requests"] for r in got) == sum(r[5] for r in rows)


def test_anomalies_listing_dedups_and_orders(store):
    now = utcnow()
    seed_anomalies(store, now)
    got = run_raw(store, "anomalies", {"since": "24h"})
    assert [a["anomaly_id"] for a in got] == ["a1", "a2"]
    assert got[1]["window_start"].endswith("Z") and got[0]["request_id"] == "req-1"
    assert [a["anomaly_id"] for a in run_raw(store, "anomalies", {"since": "7d", "limit": "2"})] == ["a1", "a2"]
    assert len(run_raw(store, "anomalies", {"since": "7d"})) == 3


def test_parse_time_forms():
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    assert parse_time("15m", "since", now) == now - timedelta(minutes=15)
    assert parse_time("24h", "since", now) == now - timedelta(hours=24)
    assert parse_time("7d", "since", now) == now - timedelta(days=7)
    assert parse_time("2026-03-01", "since", now) == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_time("2026-03-01T05:30:00Z", "since", now) == datetime(2026, 3, 1, 5, 30, tzinfo=UTC)
    assert parse_time("2026-03-01T07:30:00+02:00", "since", now) == datetime(2026, 3, 1, 5, 30, tzinfo=UTC)
    assert parse_month("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("report", "raw", "match"),
    [
        ("usage", {"since": "yesterday"}, "since: expected a duration"),
        ("usage", {"since": "1h", "until": "2h"}, "until: must be after since"),
        ("usage", {"by": "client_id; DROP TABLE x"}, "by: expected one of"),
        ("usage", {"by": "hour", "order": "1"}, "unknown parameter"),
        ("top", {"limit": "0"}, "limit: expected a whole number"),
        ("top", {"limit": "10 OR 1=1"}, "limit: expected a whole number"),
        ("report", {}, "month: required"),
        ("report", {"month": "2026-13"}, "month: expected YYYY-MM"),
        ("usage", {"client": "x' OR '1'='1"}, "client: expected a client id"),
        ("nope", {}, "unknown report"),
    ],
)
def test_bad_parameters_are_rejected(report, raw, match):
    with pytest.raises(QueryParamError, match=match):
        parse_report_params(report, raw)
