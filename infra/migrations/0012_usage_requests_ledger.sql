-- Issue 15: the ledger, one row per token-usage event (every request, not the sampled 10%), so
-- "every call of client X from IP Y last month" and "what happened to request R" can be
-- answered for as long as TOKENAUDIT_TTL_REQUESTS_DAYS keeps it (re-applied by every migrate).
-- The sink writes it straight from the token-usage topic. Copies of an event (producer retries,
-- spool replays) carry the same bytes, so the same sorting key: the ReplacingMergeTree keeps one
-- (queries read with FINAL or count uniqExact(event_id)). Types and codecs are chosen for size
-- (bench/bench_ledger.py measures bytes per row): low-cardinality strings as dictionaries, counts
-- as narrow integers with T64, times with DoubleDelta, latencies as Float32 (a 24-bit mantissa is
-- finer than the clock that measured them), everything through ZSTD. request_id is '' when it is
-- the event id's hex (the app's default when the client sent no X-Request-ID): the queries put it
-- back, and the random half of a UUID is stored once instead of twice.
CREATE TABLE IF NOT EXISTS {db}.usage_requests
(
    client_id                LowCardinality(String),
    ts                       DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    event_id                 UUID CODEC(ZSTD(1)),
    request_id               String CODEC(ZSTD(1)),
    instance                 LowCardinality(String),
    department               LowCardinality(String),
    api_key_id               LowCardinality(String),
    client_ip                String CODEC(ZSTD(1)),
    method                   LowCardinality(String),
    path                     LowCardinality(String),
    status_code              UInt16 CODEC(T64, ZSTD(1)),
    error_type               LowCardinality(String),
    model                    LowCardinality(String),
    input_tokens             UInt32 CODEC(T64, ZSTD(1)),
    untruncated_input_tokens UInt32 CODEC(T64, ZSTD(1)),
    output_tokens            UInt32 CODEC(T64, ZSTD(1)),
    total_tokens             UInt32 CODEC(T64, ZSTD(1)),
    truncated                Bool CODEC(ZSTD(1)),
    latency_ms               Float32 CODEC(ZSTD(1)),
    queue_ms                 Float32 CODEC(ZSTD(1)),
    inference_ms             Float32 CODEC(ZSTD(1)),
    ttft_ms                  Nullable(Float32) CODEC(ZSTD(1)),
    batch_id                 String CODEC(ZSTD(1)),
    batch_size               UInt16 CODEC(T64, ZSTD(1)),
    position_in_batch        Int16 CODEC(T64, ZSTD(1)),  -- -1: not batched (a request without a model run)
    finish_reason            LowCardinality(String),
    INDEX event_id_idx event_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX request_id_idx request_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (client_id, ts, event_id);
