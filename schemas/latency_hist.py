"""The rollups' latency histogram: a sparse 2-D count of requests by input-token bucket and
end-to-end latency bucket, one per window (usage_rollup schema v4, ClickHouse
``usage_rollup.latency_hist``).

Why histograms: a mean and a max cannot be combined into a p95, and percentiles of the sampled
top 10% describe the biggest requests, not the traffic. Counts over fixed bounds add up across
windows, clients and models, so any range and any grouping gets p50/p95/p99 over all requests,
exact to the bucket.

Latency bounds are log-spaced, four per doubling from 1 ms (2^(k/4) ms), in the style of the
OpenTelemetry exponential and vLLM buckets, up to 60 s; a bucket is (previous bound, bound],
bucket 0 is [0, 1 ms], and the last one holds everything over 60 s. Adjacent bounds are 19%
apart, which is how far a percentile read from them can be from the exact one. Input-token
buckets are those of the latency report: 1-16, then powers of two (17-32, 33-64, ...).

A cell is ``input_bucket * CELLS_PER_INPUT + latency_bucket``; the wire form (an Avro string,
so the fast flat codecs keep reading the rollup) is ``"cell:count,cell:count"``, cells in
ascending order, so a window's content always encodes to the same text.
"""

from __future__ import annotations

from bisect import bisect_left

#: upper bounds in ms: 2^(k/4) for k = 0..63 (1 ms .. ~55 s), then 60 s
LATENCY_BOUNDS_MS: tuple[float, ...] = (*(round(2 ** (k / 4), 4) for k in range(64)), 60_000.0)
LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1  # the last: over 60 s
CELLS_PER_INPUT = 100  # > LATENCY_BUCKETS: a cell's two parts read off in decimal


def input_bucket(input_tokens: int) -> int:
    """0 for 1-16 tokens (and 0), then 1 for 17-32, 2 for 33-64, ..."""
    return 0 if input_tokens <= 16 else (input_tokens - 1).bit_length() - 4


def input_range(bucket: int) -> str:
    """The report's label of an input bucket: ``1-16``, ``17-32``, ..."""
    if bucket == 0:
        return "1-16"
    upper = 1 << (bucket + 4)
    return f"{upper // 2 + 1}-{upper}"


def cell(input_tokens: int, latency_ms: float) -> int:
    return input_bucket(input_tokens) * CELLS_PER_INPUT + bisect_left(LATENCY_BOUNDS_MS, latency_ms)


def latency_range(bucket: int) -> tuple[float, float]:
    """(lower, upper] of a latency bucket in ms (the last one's upper is infinity)."""
    lower = 0.0 if bucket == 0 else LATENCY_BOUNDS_MS[bucket - 1]
    upper = LATENCY_BOUNDS_MS[bucket] if bucket < len(LATENCY_BOUNDS_MS) else float("inf")
    return lower, upper


def encode(hist: dict[int, int]) -> str:
    return ",".join(f"{c}:{n}" for c, n in sorted(hist.items()))


def decode(text: str | None) -> dict[int, int]:
    """The counts of a wire form (''/None: none); malformed text raises ValueError."""
    if not text:
        return {}
    out: dict[int, int] = {}
    for item in text.split(","):
        c, _, n = item.partition(":")
        out[int(c)] = out.get(int(c), 0) + int(n)
    return out


def add(into: dict[int, int], other: dict[int, int]) -> dict[int, int]:
    for c, n in other.items():
        into[c] = into.get(c, 0) + n
    return into


def quantile_bucket(counts: dict[int, int], q: float) -> int:
    """The latency bucket holding the ``q`` quantile of ``counts`` (bucket -> n): the value at
    0-based position floor(q * n) of the sorted requests, as ClickHouse's quantileExact picks it."""
    total = sum(counts.values())
    rank = min(total, int(q * total) + 1)  # 1-based
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return bucket
    raise ValueError("empty histogram")
