"""Decoded Avro records -> ClickHouse rows, one column list per table, and batch dedup keys."""

from __future__ import annotations

from operator import itemgetter

ROLLUP_COLUMNS = ["client_id", "department", "model", "window_start", "window_end", "requests", "errors",
                  "input_tokens", "output_tokens", "total_tokens", "latency_ms_sum", "latency_ms_max",
                  "max_input_tokens", "truncated", "version", "applied_offset"]
ROLLUP_SUMS = ("requests", "errors", "input_tokens", "output_tokens", "total_tokens", "latency_ms_sum",
               "truncated")
ROLLUP_MAXES = ("latency_ms_max", "max_input_tokens")

SAMPLED_COLUMNS = ["request_id", "ts", "client_id", "department", "model", "input_tokens", "output_tokens",
                   "total_tokens", "untruncated_input_tokens", "truncated", "latency_ms", "queue_ms",
                   "inference_ms", "status_code", "path", "error_type", "batch_size", "device", "prompt_digest",
                   "sample_reason", "threshold"]

ANOMALY_COLUMNS = ["anomaly_id", "ts", "client_id", "department", "model", "rule", "severity", "observed",
                   "threshold", "window_start", "request_id", "message"]


def rollup_key(r: dict) -> tuple:
    return (r["client_id"], r["model"], r["window_start"])


def sampled_key(r: dict) -> tuple:
    return (r["client_id"], r["request_id"])


def anomaly_key(r: dict) -> tuple:
    return (r["client_id"], r["rule"], r["anomaly_id"])


# itemgetter: one C call per row (the sink builds tens of thousands of rows a second)
rollup_row = itemgetter(*ROLLUP_COLUMNS)


def sampled_row(r: dict) -> list:
    row = [r[c] for c in SAMPLED_COLUMNS]
    row[SAMPLED_COLUMNS.index("truncated")] = int(bool(r["truncated"]))
    return row


anomaly_row = itemgetter(*ANOMALY_COLUMNS)


def merge_delta(current: dict | None, delta: dict) -> dict:
    """A stored rollup row plus a one-event late delta."""
    if current is None:
        merged = {c: delta[c] for c in ROLLUP_COLUMNS}
        merged["late_ids"] = [delta["delta_id"]]
        merged["version"] = delta["requests"]
        return merged
    merged = {c: current[c] for c in ROLLUP_COLUMNS}
    for c in ROLLUP_SUMS:
        merged[c] = current[c] + delta[c]
    for c in ROLLUP_MAXES:
        merged[c] = max(current[c], delta[c])
    merged["version"] = max(int(current["version"]), int(current["requests"])) + delta["requests"]
    merged["late_ids"] = list(current.get("late_ids") or []) + [delta["delta_id"]]
    merged["applied_offset"] = max(int(current.get("applied_offset", -1)), delta["applied_offset"])
    return merged


def delta_included(current: dict | None, delta: dict) -> bool:
    """Whether the stored row already counts the delta's event: rows include a prefix (by
    source offset) of their window's events, so any offset at or below the row's is in."""
    if current is None:
        return False
    return (delta["delta_id"] in (current.get("late_ids") or [])
            or delta["applied_offset"] <= int(current.get("applied_offset", -1)))
