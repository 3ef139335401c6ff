-- Tables named in shared/DESIGN.md (contract). ReplacingMergeTree keyed by the natural key:
-- a replayed insert of the same key is a no-op for every query that reads with FINAL (or
-- through the views below), which is how sink writes stay idempotent.
CREATE TABLE IF NOT EXISTS {db}.usage_rollup
(
    client_id        String,
    department       LowCardinality(String),
    model            LowCardinality(String),
    window_start     DateTime64(3, 'UTC'),
    window_end       DateTime64(3, 'UTC'),
    requests         UInt64,
    errors           UInt64,
    input_tokens     UInt64,
    output_tokens    UInt64,
    total_tokens     UInt64,
    latency_ms_sum   Float64,
    latency_ms_max   Float64,
    max_input_tokens UInt64,
    truncated        UInt64,
    version          UInt64,
    emitted_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (client_id, model, window_start);
--;;
CREATE TABLE IF NOT EXISTS {db}.usage_sampled
(
    request_id     String,
    ts             DateTime64(3, 'UTC'),
    client_id      String,
    department     LowCardinality(String),
    model          LowCardinality(String),
    input_tokens   UInt64,
    output_tokens  UInt64,
    total_tokens   UInt64,
    untruncated_input_tokens UInt64,
    truncated      UInt8,
    latency_ms     Float64,
    queue_ms       Float64,
    inference_ms   Float64,
    status_code    UInt16,
    path           LowCardinality(String),
    error_type     LowCardinality(String),
    batch_size     UInt32,
    device         LowCardinality(String),
    prompt_digest  String,
    sample_reason  LowCardinality(String),
    threshold      Float64,
    inserted_at    DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (client_id, request_id);
--;;
CREATE TABLE IF NOT EXISTS {db}.anomalies
(
    anomaly_id    String,
    ts            DateTime64(3, 'UTC'),
    client_id     String,
    department    LowCardinality(String),
    model         LowCardinality(String),
    rule          LowCardinality(String),
    severity      LowCardinality(String),
    observed      Float64,
    threshold     Float64,
    window_start  Nullable(DateTime64(3, 'UTC')),
    request_id    Nullable(String),
    message       String,
    inserted_at   DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (client_id, rule, anomaly_id);
