"""Generation: micro-batching vs one request at a time at concurrency 16, XLA-compiled vs eager
generation, non-streamed throughput through ``generate`` (what the app uses for them) vs the
step-wise loop (what streamed batches use), and for streamed requests the time to first token
against the total latency at concurrency 1 and 16.

In-process (runner + micro-batcher, no HTTP) so that only generation is compared; both sides of
each ratio run back to back in this one process. The tiny T5 on CPU: a model step costs a few
hundred microseconds here, so the step-wise loop's fixed cost per token (one compiled call and
its TF dispatch, ~0.5-1 ms) dominates it; with a real model the step itself dominates.
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
STREAM_TOKENS = 32


def prompts(n: int) -> list[str]:
    words = [
        "audit",
        "token",
        "usage",
        "model",
        "kafka",
        "stream",
        "window",
        "client",
        "department",
        "latency",
        "spool",
    ]
    return [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 8)) for i in range(n)]


async def drive(
    batcher, n: int, concurrency: int = CONCURRENCY, new: int = NEW_TOKENS, stream: bool = False
) -> tuple[float, list[float], list[float]]:
    """``n`` requests from ``concurrency`` clients; (requests/s, total latencies ms, time to first
    token ms: streamed requests only, measured where the handler gets the tokens)."""
    from tokenaudit.inference.streaming import TokenStream

    runner = batcher.runner
    items = [runner.tokenize(p) for p in prompts(n)]
    queue: asyncio.Queue = asyncio.Queue()
    for e in items:
        queue.put_nowait(e)
    latencies: list[float] = []
    firsts: list[float] = []
    loop = asyncio.get_running_loop()

    async def client():
        while not queue.empty():
            e = queue.get_nowait()
            t0 = time.perf_counter()
            if not stream:
                await batcher.submit(e, new)
            else:
                tokens = TokenStream(loop)
                job = asyncio.ensure_future(batcher.submit(e, new, tokens))
                job.add_done_callback(tokens.end)
                await tokens.take()
                firsts.append((time.perf_counter() - t0) * 1000)
                while await tokens.take():
                    pass
                await job
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return n / (time.perf_counter() - t0), latencies, firsts


def run(runner, max_size: int, n: int, stepwise: bool = False, **kwargs) -> tuple[float, list[float], list[float], int]:
    """``stepwise``: every batch through the step-wise loop, as a streamed batch goes (the
    "after" side, had non-streamed requests been moved to the loop too)."""
    from tokenaudit.inference.batcher import MicroBatcher

    class Stepwise(MicroBatcher):
        def _run(self, batch):
            self._run_stepwise(batch)

    batcher = (Stepwise if stepwise else MicroBatcher)(runner, max_size=max_size, max_wait_ms=5).start()
    try:
        rps, lat, firsts = asyncio.run(drive(batcher, n, **kwargs))
        return rps, lat, firsts, batcher.batches
    finally:
        batcher.stop()


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    from tests.support.apps import cached_model
    from tokenaudit.inference.runner import ModelRunner
    from tokenaudit.settings import load_settings

    path = str(cached_model("t5", load_settings().cache_dir))
    eager = ModelRunner(path, max_input_tokens=32).load()
    eager.generate(["warm up"], [2])

    batched_rps, batched_lat, _, batches = run(eager, CONCURRENCY, 64)
    single_rps, single_lat, _, _ = run(eager, 1, 24, concurrency=CONCURRENCY)
    print(f"RESULT eager_batched_rps={batched_rps:.2f}  # {batches} generate calls for 64 requests")
    print(f"RESULT eager_one_at_a_time_rps={single_rps:.2f}")
    print(f"RESULT batching_speedup_c16={batched_rps / single_rps:.2f}")
    print(f"RESULT eager_batched_p50_ms={p50(batched_lat):.1f}")
    print(f"RESULT eager_one_at_a_time_p50_ms={p50(single_lat):.1f}")

    xla = ModelRunner(
        path,
        max_input_tokens=32,
        xla=True,
        batch_buckets="1,16",
        length_buckets="32",
        new_token_buckets=f"{NEW_TOKENS},{STREAM_TOKENS}",
        max_batch=CONCURRENCY,
        max_new_tokens_limit=STREAM_TOKENS,
    ).load()
    t0 = time.perf_counter()
    xla.warmup()
    compile_s = time.perf_counter() - t0
    xla_rps, xla_lat, _, _ = run(xla, CONCURRENCY, 256)
    xla_single_rps, _, _, _ = run(xla, 1, 128)

    def one_call(r, n=5):
        t = time.perf_counter()
        for _ in range(n):
            r.generate(["a single request"], [NEW_TOKENS])
        return (time.perf_counter() - t) / n * 1000

    xla_ms, eager_ms = one_call(xla, 20), one_call(eager, 3)
    print(
        f"RESULT xla_compile_s={compile_s:.1f}  # batch 1 and 16, length 32, {NEW_TOKENS} new tokens: "
        f"generate, and the step-wise prefill and step"
    )
    print(f"RESULT xla_batched_rps={xla_rps:.1f}")
    print(f"RESULT xla_one_at_a_time_rps={xla_single_rps:.1f}")
    print(f"RESULT xla_batching_speedup_c16={xla_rps / xla_single_rps:.2f}")
    print(f"RESULT xla_batched_p50_ms={p50(xla_lat):.1f}")
    print(f"RESULT xla_vs_eager_throughput_c16={xla_rps / batched_rps:.1f}")
    print(f"RESULT single_request_ms_xla={xla_ms:.1f}")
    print(f"RESULT single_request_ms_eager={eager_ms:.1f}")
    print(f"RESULT xla_vs_eager_single_request_speedup={eager_ms / xla_ms:.1f}")

    # streamed requests: time to first token against total latency (STREAM_TOKENS each; the
    # 32-token bucket compiles here, outside the timings)
    run(xla, CONCURRENCY, CONCURRENCY, new=STREAM_TOKENS, stream=True)
    run(xla, 1, 2, concurrency=1, new=STREAM_TOKENS, stream=True)
    for concurrency, n in ((1, 48), (CONCURRENCY, 256)):
        rps, lat, firsts, _ = run(xla, CONCURRENCY, n, concurrency=concurrency, new=STREAM_TOKENS, stream=True)
        print(f"RESULT stream_c{concurrency}_ttft_p50_ms={p50(firsts):.1f}")
        print(f"RESULT stream_c{concurrency}_total_p50_ms={p50(lat):.1f}  # {STREAM_TOKENS} tokens each")
        print(f"RESULT stream_c{concurrency}_ttft_share_of_total={p50(firsts) / p50(lat):.3f}")
        print(f"RESULT stream_c{concurrency}_rps={rps:.1f}")

    # non-streamed throughput, before (generate: still what non-streamed batches use) and after
    # the step-wise loop were used for them, side by side, twice each in alternation
    gen, loop = [], []
    for _ in range(2):
        gen.append(run(xla, CONCURRENCY, 256)[0])
        loop.append(run(xla, CONCURRENCY, 256, stepwise=True)[0])
    print(f"RESULT nonstream_generate_rps_c16={max(gen):.1f}  # {NEW_TOKENS} tokens each; what the app uses")
    print(f"RESULT nonstream_stepwise_rps_c16={max(loop):.1f}  # the same requests through the step-wise loop")
    print(f"RESULT nonstream_generate_vs_stepwise={max(gen) / max(loop):.2f}")


if __name__ == "__main__":
    main()
