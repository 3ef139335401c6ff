"""Sinks: the write path into ClickHouse. Rollups, sampled records and anomalies are batched,
deduplicated by key, inserted idempotently (refused rows isolated), then their offsets
committed. The read side is ``tokenaudit.reports``."""
