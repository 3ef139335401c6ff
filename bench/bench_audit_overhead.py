"""Audit overhead: the same app with the audit layer on and off, under concurrent load.

Two `uvicorn` app processes (identical settings, XLA-compiled tiny T5, one with the audit layer
and a real Kafka broker receiving its events, one without the layer) are driven alternately in
rounds by one async load generator at concurrency 16; rounds alternate the order so drift and
neighbours' noise hit both sides. Prints p50/p99 latency and throughput ratios (on / off).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONCURRENCY = 16
ROUND_SECONDS = 6.0
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))


def serve(mode: str, port: int) -> None:
    """Child process: run the app with the audit layer on or off."""
    import uvicorn

    from tokenaudit.inference.app import create_app
    from tokenaudit.settings import load_settings

    app = create_app(load_settings(), audit=(mode == "on"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(url: str, seconds: float) -> tuple[list[float], int]:
    import httpx

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(w: int):
            i = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/generate", json={"prompt": f"client {w} request {i} audit", "max_new_tokens": 4}
                )
                latencies.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text
                i += 1

        start = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(CONCURRENCY)])
        elapsed = time.perf_counter() - start
    return latencies, int(len(latencies) / elapsed * 1000)  # throughput in req/ms*1000 = req/s*1000


def wait_ready(url: str, proc, timeout: float = 240) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def main() -> None:
    from tests.support.apps import cached_model
    from tokenaudit.infra.kafka_admin import ensure_topics
    from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
    from tokenaudit.infra.procutil import free_port
    from tokenaudit.settings import load_settings

    s = load_settings()
    model = cached_model("t5", s.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        broker = KafkaBroker(
            BrokerConfig(
                home=Path(tmp) / "kafka",
                cache_dir=s.cache_dir,
                version=s.kafka_version,
                port=free_port(),
                controller_port=free_port(),
                heap="384m",
            )
        )
        broker.start()
        procs = {}
        try:
            ensure_topics(broker.bootstrap, {"bench-audit": 4})
            urls = {}
            for mode in ("on", "off"):
                port = free_port()
                env = {
                    **os.environ,
                    "TOKENAUDIT_DATA_DIR": f"{tmp}/data-{mode}",
                    "TOKENAUDIT_MODEL": str(model),
                    "TOKENAUDIT_KAFKA_BOOTSTRAP": broker.bootstrap,
                    "TOKENAUDIT_TOPIC_USAGE": "bench-audit",
                    "TOKENAUDIT_XLA": "true",
                    "TOKENAUDIT_XLA_BATCH_BUCKETS": "16",
                    "TOKENAUDIT_XLA_LENGTH_BUCKETS": "32",
                    "TOKENAUDIT_XLA_NEW_TOKEN_BUCKETS": "4",
                    "TOKENAUDIT_MAX_INPUT_TOKENS": "32",
                    "TOKENAUDIT_MAX_NEW_TOKENS_LIMIT": "4",
                    "TOKENAUDIT_BATCH_MAX_SIZE": "16",
                    "TOKENAUDIT_BATCH_MAX_WAIT_MS": "2",
                    **(
                        {"TOKENAUDIT_PRODUCER_LINGER_MS": os.environ["BENCH_LINGER_MS"]}
                        if "BENCH_LINGER_MS" in os.environ
                        else {}
                    ),
                }
                procs[mode] = subprocess.Popen(
                    [sys.executable, __file__, "--serve", mode, str(port)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                urls[mode] = f"http://127.0.0.1:{port}"
            for mode in procs:
                wait_ready(urls[mode], procs[mode])
            for mode in procs:  # warm connections and the batcher
                asyncio.run(load(urls[mode], 1.0))
            lat = {"on": [], "off": []}
            count = {"on": 0, "off": 0}
            seconds = {"on": 0.0, "off": 0.0}
            for r in range(ROUNDS):
                for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    t0 = time.perf_counter()
                    values, _ = asyncio.run(load(urls[mode], ROUND_SECONDS))
                    seconds[mode] += time.perf_counter() - t0
                    lat[mode] += values
                    count[mode] += len(values)
            for mode in ("on", "off"):
                print(f"RESULT audit_{mode}_p50_ms={statistics.median(lat[mode]):.2f}")
                print(f"RESULT audit_{mode}_p99_ms={percentile(lat[mode], 0.99):.2f}")
                print(f"RESULT audit_{mode}_rps={count[mode] / seconds[mode]:.1f}")
            print(f"RESULT audit_p50_ratio={statistics.median(lat['on']) / statistics.median(lat['off']):.3f}")
            print(f"RESULT audit_p99_ratio={percentile(lat['on'], 0.99) / percentile(lat['off'], 0.99):.3f}")
            print(
                f"RESULT audit_throughput_ratio={(count['on'] / seconds['on']) / (count['off'] / seconds['off']):.3f}"
            )
            import httpx

            metrics = httpx.get(urls["on"] + "/metrics").text
            produced = [line for line in metrics.splitlines() if line.startswith("tokenaudit_events_enqueued_total")]
            print(f"RESULT audit_on_events_enqueued={produced[0].split()[-1] if produced else 'n/a'}")
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(60)
            broker.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
