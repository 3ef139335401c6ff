"""The ledger (usage_requests): its insert rate through the sink, and its bytes per row on disk.

1. **Insert rate through the sink** (goal >= 50,000 rows/s on one core): ``--events`` realistic
   token-usage events, Avro-encoded as the app writes them, are handed to the sink's own
   consume path (:meth:`Sink._add`: decode, validate, keep the row) and flush (the Arrow insert
   into an embedded chDB store), in ``sink_ledger_batch_rows`` batches. The process is pinned to
   one CPU (``os.sched_setaffinity``), chDB's threads included. Side by side in the same run,
   round after round (the best round of each is reported; the box may be shared): the consume
   step alone (the batch dropped, not stored), which splits the time between consuming and
   inserting; and the row insert this replaced (each row built by ``LedgerRows.row`` and
   encoded by clickhouse-connect's row insert, 5,000-row batches, insert-time dedup on), which
   gives the ratio of the two paths. (The row path here also makes a dict per row from the kept
   tuple, ~0.3 us, that the old sink did not.)
2. **Bytes per row** (goal <= 40): ``--rows`` rows generated inside ClickHouse (INSERT ...
   SELECT FROM numbers(), in 20 time-ordered batches as a sink writes them): random UUIDv7
   event ids whose time part is the request's (74 random bits each), 1,000 clients with 1-3 IPs each, 5 models, 4
   instances, realistic token counts and latencies, 10% client-sent request ids (the rest the
   app's default, stored as ''), batches of 8 with random 16-hex batch ids, 20% streamed
   (time to first token). Measured after OPTIMIZE FINAL from system.parts (bytes_on_disk,
   marks and the skip indexes included) with the per-column split from system.columns.

    .venv/bin/python bench/bench_ledger.py [--events 200000] [--rounds 2] [--rows 10000000]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import uuid_utils

from tokenaudit.infra.store import Store
from tokenaudit.schemas import EVENT, encode
from tokenaudit.settings import load_settings
from tokenaudit.sinks.ledger import LEDGER_COLUMNS, LedgerRows
from tokenaudit.sinks.ledger_batch import Row, record_of
from tokenaudit.sinks.service import GC_THRESHOLDS
from tokenaudit.sinks.sink import Batch, Sink

CLIENTS, MODELS = 1000, 5


class _Message:
    """What the sink reads of a consumed record (confluent_kafka.Message's methods)."""

    __slots__ = ("_topic", "_value")

    def __init__(self, topic: str, value: bytes):
        self._topic, self._value = topic, value

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value


class _NoConsumer:
    def commit(self, asynchronous: bool = False) -> None:
        return None


def events(n: int, start_ms: int, seed: int = 15) -> list[bytes]:
    """Encoded events as the inference app writes them (schemas.records' field set)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        client = rng.randrange(CLIENTS)
        inp = rng.randint(20, 800)
        out_tokens = rng.randint(1, 256)
        queue = rng.uniform(0, 5)
        latency = 5 + inp * 0.02 + out_tokens * 1.5 + rng.uniform(0, 10) + queue
        event_id = str(uuid_utils.uuid7())
        streamed = rng.random() < 0.2
        out.append(
            encode(
                EVENT,
                {
                    "request_id": event_id.replace("-", "") if rng.random() < 0.9 else str(uuid_utils.uuid4()),
                    "ts": start_ms + i,
                    "client_id": f"client-{client}",
                    "department": f"dept-{client % 17}",
                    "api_key_id": f"{client * 2654435761 % 2**64:016x}",
                    "client_ip": f"10.{client % 256}.{client // 256}.{rng.randint(1, 3)}",
                    "method": "POST",
                    "path": rng.choice(("/v1/generate", "/v1/completions", "/v1/chat/completions")),
                    "status_code": 200,
                    "error_type": None,
                    "model": f"model-{rng.randrange(MODELS)}",
                    "input_tokens": inp,
                    "untruncated_input_tokens": inp,
                    "truncated": False,
                    "output_tokens": out_tokens,
                    "total_tokens": inp + out_tokens,
                    "latency_ms": latency,
                    "queue_ms": queue,
                    "inference_ms": latency - queue,
                    "batch_id": f"{rng.getrandbits(64):016x}",
                    "batch_size": 8,
                    "position_in_batch": i % 8,
                    "device": "cpu",
                    "prompt_digest": f"{rng.getrandbits(256):064x}",
                    "finish_reason": "stop",
                    "event_id": event_id,
                    "instance": f"inference-{i % 4}",
                    "ttft_ms": rng.uniform(5, 50) if streamed else None,
                    "tpot_ms": rng.uniform(1, 3) if streamed else None,
                },
            )
        )
    return out


class _RowInsertSink(Sink):
    """The ledger insert this project had before the Arrow one, for the side-by-side ratio."""

    def _ledger_writer(self, ledger: LedgerRows) -> Callable[[Sequence[Row]], Any]:
        def write(rows: Sequence[Row]) -> None:
            self.store.insert("usage_requests", [ledger.row(record_of(r), r[0]) for r in rows], LEDGER_COLUMNS)

        return write


def sink_rate(
    encoded: list[bytes], insert: bool, batch_rows: int, sink_type: type[Sink] = Sink
) -> tuple[float, float, int]:
    """Events per second through the sink's consume + flush path (``insert`` False: the consume
    step alone, the batch dropped instead of stored), by the wall clock and by the process's CPU
    time (all its threads, chDB's included: on a shared core, what the path costs when it has
    the core); rows stored."""
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        store = Store.open(f"chdb://{tmp}", "tokenaudit")
        store.migrate()
        s = load_settings(sink_ledger_batch_rows=batch_rows, data_dir=tmp)
        sink = sink_type(s, store, consumer=_NoConsumer())  # type: ignore[arg-type]
        topic = s.topic_usage
        messages = [_Message(topic, v) for v in encoded]
        for msg in messages[:100]:  # warm-up: the insert path's lazy imports and first part
            sink._add(msg)
        sink.flush()
        store.command("TRUNCATE TABLE {db}.usage_requests")
        t0, cpu0 = time.perf_counter(), time.process_time()
        for k in range(0, len(messages), batch_rows):
            for msg in messages[k : k + batch_rows]:
                sink._add(msg)  # the sink's own consume step, without a broker
            if insert:
                sink.flush()
            else:
                sink.batch = Batch()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stored = store.query("SELECT count() AS n FROM {db}.usage_requests")[0]["n"]
        store.close()
    return len(encoded) / elapsed, len(encoded) / cpu, stored


GENERATE = """
INSERT INTO {db}.usage_requests
SELECT client_id, ts, bitOr(bitShiftLeft(toUInt64(ts_ms), 16), 0x7000 + rand(n) % 4096) AS event_id_hi,
       bitOr(0x8000000000000000, rand64(n) % 0x4000000000000000) AS event_id_lo,
       if(r % 10 = 0, toString(generateUUIDv4(n)), '') AS request_id,
       concat('inference-', toString(n % 4)), concat('dept-', toString(c % 17)),
       lower(hex(cityHash64(c))), concat('10.', toString(c % 256), '.', toString(intDiv(c, 256)), '.',
       toString(1 + r % 3)),
       'POST', ['/v1/generate', '/v1/completions', '/v1/chat/completions'][1 + r % 3],
       multiIf(r % 100 = 0, 500, r % 100 = 1, 429, 200),
       multiIf(r % 100 = 0, 'generation_failed', r % 100 = 1, 'rate_limited', ''),
       concat('model-', toString(r % 5)), inp, if(r % 50 = 0, inp + 500 + r % 3000, inp), outp, inp + outp,
       r % 50 = 0, lat, q, lat - q, if(r % 5 = 0, toNullable(toFloat32(5 + (r % 4500) / 100)), NULL),
       lower(hex(cityHash64(intDiv(n, 8), 15))), 8, n % 8, if(outp = 256, 'length', 'stop')
FROM (
    SELECT number AS n, cityHash64(n, 1) AS r, r % 1000 AS c, concat('client-', toString(c)) AS client_id,
           {start_ms:Int64} + intDiv(n * {span_ms:UInt64}, {rows:UInt64}) AS ts_ms,
           fromUnixTimestamp64Milli(ts_ms, 'UTC') AS ts,
           toUInt32(20 + r % 800) AS inp, toUInt32(1 + intDiv(r, 1000) % 256) AS outp,
           toFloat32((intDiv(r, 7) % 500) / 100) AS q,
           toFloat32(5 + inp * 0.02 + outp * 1.5 + (intDiv(r, 13) % 1000) / 100 + q) AS lat
    FROM numbers({first:UInt64}, {count:UInt64})
)
"""


def bytes_per_row(rows: int) -> tuple[float, list[tuple[str, float]]]:
    with tempfile.TemporaryDirectory(prefix="bench-ledger-size-") as tmp:
        store = Store.open(f"chdb://{tmp}", "tokenaudit")
        store.migrate()
        start_ms = int(datetime.now(UTC).timestamp() * 1000) - 30 * 86_400_000
        batch = rows // 20
        for k in range(20):
            count = batch if k < 19 else rows - k * batch
            store.command(
                GENERATE,
                {"start_ms": start_ms, "span_ms": 30 * 86_400_000, "rows": rows, "first": k * batch, "count": count},
            )
        store.command("OPTIMIZE TABLE {db}.usage_requests FINAL")
        d = {"d": store.database}
        total = store.query(
            "SELECT sum(bytes_on_disk) AS b, sum(rows) AS r FROM system.parts "
            "WHERE database = {d:String} AND table = 'usage_requests' AND active",
            d,
        )[0]
        per_column = store.query(
            "SELECT name, data_compressed_bytes AS b FROM system.columns "
            "WHERE database = {d:String} AND table = 'usage_requests' ORDER BY b DESC",
            d,
        )
        store.close()
    n = int(total["r"])
    if n != rows:
        raise AssertionError(f"{n} rows stored of {rows}: each event id once")
    return int(total["b"]) / n, [(c["name"], int(c["b"]) / n) for c in per_column]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batch-rows", type=int, default=load_settings().sink_ledger_batch_rows)
    ap.add_argument("--row-insert-batch-rows", type=int, default=5000, help="the replaced path's batches")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, chDB's threads included
    gc.set_threshold(*GC_THRESHOLDS)  # as the sink process sets it (sinks/service.py)
    encoded = events(args.events, int(time.time() * 1000) - 3_600_000)
    best: dict[str, tuple[float, float]] = {"sink": (0, 0), "consume": (0, 0), "row_insert": (0, 0)}
    for n in range(args.rounds):
        rates = {
            "sink": sink_rate(encoded, True, args.batch_rows),
            "consume": sink_rate(encoded, False, args.batch_rows),
            "row_insert": sink_rate(encoded, True, args.row_insert_batch_rows, _RowInsertSink),
        }
        for name, (wall, cpu, stored) in rates.items():
            if name != "consume" and stored != args.events:
                raise AssertionError(f"{name}: {stored} ledger rows of {args.events} events")
            best[name] = max(best[name][0], wall), max(best[name][1], cpu)
        print(
            f"round {n + 1}: "
            + ", ".join(f"{k} {w:,.0f} rows/s ({c:,.0f} per CPU s)" for k, (w, c, _) in rates.items()),
            flush=True,
        )
    (sink, sink_cpu), (_, consume_cpu), (rows, rows_cpu) = best["sink"], best["consume"], best["row_insert"]
    print(f"RESULT ledger_events={args.events}")
    print(f"RESULT ledger_batch_rows={args.batch_rows}")
    print(f"RESULT ledger_sink_rows_per_s_one_core={sink:,.0f}")
    print(f"RESULT ledger_sink_rows_per_cpu_s={sink_cpu:,.0f}")
    print(
        f"RESULT ledger_consume_step_only_rows_per_cpu_s={consume_cpu:,.0f} "
        f"(decode, validate, keep the row: {sink_cpu / consume_cpu:.0%} of the CPU time; the Arrow insert the rest)"
    )
    print(
        f"RESULT ledger_row_insert_path_rows_per_s_one_core={rows:,.0f} ({rows_cpu:,.0f} per CPU s; "
        f"{args.row_insert_batch_rows}-row batches; the sink's path is {sink_cpu / rows_cpu:.1f}x as fast per CPU s)"
    )
    print(f"RESULT ledger_insert_target_50k={'met' if sink >= 50_000 else 'missed'} (wall clock)")
    print(f"RESULT ledger_insert_target_50k_per_cpu_s={'met' if sink_cpu >= 50_000 else 'missed'}")
    if args.rows <= 0:
        return
    per_row, columns = bytes_per_row(args.rows)
    print(f"RESULT ledger_rows={args.rows}")
    print(f"RESULT ledger_bytes_per_row={per_row:.1f}")
    print("RESULT ledger_bytes_per_row_by_column=" + ",".join(f"{name}:{b:.2f}" for name, b in columns[:8]))
    print(f"RESULT ledger_bytes_target_40={'met' if per_row <= 40 else 'missed'}")


if __name__ == "__main__":
    main()
