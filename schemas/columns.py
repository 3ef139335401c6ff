"""The ClickHouse column lists of the contract tables: one list per table, used by the sink's
inserts, the report queries and the tests' seed data alike.

Why here (in the contract, not in the sink): before, the lists existed three times (the sink's
rows, the queries, the tests) and a column added to one was silently missing from the others.
The tables themselves are created by the migrations (``infra/migrations/``); a test checks that
every column named here exists in the migrated tables. A list is the order the sink writes
values in, not the table's column order.
"""

from __future__ import annotations

#: usage_rollup: one row per window (ROLLUP_KEY), the latest version wins
USAGE_ROLLUP = (
    "client_id",
    "department",
    "api_key_id",
    "model",
    "window_start",
    "window_end",
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "latency_ms_sum",
    "latency_ms_max",
    "max_input_tokens",
    "truncated",
    "version",
    "applied_offset",
    "event_ids",
    "latency_hist",
)
#: the window's identity: one row per key (the table's sorting key ends with these)
ROLLUP_KEY = ("client_id", "department", "api_key_id", "model", "window_start")
#: summed, and maxed, when a late delta is merged into its stored row
ROLLUP_SUMS = ("requests", "errors", "input_tokens", "output_tokens", "total_tokens", "latency_ms_sum", "truncated")
ROLLUP_MAXES = ("latency_ms_max", "max_input_tokens")
#: written only with rows that merged late deltas (the ids of the deltas merged)
ROLLUP_LATE_IDS = "late_ids"

#: usage_sampled: one row per (client_id, request_id)
USAGE_SAMPLED = (
    "request_id",
    "ts",
    "client_id",
    "department",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "untruncated_input_tokens",
    "truncated",
    "latency_ms",
    "queue_ms",
    "inference_ms",
    "status_code",
    "path",
    "error_type",
    "batch_size",
    "device",
    "prompt_digest",
    "sample_reason",
    "threshold",
)
SAMPLED_KEY = ("client_id", "request_id")

#: anomalies: one row per (client_id, rule, anomaly_id)
ANOMALIES = (
    "anomaly_id",
    "ts",
    "client_id",
    "department",
    "model",
    "rule",
    "severity",
    "observed",
    "threshold",
    "window_start",
    "request_id",
    "message",
)
ANOMALY_KEY = ("client_id", "rule", "anomaly_id")

#: usage_requests (the ledger): one row per event, idempotent by event_id (the sorting key ends
#: with its two halves); request_id is '' where it is the event id's hex (LEDGER_REQUEST_ID puts
#: it back)
USAGE_REQUESTS = (
    "client_id",
    "ts",
    "event_id_hi",
    "event_id_lo",
    "request_id",
    "instance",
    "department",
    "api_key_id",
    "client_ip",
    "method",
    "path",
    "status_code",
    "error_type",
    "model",
    "input_tokens",
    "untruncated_input_tokens",
    "output_tokens",
    "total_tokens",
    "truncated",
    "latency_ms_x100",
    "queue_ms_x100",
    "inference_ms_x100",
    "ttft_ms_x100",
    "batch_id",
    "batch_size",
    "position_in_batch",
    "finish_reason",
)
REQUESTS_KEY = ("client_id", "ts", "event_id_hi", "event_id_lo")
#: the event id's two 64-bit halves as stored; ``event_id`` (UUID) is an ALIAS column over them
REQUESTS_EVENT_ID = "event_id"
#: latencies are stored as whole hundredths of a ms (``<name>_x100``); ``<name>`` is an ALIAS in ms
REQUESTS_X100 = "_x100"
#: the stored request_id, or the event id's hex where it was stored as '' (SQL)
LEDGER_REQUEST_ID = "if(request_id = '', replaceAll(toString(event_id), '-', ''), request_id)"

#: rejected_rows: what ClickHouse refused, with the reason and the record as JSON
REJECTED_ROWS = ("table", "reason", "record")

TABLES = {
    "usage_rollup": USAGE_ROLLUP,
    "usage_sampled": USAGE_SAMPLED,
    "anomalies": ANOMALIES,
    "usage_requests": USAGE_REQUESTS,
    "rejected_rows": REJECTED_ROWS,
}


def subset(table: tuple[str, ...], *names: str) -> list[str]:
    """``names`` in the table list's order, each checked to be a column of it (seed data and
    partial inserts name a few columns; a typo or a dropped column fails here, not in SQL)."""
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise KeyError(f"not columns of this table: {unknown}")
    return [c for c in table if c in names]
