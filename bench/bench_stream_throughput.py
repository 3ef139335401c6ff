"""End-to-end events/s (topic -> worker -> sink -> rows in ClickHouse) next to a raw aiokafka
consume-and-decode loop over the same topic; sampled share and recall at 0.10.

Two stream shapes, side by side in one run (2000 clients x 3 models, 10 s windows, jittered
and 1% late events in both); what differs is how many events share a window:

* ``live``: event time advances at 30k events/s, the target rate: what one worker sees
  when it keeps up with a 30k/s deployment (~50 events per client, model and window; one
  rollup per ~50 events).
* ``backfill``: event time advances at 500 events/s while the worker reads as fast as it
  can, like catching up a small deployment's backlog: ~1.5 events per window, so nearly
  every event opens, closes and emits a window of its own (0.66 rollups per event, the
  emission-heavy worst case).

Each shape gets its own topics, broker group and ClickHouse database; the raw loop is the
best of three passes over the shape's topic (so the ratio is not flattered by a slow pass).
Events carry event ids and 1% of them are sent twice (a copy a few events later). The live
shape is also run with deduplication off (``TOKENAUDIT_DEDUP=false``: copies are counted
twice) next to on, alternating, two runs each (best of two), each with its own output topics,
group and database: the cost of counting each event once, side by side on the same topic.
The target's raw loop decodes with fastavro (``schemas.decode``, what a plain consumer uses);
the same loop with the worker's own (native) decoder is printed next to it, as the cost of
consuming alone.
Starts its own Kafka broker (free ports, temp dir) and an embedded chDB store; the worker
runs as a subprocess (`python -m tokenaudit.streams.app`), the sink in this process.
Prints RESULT lines. Usage: python bench/bench_stream_throughput.py [live_events] [backfill_events] (0: skip that shape)
[dedup_rounds] (runs of each dedup mode on the live shape; 0: only the default mode)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the suite's helpers

from tests.support import synth
from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.store import Store
from tokenaudit.schemas import EVENT, decode
from tokenaudit.schemas.compiled import compile_decoder
from tokenaudit.settings import load_settings
from tokenaudit.sinks.sink import Sink
from tokenaudit.streams.app import ensure_worker_topics

N_LIVE = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
N_BACKFILL = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
DEDUP_ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 2
COPY_SHARE = 0.01
T0 = int(time.time() * 1000) - 3_600_000
SHAPES = {  # name: (events, event-time ms per event)
    "live": (N_LIVE, 1 / 30),
    "backfill": (N_BACKFILL, 2.0),
}
SHAPES = {name: shape for name, shape in SHAPES.items() if shape[0] > 0}  # 0 events: skip the shape


async def raw_loop(bootstrap: str, topic: str, n: int, decoder=lambda value: decode(value, EVENT)) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 << 20,
    )
    await consumer.start()
    seen, started = 0, None
    try:
        while seen < n:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            if started is None and batches:
                started = time.perf_counter()
            for msgs in batches.values():
                for m in msgs:
                    decoder(m.value)
                seen += len(msgs)
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def run_shape(name: str, broker: KafkaBroker, client, tmp: Path) -> None:
    n, ms_per_event = SHAPES[name]
    base = load_settings()
    env = {
        "TOKENAUDIT_KAFKA_BOOTSTRAP": broker.bootstrap,
        "TOKENAUDIT_DATA_DIR": str(tmp / f"data-{name}"),
        "TOKENAUDIT_WORKER_ID": f"bench-worker-{name}",
        "TOKENAUDIT_WINDOW_SECONDS": "10",
        "TOKENAUDIT_GRACE_SECONDS": "2",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "1",
        "TOKENAUDIT_KAFKA_PARTITIONS": "4",
        "TOKENAUDIT_WORKER_WEB_PORT": str(free_port()),
        "TOKENAUDIT_SINK_BATCH_ROWS": "20000",
    }
    env.update(
        {
            f"TOKENAUDIT_TOPIC_{t.upper()}": f"{getattr(base, 'topic_' + t)}-{name}"
            for t in ("usage", "anomalies", "dlq", "rollups", "sampled")
        }
    )
    s = load_settings(**{k[len("TOKENAUDIT_") :].lower(): v for k, v in env.items()})
    ensure_worker_topics(s)
    # each client keeps its department (dept_switch=0): windows split by department are rare in
    # practice, and the window count stays what it was before windows had a department
    events = synth.mixed_stream(
        n,
        clients=2000,
        models=3,
        start_ms=T0,
        span_ms=int(n * ms_per_event),
        seed=1,
        late_share=0.01,
        late_ms=5_000,
        jitter_ms=500,
        dept_switch=0.0,
    )
    stream, copies = synth.with_copies(events, COPY_SHARE, seed=2, max_delay=20)
    synth.produce(broker.bootstrap, s.topic_usage, synth.encoded(stream), raw=True)
    total = len(stream)
    raw = max(asyncio.run(raw_loop(broker.bootstrap, s.topic_usage, total)) for _ in range(3))
    print(
        f"RESULT {name}_raw_aiokafka_decode_events_per_s={raw:.0f}  (fastavro decode: the target's baseline)",
        flush=True,
    )
    # Context: the same loop with the worker's own decoder (native codec), i.e. the cost of
    # consuming alone; the worker's ratio to it is what its processing costs on top.
    raw_native = max(
        asyncio.run(raw_loop(broker.bootstrap, s.topic_usage, total, compile_decoder(EVENT))) for _ in range(3)
    )
    print(f"RESULT {name}_raw_aiokafka_worker_decoder_events_per_s={raw_native:.0f}", flush=True)

    if name == "live" and DEDUP_ROUNDS:
        best: dict[bool, float] = {}
        for run in range(DEDUP_ROUNDS):
            for dedup in (False, True):
                label = f"{name}-{'dedup' if dedup else 'nodedup'}-{run}"
                rate = run_worker(label, env, s, client, tmp, dedup, expected=n if dedup else total)
                best[dedup] = max(best.get(dedup, 0.0), rate)
                print(f"RESULT {label}_e2e_events_per_s={rate:.0f}", flush=True)
        print(f"RESULT {name}_e2e_events_per_s_dedup_off={best[False]:.0f}")
        print(f"RESULT {name}_e2e_events_per_s_dedup_on={best[True]:.0f}")
        print(
            f"RESULT {name}_dedup_throughput_ratio={best[True] / best[False]:.2f}  (goal >= 0.90; "
            f"{copies} copies in {total} records)"
        )
        print(f"RESULT {name}_e2e_vs_raw_ratio={best[True] / raw:.2f}  (dedup on; target >= 0.5)")
        print(f"RESULT {name}_e2e_vs_raw_worker_decoder_ratio={best[True] / raw_native:.2f}", flush=True)
        return
    e2e_warm = run_worker(
        name, env, s, client, tmp, True, expected=n, report=True, events=events, raw=raw, raw_native=raw_native
    )
    del e2e_warm


def run_worker(
    label: str,
    env: dict,
    s,
    client,
    tmp: Path,
    dedup: bool,
    expected: int,
    report: bool = False,
    events: list | None = None,
    raw: float = 0.0,
    raw_native: float = 0.0,
) -> float:
    """One worker (group ``label``) over the shape's topic into its own database; events/s from
    its first rollup row to all ``expected`` requests in ClickHouse."""
    env = dict(
        env,
        TOKENAUDIT_WORKER_ID=f"bench-worker-{label}",
        TOKENAUDIT_DEDUP=str(dedup).lower(),
        TOKENAUDIT_WORKER_WEB_PORT=str(free_port()),
        **{
            f"TOKENAUDIT_TOPIC_{t.upper()}": f"{s.topic_usage}-{label}-{t}"
            for t in ("anomalies", "dlq", "rollups", "sampled")
        },
    )
    s = load_settings(**{k[len("TOKENAUDIT_") :].lower(): v for k, v in env.items()})
    ensure_worker_topics(s)
    name = label
    n = expected
    store = Store(client, f"bench_{label.replace('-', '_')}")
    store.migrate()
    sink = Sink(s, store, group_id=f"bench-sink-{label}")
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    log = open(tmp / f"worker-{label}.log", "wb")
    started = time.perf_counter()
    worker = subprocess.Popen(
        [sys.executable, "-m", "tokenaudit.streams.app"],
        env=dict(os.environ, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    first = done = None
    total = 0
    while time.perf_counter() - started < 600:
        total = store.query("SELECT sum(requests) AS n FROM {db}.usage_rollup FINAL")[0]["n"] or 0
        if total and first is None:
            first = time.perf_counter()
        if total >= n:
            done = time.perf_counter()
            break
        time.sleep(0.25)
    worker.terminate()
    worker.wait(30)
    if done is None:
        raise SystemExit(f"worker did not finish: {total} of {n}\n" + (tmp / f"worker-{label}.log").read_text()[-3000:])
    e2e = n / (done - started)
    e2e_warm = n / (done - first)
    if not report:
        stop.set()
        thread.join(30)
        return e2e_warm
    rollups = store.query("SELECT count() AS n FROM {db}.usage_rollup FINAL")[0]["n"]
    print(f"RESULT {name}_events_per_window={n / rollups:.1f}")
    print(f"RESULT {name}_e2e_events_per_s_incl_startup={e2e:.0f}")
    print(
        f"RESULT {name}_e2e_events_per_s={e2e_warm:.0f}  (first rollup row -> all {n} events in ClickHouse; target >= 30000)"
    )
    print(f"RESULT {name}_e2e_vs_raw_ratio={e2e_warm / raw:.2f}  (target >= 0.5)")
    print(f"RESULT {name}_e2e_vs_raw_worker_decoder_ratio={e2e_warm / raw_native:.2f}", flush=True)

    time.sleep(2 * s.sink_batch_seconds + 1)
    kept = {
        r["request_id"]
        for r in store.query("SELECT request_id FROM {db}.usage_sampled FINAL WHERE sample_reason = 'top_fraction'")
    }
    assert events is not None
    warm = {e["request_id"] for e in events[n // 20 :]}  # after warm-up (first 5%)
    share = len(kept & warm) / len(warm)
    by_model: dict[str, list] = {}
    for e in events[n // 20 :]:
        by_model.setdefault(e["model"], []).append(e)
    top = set()
    for model_events in by_model.values():
        ordered = sorted(model_events, key=lambda e: e["total_tokens"], reverse=True)
        cut = ordered[int(len(ordered) * s.sample_fraction)]["total_tokens"]
        top |= {e["request_id"] for e in model_events if e["total_tokens"] > cut}
    recall = len(kept & top) / len(top)
    print(f"RESULT {name}_sampled_share={share:.4f} (target {s.sample_fraction})")
    print(f"RESULT {name}_sampled_recall_true_top={recall:.4f}", flush=True)
    stop.set()
    thread.join(30)
    return e2e_warm


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    base = load_settings()
    broker = KafkaBroker(
        BrokerConfig(
            home=tmp / "kafka",
            cache_dir=base.cache_dir,
            version=base.kafka_version,
            port=free_port(),
            controller_port=free_port(),
            heap="512m",
        )
    )
    broker.start()
    store = Store.open(f"chdb://{tmp / 'ch'}", "bench")
    try:
        for name in SHAPES:
            run_shape(name, broker, store.client, tmp)
    finally:
        store.close()
        broker.stop()


if __name__ == "__main__":
    main()
