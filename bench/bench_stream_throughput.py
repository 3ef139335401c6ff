"""End-to-end events/s (topic -> worker -> sink -> rows in ClickHouse) next to a raw aiokafka
consume-and-decode loop over the same topic; sampled share and recall at 0.10.

Starts its own Kafka broker (free ports, temp dir) and an embedded chDB store; the worker
runs as a subprocess (`python -m tokenaudit.streams.app`), the sink in this process.
Prints RESULT lines. Usage: python bench/bench_stream_throughput.py [events]
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

from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import EVENT, decode
from tokenaudit.settings import load_settings
from tokenaudit.sinks.sink import Sink
from tokenaudit.sinks.store import Store
from tokenaudit.streams import synth
from tokenaudit.streams.app import ensure_worker_topics

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
T0 = int(time.time() * 1000) - 3_600_000


async def raw_loop(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 << 20)
    await consumer.start()
    seen, started = 0, None
    try:
        while seen < n:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            if started is None and batches:
                started = time.perf_counter()
            for msgs in batches.values():
                for m in msgs:
                    decode(m.value, EVENT)
                seen += len(msgs)
        return n / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    base = load_settings()
    broker = KafkaBroker(BrokerConfig(home=tmp / "kafka", cache_dir=base.cache_dir, version=base.kafka_version,
                                      port=free_port(), controller_port=free_port(), heap="512m"))
    broker.start()
    try:
        env = {
            "TOKENAUDIT_KAFKA_BOOTSTRAP": broker.bootstrap, "TOKENAUDIT_DATA_DIR": str(tmp / "data"),
            "TOKENAUDIT_WORKER_ID": "bench-worker", "TOKENAUDIT_WINDOW_SECONDS": "10",
            "TOKENAUDIT_GRACE_SECONDS": "2", "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "1",
            "TOKENAUDIT_KAFKA_PARTITIONS": "4", "TOKENAUDIT_WORKER_WEB_PORT": str(free_port()),
            "TOKENAUDIT_SINK_BATCH_ROWS": "20000",
        }
        s = load_settings(**{k[len("TOKENAUDIT_"):].lower(): v for k, v in env.items()})
        ensure_worker_topics(s)
        events = synth.mixed_stream(N, clients=2000, models=3, start_ms=T0, span_ms=N * 2, seed=1,
                                    late_share=0.01, late_ms=5_000, jitter_ms=500)
        encoded = synth.encoded(events)
        synth.produce(broker.bootstrap, s.topic_usage, encoded, raw=True)
        raw = asyncio.run(raw_loop(broker.bootstrap, s.topic_usage, N))
        print(f"RESULT raw_aiokafka_decode_events_per_s={raw:.0f}", flush=True)

        store = Store.open(f"chdb://{tmp / 'ch'}", "bench")
        store.migrate()
        sink = Sink(s, store, group_id="bench-sink")
        stop = threading.Event()
        thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
        thread.start()
        log = open(tmp / "worker.log", "wb")
        started = time.perf_counter()
        worker = subprocess.Popen([sys.executable, "-m", "tokenaudit.streams.app"], env=dict(os.environ, **env),
                                  stdout=log, stderr=subprocess.STDOUT)
        first = done = None
        while time.perf_counter() - started < 600:
            total = store.query("SELECT sum(requests) AS n FROM {db}.usage_rollup FINAL")[0]["n"] or 0
            if total and first is None:
                first = time.perf_counter()
            if total >= N:
                done = time.perf_counter()
                break
            time.sleep(0.25)
        worker.terminate()
        worker.wait(30)
        if done is None:
            raise SystemExit(f"worker did not finish: {total} of {N}\n" + (tmp / "worker.log").read_text()[-3000:])
        e2e = N / (done - started)
        e2e_warm = N / (done - first)
        print(f"RESULT e2e_events_per_s_incl_startup={e2e:.0f}")
        print(f"RESULT e2e_events_per_s={e2e_warm:.0f}  (first rollup row -> all {N} events in ClickHouse)")
        print(f"RESULT e2e_vs_raw_ratio={e2e_warm / raw:.2f}")

        time.sleep(2 * s.sink_batch_seconds + 1)
        kept = {r["request_id"] for r in store.query(
            "SELECT request_id FROM {db}.usage_sampled FINAL WHERE sample_reason = 'top_fraction'")}
        warm = {e["request_id"] for e in events[N // 20:]}  # after warm-up (first 5%)
        share = len(kept & warm) / len(warm)
        by_model: dict[str, list] = {}
        for e in events[N // 20:]:
            by_model.setdefault(e["model"], []).append(e)
        top = set()
        for model_events in by_model.values():
            ordered = sorted(model_events, key=lambda e: e["total_tokens"], reverse=True)
            cut = ordered[int(len(ordered) * s.sample_fraction)]["total_tokens"]
            top |= {e["request_id"] for e in model_events if e["total_tokens"] > cut}
        recall = len(kept & top) / len(top)
        print(f"RESULT sampled_share={share:.4f} (target {s.sample_fraction})")
        print(f"RESULT sampled_recall_true_top={recall:.4f}")
        stop.set()
        thread.join(30)
        store.close()
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
