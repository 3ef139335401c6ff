-- Late deltas (events later than the worker's state retention) are merged into the stored
-- row by the sink; the ids of the deltas a row already contains travel inside the row, so
-- the merge and its dedup are one atomic insert and a replayed delta changes nothing.
ALTER TABLE {db}.usage_rollup ADD COLUMN IF NOT EXISTS late_ids Array(String) DEFAULT []
