-- The source offset of the last event a rollup row includes: a late delta at or below it is
-- already counted (whichever worker history wrote the row), so the sink skips it.
ALTER TABLE {db}.usage_rollup ADD COLUMN IF NOT EXISTS applied_offset Int64 DEFAULT -1
