-- Issue 11: a window is one (client_id, department, api_key_id, model, window_start), so a
-- client used under two departments (or keys) in one window is charged to each in turn.
-- usage_rollup gains api_key_id ('' when unknown) and event_ids (the packed id set of the events
-- the row counts: base64 of their 16-byte ids, schemas/event_ids.py), which lets the sink skip a late
-- delta whose event the row already holds. event_ids is only needed while late copies can still
-- arrive, so it has a column TTL counted from when the row was last written (emitted_at: a
-- backfill of old windows still deduplicates; TOKENAUDIT_DEDUP_RETENTION_DAYS, re-applied by
-- every migrate; 7 days here until then).
ALTER TABLE {db}.usage_rollup ADD COLUMN IF NOT EXISTS api_key_id String DEFAULT '' AFTER department;
--;;
ALTER TABLE {db}.usage_rollup ADD COLUMN IF NOT EXISTS event_ids String DEFAULT '' TTL toDateTime(emitted_at) + INTERVAL 7 DAY;
--;;
-- The dedup key is the sorting key, so it is rebuilt as migration 0010 did: copy, swap, drop
-- (re-running the copy is harmless: ReplacingMergeTree collapses the duplicates). Rows written
-- before this migration keep one row per (client_id, model, window_start): every version of
-- such a row carried its window's first department and no key, so they still collapse. Run it
-- with the sink stopped (`up` migrates before the sink starts).
CREATE TABLE IF NOT EXISTS {db}.usage_rollup_by_identity AS {db}.usage_rollup
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (toStartOfDay(window_start), client_id, department, api_key_id, model, window_start);
--;;
INSERT INTO {db}.usage_rollup_by_identity SELECT * FROM {db}.usage_rollup;
--;;
EXCHANGE TABLES {db}.usage_rollup AND {db}.usage_rollup_by_identity;
--;;
DROP TABLE {db}.usage_rollup_by_identity;
--;;
-- Rows ClickHouse refused (a value out of range for its column, a violated constraint): the sink
-- isolates them by splitting the batch, stores the rest and keeps these here with the reason and
-- the record as JSON, instead of retrying the batch forever. Keyed by (table, record): a replayed
-- sink batch rejects the same rows again and they collapse.
CREATE TABLE IF NOT EXISTS {db}.rejected_rows
(
    `table`      LowCardinality(String),
    reason       String,
    record       String,
    rejected_at  DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(rejected_at)
ORDER BY (`table`, cityHash64(record))
