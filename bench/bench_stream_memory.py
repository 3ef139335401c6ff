"""Worker RSS with 100k distinct clients in flight (target < 600 MB), and its growth over a
longer run in which windows close and retire (must stay flat); then RSS at the 30k events/s
live shape (60 s windows, 10 s grace: ~2 million event ids in flight) with deduplication off
and on, side by side over the same topic (target < 600 MB with it on).

Starts its own broker; the worker runs as a subprocess; its /metrics page tells when it has
caught up. Prints RESULT lines.
Usage: python bench/bench_stream_memory.py [clients] [rounds] [live_seconds] (0 skips a part)
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the suite's helpers

import httpx

from tests.support import synth
from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import EVENT
from tokenaudit.schemas.compiled import compile_encoder
from tokenaudit.settings import load_settings
from tokenaudit.streams.app import ensure_worker_topics

CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
LIVE_SECONDS = int(sys.argv[3]) if len(sys.argv) > 3 else 150
LIVE_RATE = 30_000  # events per second of event time
WINDOW_MS = 60_000
T0 = (int(time.time() * 1000) - 86_400_000) // WINDOW_MS * WINDOW_MS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(port: int, name: str) -> int:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return -1
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return -1


def round_events(r: int) -> list[dict]:
    base = T0 + r * WINDOW_MS
    return [
        synth.event(
            f"r{r}-{i}",
            base + (i * 50_000) // CLIENTS,
            f"client-{i}",
            "t5-tiny",
            input_tokens=20 + i % 200,
            output_tokens=10,
        )
        for i in range(CLIENTS)
    ]


def live_records(seconds: int, start_ms: int):
    """(key, value) of the live shape: 2000 clients x 3 models, event time at LIVE_RATE/s with
    +-500 ms jitter, each event with its own event id; encoded as produced (millions of them)."""
    encode = compile_encoder(EVENT)
    rnd = random.Random(1)
    for i in range(seconds * LIVE_RATE):
        ts = start_ms + i * 1000 // LIVE_RATE + rnd.randint(-500, 500)
        ev = synth.event(
            f"l{i}",
            ts,
            f"client-{rnd.randrange(2000)}",
            f"model-{rnd.randrange(3)}",
            input_tokens=rnd.randint(1, 400),
            output_tokens=rnd.randint(1, 64),
        )
        yield ev["client_id"].encode(), encode(ev)


def live_shape(broker: KafkaBroker, tmp: Path) -> None:
    n = LIVE_SECONDS * LIVE_RATE
    topic = "bench-mem-live"
    base_env = {
        "TOKENAUDIT_KAFKA_BOOTSTRAP": broker.bootstrap,
        "TOKENAUDIT_DATA_DIR": str(tmp / "data-live"),
        "TOKENAUDIT_WINDOW_SECONDS": "60",
        "TOKENAUDIT_GRACE_SECONDS": "10",
        "TOKENAUDIT_LATE_RETENTION_SECONDS": "60",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "600",
        "TOKENAUDIT_KAFKA_PARTITIONS": "4",
        "TOKENAUDIT_TOPIC_USAGE": topic,
    }
    s = load_settings(**{k[len("TOKENAUDIT_") :].lower(): v for k, v in base_env.items()})
    ensure_worker_topics(s)
    started = time.monotonic()
    synth.produce(broker.bootstrap, topic, live_records(LIVE_SECONDS, T0), raw=True)
    print(f"RESULT live_produced_events={n} in {time.monotonic() - started:.0f} s", flush=True)
    peaks = {}
    for dedup in (False, True):
        label = "dedup_on" if dedup else "dedup_off"
        port = free_port()
        env = dict(
            base_env,
            TOKENAUDIT_WORKER_ID=f"bench-mem-live-{label}",
            TOKENAUDIT_WORKER_WEB_PORT=str(port),
            TOKENAUDIT_DEDUP=str(dedup).lower(),
            **{
                f"TOKENAUDIT_TOPIC_{t.upper()}": f"{topic}-{label}-{t}"
                for t in ("anomalies", "dlq", "rollups", "sampled")
            },
        )
        ensure_worker_topics(load_settings(**{k[len("TOKENAUDIT_") :].lower(): v for k, v in env.items()}))
        worker = subprocess.Popen(
            [sys.executable, "-m", "tokenaudit.streams.app"],
            env=dict(os.environ, **env),
            stdout=open(tmp / f"worker-live-{label}.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            peak, began, deadline = 0.0, time.monotonic(), time.monotonic() + 900
            while metric(port, "tokenaudit_worker_events_total") < n and time.monotonic() < deadline:
                peak = max(peak, rss_mb(worker.pid))
                time.sleep(1)
            took = time.monotonic() - began
            time.sleep(3)
            end = rss_mb(worker.pid)
            peak = max(peak, end)
            peaks[dedup] = peak
            print(
                f"RESULT live_{label}_worker_rss_peak_mb={peak:.0f} end_mb={end:.0f} "
                f"state_keys={metric(port, 'tokenaudit_worker_state_keys')} "
                f"duplicates={metric(port, 'tokenaudit_worker_duplicates_total')} "
                f"catch_up_s={took:.0f}",
                flush=True,
            )
        finally:
            worker.terminate()
            worker.wait(30)
    print(
        f"RESULT live_worker_rss_peak_mb_dedup_off={peaks[False]:.0f} dedup_on={peaks[True]:.0f} "
        f"(+{peaks[True] - peaks[False]:.0f} MB for ~{(s.window_seconds + s.grace_seconds) * LIVE_RATE / 1e6:.1f}M "
        f"ids in flight; target < 600)",
        flush=True,
    )


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-mem-"))
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
    try:
        if CLIENTS and ROUNDS:
            clients_shape(broker, tmp)
        if LIVE_SECONDS:
            live_shape(broker, tmp)
    finally:
        broker.stop()


def clients_shape(broker: KafkaBroker, tmp: Path) -> None:
    port = free_port()
    env = {
        "TOKENAUDIT_KAFKA_BOOTSTRAP": broker.bootstrap,
        "TOKENAUDIT_DATA_DIR": str(tmp / "data"),
        "TOKENAUDIT_WORKER_ID": "bench-mem",
        "TOKENAUDIT_WINDOW_SECONDS": "60",
        "TOKENAUDIT_GRACE_SECONDS": "5",
        "TOKENAUDIT_LATE_RETENTION_SECONDS": "60",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "600",
        "TOKENAUDIT_WORKER_WEB_PORT": str(port),
        "TOKENAUDIT_KAFKA_PARTITIONS": "4",
    }
    s = load_settings(**{k[len("TOKENAUDIT_") :].lower(): v for k, v in env.items()})
    ensure_worker_topics(s)
    worker = subprocess.Popen(
        [sys.executable, "-m", "tokenaudit.streams.app"],
        env=dict(os.environ, **env),
        stdout=open(tmp / "worker.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(3)
        idle_rss = rss_mb(worker.pid)
        print(f"RESULT worker_rss_idle_mb={idle_rss:.0f}", flush=True)
        samples, block_samples = [], []
        for r in range(ROUNDS + 1):
            synth.produce(broker.bootstrap, s.topic_usage, round_events(r))
            target = CLIENTS * (r + 1)
            deadline = time.monotonic() + 300
            while metric(port, "tokenaudit_worker_events_total") < target and time.monotonic() < deadline:
                time.sleep(1)
            time.sleep(3)  # a commit interval, so retirement can happen
            rss = rss_mb(worker.pid)
            keys = metric(port, "tokenaudit_worker_state_keys")
            blocks = metric(port, "tokenaudit_worker_python_allocated_blocks")
            samples.append(rss)
            block_samples.append(blocks)
            label = "in_flight" if r == 0 else f"round{r}"
            print(f"RESULT worker_rss_{label}_mb={rss:.0f} state_keys={keys} python_blocks={blocks}", flush=True)
        # Round 1 is the first with closing and retiring; the allocator's footprint settles
        # over the next round (freed blocks are reused, RSS rarely shrinks), so growth is
        # measured from round 2 on, next to the live Python blocks (a leak would grow those).
        print(f"RESULT worker_rss_100k_clients_mb={samples[0]:.0f} (target < 600)")
        if len(samples) > 3:
            growth = samples[-1] - samples[2]
            blocks = (block_samples[-1] - block_samples[2]) / max(block_samples[2], 1)
            print(
                f"RESULT worker_rss_growth_mb_from_round2={growth:.0f} over {ROUNDS - 2} more rounds "
                f"of {CLIENTS} events (target: flat)"
            )
            print(f"RESULT worker_python_blocks_growth_from_round2={blocks:+.1%}")
    finally:
        worker.terminate()
        worker.wait(30)


if __name__ == "__main__":
    main()
