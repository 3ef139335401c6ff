"""ClickHouse side: batched idempotent writes of rollups, sampled records and anomalies, and
the fixed usage queries (CLI and read-only usage API)."""
