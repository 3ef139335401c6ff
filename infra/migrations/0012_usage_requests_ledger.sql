-- Issue 15: the ledger, one row per token-usage event (every request, not the sampled 10%), so
-- "every call of client X from IP Y last month" and "what happened to request R" can be
-- answered for as long as TOKENAUDIT_TTL_REQUESTS_DAYS keeps it (re-applied by every migrate).
-- The sink writes it straight from the token-usage topic. Copies of an event (producer retries,
-- spool replays) carry the same bytes, so the same sorting key: the ReplacingMergeTree keeps one
-- (queries read with FINAL or count uniqExact(event_id_hi, event_id_lo)). Types and codecs are chosen for size
-- (bench/bench_ledger.py measures bytes per row): low-cardinality strings as dictionaries, counts
-- as narrow integers with T64, times with Delta, latencies as whole hundredths of a millisecond
-- (10 us steps, UInt32 with T64: a Float32's low mantissa bits are noise that no codec shrinks;
-- `latency_ms` and the others are ALIAS columns in ms), everything through ZSTD. The event id (UUIDv7) is stored as
-- its two 64-bit halves: the high one is its millisecond time, nearly sorted like ts, which Delta
-- shrinks to a few bytes, where a UUID column stays ~15 bytes (ZSTD finds nothing to share in it);
-- `event_id` is the UUID again, as an ALIAS, for anyone's SQL. request_id is '' when it is the
-- event id's hex (the app's default when the client sent no X-Request-ID): the queries put it
-- back, and the random half of a UUID is stored once instead of twice.
CREATE TABLE IF NOT EXISTS {db}.usage_requests
(
    client_id                LowCardinality(String),
    ts                       DateTime64(3, 'UTC') CODEC(Delta, ZSTD(1)),
    event_id_hi              UInt64 CODEC(Delta, ZSTD(1)),
    event_id_lo              UInt64 CODEC(ZSTD(1)),
    event_id                 UUID ALIAS toUUID(UUIDNumToString(toFixedString(concat(
                                 reverse(reinterpretAsString(event_id_hi)),
                                 reverse(reinterpretAsString(event_id_lo))), 16))),
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
    latency_ms_x100          UInt32 CODEC(T64, ZSTD(1)),
    queue_ms_x100            UInt32 CODEC(T64, ZSTD(1)),
    inference_ms_x100        UInt32 CODEC(T64, ZSTD(1)),
    ttft_ms_x100             Nullable(UInt32) CODEC(ZSTD(1)),
    latency_ms               Float64 ALIAS latency_ms_x100 / 100,
    queue_ms                 Float64 ALIAS queue_ms_x100 / 100,
    inference_ms             Float64 ALIAS inference_ms_x100 / 100,
    ttft_ms                  Nullable(Float64) ALIAS ttft_ms_x100 / 100,
    batch_id                 String CODEC(ZSTD(1)),
    batch_size               UInt16 CODEC(T64, ZSTD(1)),
    position_in_batch        Int16 CODEC(T64, ZSTD(1)),  -- -1: not batched (a request without a model run)
    finish_reason            LowCardinality(String),
    INDEX event_id_idx event_id_lo TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX request_id_idx request_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (client_id, ts, event_id_hi, event_id_lo);
