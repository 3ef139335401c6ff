"""Generation throughput: micro-batching vs one request at a time at concurrency 16, and
XLA-compiled vs eager generation. In-process (runner + micro-batcher, no HTTP) so that only
generation is compared; both sides of each ratio run back to back in this one process.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONCURRENCY = 16
NEW_TOKENS = 8


def prompts(n: int) -> list[str]:
    words = "audit token usage model kafka stream window client department latency spool".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 8)) for i in range(n)]


async def drive(batcher, n: int) -> tuple[float, list[float]]:
    """``n`` requests from CONCURRENCY concurrent clients; returns (requests/s, latencies ms)."""
    items = prompts(n)
    queue: asyncio.Queue = asyncio.Queue()
    for p in items:
        queue.put_nowait(p)
    latencies: list[float] = []

    async def client():
        while not queue.empty():
            p = queue.get_nowait()
            t0 = time.perf_counter()
            await batcher.submit(p, NEW_TOKENS)
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(CONCURRENCY)])
    return n / (time.perf_counter() - t0), latencies


def run(runner, max_size: int, n: int) -> tuple[float, list[float], int]:
    from tokenaudit.inference.batcher import MicroBatcher

    batcher = MicroBatcher(runner, max_size=max_size, max_wait_ms=5).start()
    try:
        rps, lat = asyncio.run(drive(batcher, n))
        return rps, lat, batcher.batches
    finally:
        batcher.stop()


def main() -> None:
    from tokenaudit.inference.runner import ModelRunner
    from tests.support.apps import cached_model
    from tokenaudit.settings import load_settings

    path = str(cached_model("t5", load_settings().cache_dir))
    eager = ModelRunner(path, max_input_tokens=32).load()
    eager.generate(["warm up"], [2])

    batched_rps, batched_lat, batches = run(eager, CONCURRENCY, 64)
    single_rps, single_lat, _ = run(eager, 1, 24)
    print(f"RESULT eager_batched_rps={batched_rps:.2f}  # {batches} generate calls for 64 requests")
    print(f"RESULT eager_one_at_a_time_rps={single_rps:.2f}")
    print(f"RESULT batching_speedup_c16={batched_rps / single_rps:.2f}")
    print(f"RESULT eager_batched_p50_ms={statistics.median(batched_lat):.1f}")
    print(f"RESULT eager_one_at_a_time_p50_ms={statistics.median(single_lat):.1f}")

    xla = ModelRunner(path, max_input_tokens=32, xla=True, batch_buckets="1,16", length_buckets="32",
                      new_token_buckets=str(NEW_TOKENS), max_batch=CONCURRENCY,
                      max_new_tokens_limit=NEW_TOKENS).load()
    t0 = time.perf_counter()
    xla.warmup()
    compile_s = time.perf_counter() - t0
    xla_rps, xla_lat, _ = run(xla, CONCURRENCY, 256)
    xla_single_rps, _, _ = run(xla, 1, 128)

    def one_call(r, n=5):
        t = time.perf_counter()
        for _ in range(n):
            r.generate(["a single request"], [NEW_TOKENS])
        return (time.perf_counter() - t) / n * 1000

    xla_ms, eager_ms = one_call(xla, 20), one_call(eager, 3)
    print(f"RESULT xla_compile_s={compile_s:.1f}  # 2 buckets: batch 1 and 16, length 32, {NEW_TOKENS} new tokens")
    print(f"RESULT xla_batched_rps={xla_rps:.1f}")
    print(f"RESULT xla_one_at_a_time_rps={xla_single_rps:.1f}")
    print(f"RESULT xla_batching_speedup_c16={xla_rps / xla_single_rps:.2f}")
    print(f"RESULT xla_batched_p50_ms={statistics.median(xla_lat):.1f}")
    print(f"RESULT xla_vs_eager_throughput_c16={xla_rps / batched_rps:.1f}")
    print(f"RESULT single_request_ms_xla={xla_ms:.1f}")
    print(f"RESULT single_request_ms_eager={eager_ms:.1f}")
    print(f"RESULT xla_vs_eager_single_request_speedup={eager_ms / xla_ms:.1f}")


if __name__ == "__main__":
    main()
