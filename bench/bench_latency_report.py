"""`tokenaudit latency --client C --since 30d` with 10 million usage_rollup rows in the store,
from the rollups' histograms, side by side with the same percentiles computed from the ledger.

Rollups are generated inside ClickHouse (INSERT ... SELECT FROM numbers(), 20 time-ordered
batches): 1,000 clients x 5 models x 2,000 one-minute-apart-per-pair windows over 35 days, each
row with a histogram of 3-6 cells (input-token bucket x latency bucket) whose counts add up to
its requests. The ledger holds the requests of the client asked about over the same days (one
row per request, as the sink writes them: ``--ledger-requests``), plus as many rows of other
clients. Both queries are the ones the report runs: queries.latency (FINAL, sumMap of the
histograms, percentiles in Python) against quantilesExact over usage_requests FINAL. Medians
of ``--runs`` after a warm-up, in the steady state (after the background merges: OPTIMIZE
FINAL). Prints RESULT lines; the target is < 300 ms.

    .venv/bin/python bench/bench_latency_report.py [--rows 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime

from tokenaudit.infra.store import Store
from tokenaudit.reports.params import parse_report_params
from tokenaudit.reports.queries import latency

CLIENTS, MODELS = 1000, 5
CLIENT = "client-7"

ROLLUPS = """
INSERT INTO {db}.usage_rollup (client_id, department, model, window_start, window_end, requests, input_tokens,
                               output_tokens, total_tokens, latency_ms_sum, latency_ms_max, version, latency_hist)
SELECT concat('client-', toString(n % 1000)), concat('dept-', toString(n % 1000 % 17)),
       concat('model-', toString(intDiv(n, 1000) % 5)),
       fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') + toIntervalSecond(intDiv(n, 5000) * {step_s:UInt32}) AS ws,
       ws + toIntervalMinute(1), arraySum(mapValues(h)) AS req, 100 * req, 20 * req, 120 * req, 50.0 * req, 400.0,
       req, h
FROM (SELECT number AS n, cityHash64(n) AS r,
             mapFromArrays(arrayMap(i -> toUInt16(100 * (bitShiftRight(r, i * 3) % 8) + 20 + bitShiftRight(r, i * 5) % 30),
                                    range(3 + r % 4)),
                           arrayMap(i -> toUInt64(1 + bitShiftRight(r, i * 7) % 9), range(3 + r % 4))) AS h
      FROM numbers({first:UInt64}, {count:UInt64}))
"""

LEDGER = """
INSERT INTO {db}.usage_requests (client_id, ts, event_id_hi, event_id_lo, model, input_tokens, latency_ms_x100)
SELECT if(n % 2 = 0, {client:String}, concat('client-', toString(n % 1000))),
       fromUnixTimestamp64Milli({start_ms:Int64} + intDiv(n * {span_ms:UInt64}, {count:UInt64}), 'UTC'),
       n, cityHash64(n), concat('model-', toString(n % 5)), 1 + cityHash64(n, 1) % 4000,
       toUInt32(100 * (5 + cityHash64(n, 2) % 3000 + (cityHash64(n, 3) % 100) / 100))
FROM (SELECT number AS n FROM numbers({count:UInt64}))
"""

LEDGER_QUERY = (
    "SELECT model, if(input_tokens <= 16, 0, toUInt32(ceil(log2(input_tokens))) - 4) AS ib, count() AS n, "
    "quantilesExact(0.5, 0.95, 0.99)(latency_ms) AS q FROM {db}.usage_requests FINAL "
    "WHERE client_id = {client:String} AND ts >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
    "GROUP BY model, ib ORDER BY model, ib"
)


def timed(fn, runs: int) -> tuple[float, object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--ledger-requests", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    start_ms = now_ms - 35 * 86_400_000
    step_s = max(1, 35 * 86_400 * 5000 // args.rows)  # the windows of each (client, model) span 35 days
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        store = Store.open(f"chdb://{tmp}", "tokenaudit")
        store.migrate()
        t0 = time.perf_counter()
        batch = args.rows // 20
        for k in range(20):
            count = batch if k < 19 else args.rows - k * batch
            store.command(ROLLUPS, {"start_ms": start_ms, "step_s": step_s, "first": k * batch, "count": count})
        store.command(
            LEDGER,
            {"client": CLIENT, "start_ms": start_ms, "span_ms": 35 * 86_400_000, "count": args.ledger_requests},
        )
        insert_s = time.perf_counter() - t0
        store.command("OPTIMIZE TABLE {db}.usage_rollup FINAL")
        store.command("OPTIMIZE TABLE {db}.usage_requests FINAL")
        params = parse_report_params("latency", {"since": "30d", "client": CLIENT})
        from_hist, rows = timed(lambda: latency(store, params, CLIENT), args.runs)
        since_ms = int(params.since.timestamp() * 1000)
        from_ledger, exact = timed(
            lambda: store.query(LEDGER_QUERY, {"client": CLIENT, "since_ms": since_ms}), args.runs
        )
        covered = sum(r["requests"] for r in rows)  # type: ignore[union-attr]
        ledger_rows = sum(r["n"] for r in exact)  # type: ignore[union-attr]
        store.close()
    print(f"RESULT rollup_rows={args.rows} ledger_rows={args.ledger_requests} insert_seconds={insert_s:.0f}")
    print(f"RESULT latency_report_one_client_30d_from_histograms_ms={from_hist:.0f} (requests covered: {covered:,})")
    print(
        f"RESULT latency_report_one_client_30d_from_ledger_ms={from_ledger:.0f} "
        f"(its requests: {ledger_rows:,}; histograms {from_ledger / from_hist:.1f}x faster)"
    )
    print(f"RESULT latency_target_300ms={'met' if from_hist < 300 else 'missed'}")


if __name__ == "__main__":
    main()
