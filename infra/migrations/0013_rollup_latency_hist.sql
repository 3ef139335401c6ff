-- Issue 15: each rollup row carries a sparse 2-D latency histogram (input-token bucket x
-- log-spaced latency bucket, 1 ms to 60 s: schemas/latency_hist.py), cell -> requests, so the
-- latency report gets p50/p95/p99 over all requests of any range and grouping (sumMap), not
-- over the sampled top 10%. Rows written before it have an empty map: their requests are
-- reported as not covered, never guessed.
ALTER TABLE {db}.usage_rollup ADD COLUMN IF NOT EXISTS latency_hist Map(UInt16, UInt64) CODEC(ZSTD(1));
