-- Issue 17: a daily pre-aggregate of usage_rollup, so the dashboard's 30-day panels read ~30 rows
-- per (client, department, key, model) instead of every window (10M rollup rows: ~0.3-0.5 s per
-- 30-day scan, several scans per load; bench/bench_dashboard.py). It is kept exact without
-- trusting a materialized view to sum versions (it would add every replayed or late version):
--  * usage_rollup_day_writes counts the rows written to usage_rollup per UTC day (a view on
--    every insert, whoever writes: sink, late-delta merges, backfills). Its value means nothing;
--    it only grows, and it changes whenever a day's rows may have changed.
--  * the sink (infra/daily_rollup.py) builds a settled day from usage_rollup FINAL into
--    usage_rollup_daily, tagged with the write count it read before the build (token), and then
--    records (day, token) in usage_rollup_days.
--  * readers use a day's daily rows only while its recorded token equals the day's write count
--    now; any later write (a late delta, a replay) makes them stale until rebuilt, and the
--    queries read that day from usage_rollup itself (reports/rollup_source.py).
-- A migration that rebuilds usage_rollup (copy, EXCHANGE, drop, as 0010/0011 did) must create
-- the view again on the new table.
CREATE TABLE IF NOT EXISTS {db}.usage_rollup_day_writes
(
    day    Date,
    writes UInt64
)
ENGINE = SummingMergeTree
ORDER BY day;
--;;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_rollup_day_writes_mv TO {db}.usage_rollup_day_writes
AS SELECT toDate(window_start) AS day, count() AS writes FROM {db}.usage_rollup GROUP BY day;
--;;
-- rows already stored count as writes too (counted twice if written meanwhile: harmless, the
-- count only has to change)
INSERT INTO {db}.usage_rollup_day_writes SELECT toDate(window_start) AS day, count() AS writes
FROM {db}.usage_rollup GROUP BY day;
--;;
-- One row per (day, client_id, department, api_key_id, model) per build; window_start is the
-- day's start, so the reports' WHERE clauses apply unchanged. latency_hist holds only the
-- histograms that count every request of their window; latency_uncovered the requests of the
-- others (the reports' "not covered"). last_window: the latest window_start summed in (the top
-- report's latest department). A rebuild replaces a group (version: token); a group whose token
-- is not the day's current one is never read.
CREATE TABLE IF NOT EXISTS {db}.usage_rollup_daily
(
    client_id         String,
    department        LowCardinality(String),
    api_key_id        String,
    model             LowCardinality(String),
    window_start      DateTime64(3, 'UTC'),
    requests          UInt64,
    errors            UInt64,
    input_tokens      UInt64,
    output_tokens     UInt64,
    total_tokens      UInt64,
    truncated         UInt64,
    latency_ms_sum    Float64,
    latency_ms_max    Float64,
    latency_hist      Map(UInt16, UInt64) CODEC(ZSTD(1)),
    latency_uncovered UInt64,
    last_window       DateTime64(3, 'UTC'),
    token             UInt64
)
ENGINE = ReplacingMergeTree(token)
PARTITION BY toYYYYMM(window_start)
ORDER BY (window_start, client_id, department, api_key_id, model);
--;;
CREATE TABLE IF NOT EXISTS {db}.usage_rollup_days
(
    day      Date,
    token    UInt64,
    built_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(token)
ORDER BY day
