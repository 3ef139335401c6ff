"""Worker RSS with 100k distinct clients in flight (target < 600 MB), and its growth over a
longer run in which windows close and retire (must stay flat).

Starts its own broker; the worker runs as a subprocess; its /metrics page tells when it has
caught up. Prints RESULT lines. Usage: python bench/bench_stream_memory.py [clients] [rounds]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.procutil import free_port
from tokenaudit.settings import load_settings
from tokenaudit.streams import synth
from tokenaudit.streams.app import ensure_worker_topics

CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 6
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
    return [synth.event(f"r{r}-{i}", base + (i * 50_000) // CLIENTS, f"client-{i}", "t5-tiny",
                        input_tokens=20 + i % 200, output_tokens=10) for i in range(CLIENTS)]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    base = load_settings()
    broker = KafkaBroker(BrokerConfig(home=tmp / "kafka", cache_dir=base.cache_dir, version=base.kafka_version,
                                      port=free_port(), controller_port=free_port(), heap="512m"))
    broker.start()
    port = free_port()
    env = {"TOKENAUDIT_KAFKA_BOOTSTRAP": broker.bootstrap, "TOKENAUDIT_DATA_DIR": str(tmp / "data"),
           "TOKENAUDIT_WORKER_ID": "bench-mem", "TOKENAUDIT_WINDOW_SECONDS": "60", "TOKENAUDIT_GRACE_SECONDS": "5",
           "TOKENAUDIT_LATE_RETENTION_SECONDS": "60", "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "600",
           "TOKENAUDIT_WORKER_WEB_PORT": str(port), "TOKENAUDIT_KAFKA_PARTITIONS": "4"}
    s = load_settings(**{k[len("TOKENAUDIT_"):].lower(): v for k, v in env.items()})
    ensure_worker_topics(s)
    worker = subprocess.Popen([sys.executable, "-m", "tokenaudit.streams.app"], env=dict(os.environ, **env),
                              stdout=open(tmp / "worker.log", "wb"), stderr=subprocess.STDOUT)
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
            print(f"RESULT worker_rss_growth_mb_from_round2={growth:.0f} over {ROUNDS - 2} more rounds "
                  f"of {CLIENTS} events (target: flat)")
            print(f"RESULT worker_python_blocks_growth_from_round2={blocks:+.1%}")
    finally:
        worker.terminate()
        worker.wait(30)
        broker.stop()


if __name__ == "__main__":
    main()
