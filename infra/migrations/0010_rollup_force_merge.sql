-- Keep `SELECT ... FROM usage_rollup FINAL` fast. FINAL dedups replayed windows at read time by
-- merging the parts that overlap in the sorting key; every sink batch covers all clients, so
-- unmerged parts overlap everywhere and FINAL costs a full merge per query (measured: ~0.6 s
-- over 10M rows on 2 cores, against ~0.1 s once merged; bench/bench_usage_query.py).
-- ClickHouse's size-ratio merge policy leaves parts of similar size unmerged for a long time,
-- so parts older than 10 minutes are merged regardless. The cost is rewriting the current
-- month's partition about every 10 minutes (seconds of one core per 10M rows); a very large
-- server deployment can trade that back with
--   ALTER TABLE tokenaudit.usage_rollup RESET SETTING min_age_to_force_merge_seconds
ALTER TABLE {db}.usage_rollup MODIFY SETTING min_age_to_force_merge_seconds = 600
