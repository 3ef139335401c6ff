"""`usage --since 30d --by department` over 10 million usage_rollup rows in an embedded store.

Rows are generated inside ClickHouse (INSERT ... SELECT FROM numbers()), in 20 time-ordered
batches as a sink would write them: 10,000 (client, model) pairs x 1,000 windows over 35
days, so the 30-day filter keeps ~86% of them. The query is timed through the function the
CLI and the usage API call (queries.usage: FINAL, parameterised) in three states:

  fresh    right after the 20 batches (many parts);
  steady   fresh + 5 live sink batches for the latest windows, replaying stored windows with
           higher versions (the state of a running pipeline between merges);
  merged   after OPTIMIZE ... FINAL (one part per partition: the best case).

Side by side: the same data in a table with the original sorting key (client_id, model,
window_start) against the one migration 0010 introduces ((day, client_id, model,
window_start)), and, for scale, the aggregation without FINAL (which would double-count
replays). Prints RESULT lines; the target is < 300 ms.

    .venv/bin/python bench/bench_usage_query.py [--rows 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the suite's helpers

from tests.support.usage_seed import ROLLUP_COLUMNS
from tokenaudit.infra.store import Store
from tokenaudit.reports.params import parse_report_params
from tokenaudit.reports.queries import usage

PAIRS = 10_000  # 2,000 clients x 5 models
COLUMNS = ", ".join(ROLLUP_COLUMNS)  # the query tests' seed columns


def generate(store: Store, first: int, count: int, start_ms: int, version: int = 1) -> None:
    """Rows n in [first, first+count): pair n % PAIRS, window n // PAIRS (50 minutes apart)."""
    store.command(
        f"INSERT INTO {{db}}.usage_rollup ({COLUMNS}) "
        "SELECT concat('client-', toString(n % 2000)), concat('dept-', toString(n % 2000 % 17)), "
        "concat('model-', toString(intDiv(n, 2000) % 5)), "
        "fromUnixTimestamp64Milli({start_ms:Int64}, 'UTC') + toIntervalMinute(50 * intDiv(n, {pairs:UInt32})) AS ws, "
        "ws + toIntervalMinute(1), 1 + n % 7, n % 13 = 0, 100 + n % 500, 50 + n % 200, "
        "150 + n % 500 + n % 200, 12.5 * (1 + n % 7), 40, 100 + n % 500, 0, {version:UInt64} "
        "FROM (SELECT number AS n FROM numbers({first:UInt64}, {count:UInt64}))",
        {"start_ms": start_ms, "pairs": PAIRS, "first": first, "count": count, "version": version},
    )


def live(store: Store, windows: int, start_ms: int, first_version: int) -> None:
    """Five live sink batches: the latest windows again (replays) with higher versions."""
    for k in range(5):
        generate(store, (windows - 1) * PAIRS, PAIRS, start_ms, version=2 + first_version + k)


def parts(store: Store) -> int:
    return store.query(
        "SELECT count() AS n FROM system.parts WHERE database = {d:String} AND table = 'usage_rollup' AND active",
        {"d": store.database},
    )[0]["n"]


def timed(fn, runs: int) -> tuple[float, object]:
    fn()  # warm-up (page cache, marks cache)
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    windows = args.rows // PAIRS
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    start_ms = now_ms - 35 * 86_400_000  # windows 50 min apart: 1,000 of them span ~35 days

    with tempfile.TemporaryDirectory(prefix="bench-usage-") as tmp:
        store = Store.open(f"chdb://{tmp}", "tokenaudit")
        store.migrate()
        # the same schema with the pre-0010 sorting key, for comparison
        old = Store(store.client, "tokenaudit_client_first")
        old.migrate()
        old.command("DROP TABLE {db}.usage_rollup")
        old.command(
            "CREATE TABLE {db}.usage_rollup AS tokenaudit.usage_rollup ENGINE = ReplacingMergeTree(version) "
            "PARTITION BY toYYYYMM(window_start) ORDER BY (client_id, model, window_start)"
        )
        params = parse_report_params("usage", {"since": "30d", "by": "department"})
        results: dict[str, dict[str, float]] = {}
        answers = []
        insert_s = 0.0
        for name, st in (("day_first", store), ("client_first", old)):
            r = results[name] = {}
            st.command("SYSTEM STOP MERGES {db}.usage_rollup")  # a reproducible worst case first
            t0 = time.perf_counter()
            batch = args.rows // 20
            for k in range(20):
                generate(st, k * batch, batch if k < 19 else args.rows - k * batch, start_ms)
            insert_s = max(insert_s, time.perf_counter() - t0)
            live(st, windows, start_ms, 0)
            r["parts_fresh"] = parts(st)
            r["fresh"], a1 = timed(lambda: usage(st, params), args.runs)
            # steady: what background merges converge to, plus new live batches not merged yet
            st.command("SYSTEM START MERGES {db}.usage_rollup")
            st.command("OPTIMIZE TABLE {db}.usage_rollup FINAL")
            st.command("SYSTEM STOP MERGES {db}.usage_rollup")
            live(st, windows, start_ms, 5)
            r["parts_steady"] = parts(st)
            r["steady"], a2 = timed(lambda: usage(st, params), args.runs)
            if name == "day_first":
                r["nofinal"], dup = timed(
                    lambda: st.query(
                        "SELECT department, sum(total_tokens) AS t FROM {db}.usage_rollup "
                        "WHERE window_start >= fromUnixTimestamp64Milli({s:Int64}, 'UTC') GROUP BY department",
                        {"s": int(params.since.timestamp() * 1000)},
                    ),
                    args.runs,
                )
            st.command("SYSTEM START MERGES {db}.usage_rollup")
            st.command("OPTIMIZE TABLE {db}.usage_rollup FINAL")
            r["merged"], a3 = timed(lambda: usage(st, params), args.runs)
            answers += [a1, a2, a3]
        store.close()

    assert all(a == answers[0] for a in answers), "FINAL must give the same answer in every state and layout"
    total = sum(row["total_tokens"] for row in answers[0])
    new, old_ = results["day_first"], results["client_first"]
    print(f"RESULT rows={args.rows}")
    print(f"RESULT insert_seconds={insert_s:.1f}")
    print(f"RESULT parts_fresh={new['parts_fresh']} parts_steady={new['parts_steady']} parts_merged=1_per_month")
    for state in ("fresh", "steady", "merged"):
        print(
            f"RESULT usage_30d_by_department_{state}_ms={new[state]:.0f} "
            f"(original sorting key: {old_[state]:.0f}, ratio {old_[state] / new[state]:.1f}x)"
        )
    print(
        f"RESULT usage_30d_without_final_steady_ms={new['nofinal']:.0f} "
        f"(FINAL costs {new['steady'] / new['nofinal']:.2f}x)"
    )
    print(f"RESULT replayed_tokens_without_final={sum(r['t'] for r in dup) - total}")
    print(f"RESULT target_300ms_steady={'met' if new['steady'] < 300 else 'missed'}")


if __name__ == "__main__":
    main()
