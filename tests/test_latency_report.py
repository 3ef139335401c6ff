"""The latency report from the rollups' histograms: p50/p95/p99 per client, model and
input-token bucket over all requests, within one bucket of the exact quantiles the ledger gives
for the same requests; windows without a full histogram are reported as not covered.

The rollups are what the stream job emits (the real Processor over encoded events, copies and
late events included, merged as the sink merges them) and are written with the sink's row
builders into a real chDB store, beside the ledger rows of the same events."""

from __future__ import annotations

import itertools
import random
import time
from datetime import UTC, datetime

import pytest

from tests.support import synth
from tests.test_streams_logic import Table, drain_idle, partitioned, run, settings
from tokenaudit.infra.store import Store
from tokenaudit.reports.queries import run_raw
from tokenaudit.schemas import latency_hist
from tokenaudit.sinks import rows as R
from tokenaudit.sinks.ledger import LEDGER_COLUMNS, LedgerRows
from tokenaudit.streams.processor import Processor
from tokenaudit.streams.state import MemoryState

T0 = (int(time.time() * 1000) - 1_800_000) // 60_000 * 60_000  # recent: inside the ledger's retention


def _events() -> list[dict]:
    rng = random.Random(15)
    out = []
    for i in range(3000):
        inp = rng.choice((rng.randint(1, 16), rng.randint(17, 64), rng.randint(200, 2000)))
        latency = rng.lognormvariate(3.0 + inp / 1000, 0.8)  # ms: a few to a few thousand
        out.append(
            synth.event(
                f"l{i}",
                T0 + i * 300,  # 15 minutes in 2 s windows
                f"client-{i % 3}",
                f"model-{i % 2}",
                input_tokens=inp,
                output_tokens=rng.randint(1, 50),
                latency_ms=latency,
                status_code=500 if i % 50 == 0 else 200,
            )
        )
    return out


@pytest.fixture
def store(ch_client, ch_database):
    s = Store(ch_client, ch_database)
    s.migrate()
    return s


def _since_until() -> dict[str, str]:
    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat()

    return {"since": iso(T0 - 60_000), "until": iso(T0 + 3_600_000)}


def test_percentiles_from_histograms_match_the_ledger_within_one_bucket(store):
    events = _events()
    rng = random.Random(3)
    copies = rng.sample(events, 100)  # spool replays: counted once
    stream = sorted(events + copies, key=lambda e: e["ts"])
    proc, table = Processor(settings(), MemoryState()), Table()
    run(proc, table, partitioned(stream), batch=400)
    drain_idle(proc, table)
    store.insert("usage_rollup", [R.rollup_row(r) for r in table.rows.values()], R.ROLLUP_COLUMNS)
    ledger = LedgerRows(str)
    store.insert("usage_requests", [ledger.row(e, e["event_id"]) for e in events], LEDGER_COLUMNS)

    got = run_raw(store, "latency", _since_until())
    assert sum(r["requests"] for r in got) == len(events)  # every request, errors too; copies once
    assert "not covered" not in {r["input_tokens"] for r in got}
    exact = store.query(
        "SELECT client_id, model, if(input_tokens <= 16, 0, toUInt32(ceil(log2(input_tokens))) - 4) AS ib, "
        "count() AS n, quantilesExact(0.5, 0.95, 0.99)(latency_ms) AS q "
        "FROM {db}.usage_requests FINAL GROUP BY client_id, model, ib"
    )
    assert len(exact) == len(got) >= 12
    reported = {(r["client_id"], r["model"], r["input_tokens"]): r for r in got}
    for e in exact:
        line = reported[(e["client_id"], e["model"], latency_hist.input_range(int(e["ib"])))]
        assert line["requests"] == e["n"]
        for name, value in zip(("p50", "p95", "p99"), e["q"], strict=True):
            upper = line[f"{name}_latency_ms"]
            bucket = latency_hist.LATENCY_BOUNDS_MS.index(upper)
            # the exact value (the ledger's, to 10 us) lies in the reported bucket or a neighbour
            lower = latency_hist.latency_range(max(bucket - 1, 0))[0]
            higher = latency_hist.latency_range(min(bucket + 1, latency_hist.LATENCY_BUCKETS - 1))[1]
            assert lower < value <= higher, (e, name, value, upper)


def test_rows_without_a_full_histogram_are_not_covered(store):
    events = _events()[:300]
    proc, table = Processor(settings(), MemoryState()), Table()
    run(proc, table, partitioned(events), batch=100)
    drain_idle(proc, table)
    rows = list(table.rows.values())
    old = rows[: len(rows) // 3]  # as a v3 worker wrote them: no histogram
    for r in old:
        r["latency_hist"] = ""
    store.insert("usage_rollup", [R.rollup_row(r) for r in rows], R.ROLLUP_COLUMNS)
    got = run_raw(store, "latency", _since_until())
    uncovered = sum(r["requests"] for r in got if r["input_tokens"] == "not covered")
    assert uncovered == sum(r["requests"] for r in old) > 0
    assert sum(r["requests"] for r in got) == len(events)


def test_histogram_bounds_buckets_and_wire_form():
    bounds = latency_hist.LATENCY_BOUNDS_MS
    assert bounds[0] == 1.0 and bounds[-1] == 60_000.0 and list(bounds) == sorted(set(bounds))
    assert all(b / a < 1.2 for a, b in itertools.pairwise(bounds))  # 2^(1/4): 19% apart
    assert [latency_hist.input_bucket(n) for n in (0, 16, 17, 32, 33, 2048, 2049)] == [0, 0, 1, 1, 2, 7, 8]
    assert [latency_hist.input_range(b) for b in (0, 1, 7)] == ["1-16", "17-32", "1025-2048"]
    assert (
        latency_hist.cell(20, 0.5) == 100 and latency_hist.cell(20, 1.0) == 100 and latency_hist.cell(20, 1.01) == 101
    )
    assert latency_hist.cell(5, 61_000) == latency_hist.LATENCY_BUCKETS - 1
    hist = {latency_hist.cell(300, 42.0): 3, latency_hist.cell(5, 2.5): 1}
    assert latency_hist.decode(latency_hist.encode(hist)) == hist and latency_hist.decode("") == {}
    with pytest.raises(ValueError, match="invalid literal"):
        latency_hist.decode("1:x")
    values = sorted(random.Random(1).lognormvariate(3, 1) for _ in range(101))
    counts: dict[int, int] = {}
    for v in values:
        b = latency_hist.cell(1, v)
        counts[b] = counts.get(b, 0) + 1
    for q in (0.5, 0.95, 0.99, 1.0):
        lower, upper = latency_hist.latency_range(latency_hist.quantile_bucket(counts, q))
        assert lower < values[min(int(q * 101), 100)] <= upper


def _within_a_bucket(value: float, upper: float) -> bool:
    """The exact ``value`` lies in the bucket whose upper bound is ``upper``, or a neighbour."""
    bucket = latency_hist.LATENCY_BOUNDS_MS.index(upper)
    lower = latency_hist.latency_range(max(bucket - 1, 0))[0]
    higher = latency_hist.latency_range(min(bucket + 1, latency_hist.LATENCY_BUCKETS - 1))[1]
    return lower < value <= higher


def test_merged_views_by_input_over_time_and_in_the_openai_shape_match_the_ledger(store):
    """The dashboard's two latency panels (bucket=input: every client and model merged per input
    bucket; bucket=minute: per minute) and the OpenAI-shaped endpoint's p50/p95 come from the
    same histograms, merged: each within a bucket of the ledger's exact quantiles."""
    from tokenaudit.reports.openai_usage import fetch_page, parse_bucket_query

    events = _events()
    proc, table = Processor(settings(), MemoryState()), Table()
    run(proc, table, partitioned(sorted(events, key=lambda e: e["ts"])), batch=400)
    drain_idle(proc, table)
    store.insert("usage_rollup", [R.rollup_row(r) for r in table.rows.values()], R.ROLLUP_COLUMNS)
    ledger = LedgerRows(str)
    store.insert("usage_requests", [ledger.row(e, e["event_id"]) for e in events], LEDGER_COLUMNS)

    by_input = run_raw(store, "latency", {**_since_until(), "bucket": "input"})
    exact = store.query(
        "SELECT if(input_tokens <= 16, 0, toUInt32(ceil(log2(input_tokens))) - 4) AS ib, count() AS n, "
        "quantilesExact(0.5, 0.95)(latency_ms) AS q FROM {db}.usage_requests FINAL GROUP BY ib ORDER BY ib"
    )
    assert [(r["input_tokens"], r["requests"]) for r in by_input] == [
        (latency_hist.input_range(int(e["ib"])), e["n"]) for e in exact
    ]
    for line, e in zip(by_input, exact, strict=True):
        assert _within_a_bucket(e["q"][0], line["p50_latency_ms"]) and _within_a_bucket(
            e["q"][1], line["p95_latency_ms"]
        )

    per_minute = run_raw(store, "latency", {**_since_until(), "bucket": "minute"})
    exact_minutes = store.query(
        "SELECT toStartOfMinute(ts) AS t, count() AS n, quantilesExact(0.5)(latency_ms) AS q "
        "FROM {db}.usage_requests FINAL GROUP BY t ORDER BY t"
    )
    assert sum(r["requests"] for r in per_minute) == len(events) and all(r["not_covered"] == 0 for r in per_minute)
    assert len(per_minute) == len(exact_minutes)
    for line, e in zip(per_minute, exact_minutes, strict=True):
        assert line["requests"] == e["n"] and _within_a_bucket(e["q"][0], line["p50_latency_ms"])

    start = T0 // 1000 // 86_400 * 86_400
    query = parse_bucket_query(
        [("start_time", str(start)), ("end_time", str(start + 2 * 86_400)), ("bucket_width", "1d")], window_seconds=2
    )
    results = [res for bucket in fetch_page(store, query, None)["data"] for res in bucket["results"]]
    whole = store.query("SELECT quantilesExact(0.5, 0.95)(latency_ms) AS q FROM {db}.usage_requests FINAL")[0]["q"]
    assert sum(r["num_model_requests"] for r in results) == len(events)
    if len(results) == 1:  # the events fall in one UTC day (they span 15 minutes)
        assert _within_a_bucket(whole[0], results[0]["latency_ms_p50"])
        assert _within_a_bucket(whole[1], results[0]["latency_ms_p95"])
