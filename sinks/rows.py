"""Decoded Avro records -> ClickHouse rows, one column list per table, batch dedup keys, and the
late-delta merge (applied once per delta and once per event id)."""

from __future__ import annotations

from operator import itemgetter

from tokenaudit.schemas.event_ids import ids_contain, pack_ids, unpack_ids

ROLLUP_COLUMNS = ["client_id", "department", "api_key_id", "model", "window_start", "window_end", "requests",
                  "errors", "input_tokens", "output_tokens", "total_tokens", "latency_ms_sum", "latency_ms_max",
                  "max_input_tokens", "truncated", "version", "applied_offset", "event_ids"]
ROLLUP_SUMS = ("requests", "errors", "input_tokens", "output_tokens", "total_tokens", "latency_ms_sum",
               "truncated")
ROLLUP_MAXES = ("latency_ms_max", "max_input_tokens")
# the window's identity: one row per key (the table's sorting key ends with these)
ROLLUP_KEY = ("client_id", "department", "api_key_id", "model", "window_start")

SAMPLED_COLUMNS = ["request_id", "ts", "client_id", "department", "model", "input_tokens", "output_tokens",
                   "total_tokens", "untruncated_input_tokens", "truncated", "latency_ms", "queue_ms",
                   "inference_ms", "status_code", "path", "error_type", "batch_size", "device", "prompt_digest",
                   "sample_reason", "threshold"]

ANOMALY_COLUMNS = ["anomaly_id", "ts", "client_id", "department", "model", "rule", "severity", "observed",
                   "threshold", "window_start", "request_id", "message"]

REJECTED_COLUMNS = ["table", "reason", "record"]

rollup_key = itemgetter(*ROLLUP_KEY)


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
    """A stored rollup row plus a one-event late delta (its id joins the row's event_ids)."""
    if current is None:
        merged = {c: delta[c] for c in ROLLUP_COLUMNS}
        merged["late_ids"] = [delta["delta_id"]]
        merged["version"] = delta["requests"]
        return merged
    merged = {c: current.get(c, delta[c]) for c in ROLLUP_COLUMNS}
    # the same window: its bounds as the delta has them (int epoch ms, like every other row the
    # sink writes; a stored row reads back as datetimes, and one insert takes one kind)
    merged["window_start"], merged["window_end"] = delta["window_start"], delta["window_end"]
    for c in ROLLUP_SUMS:
        merged[c] = current[c] + delta[c]
    for c in ROLLUP_MAXES:
        merged[c] = max(current[c], delta[c])
    merged["version"] = max(int(current["version"]), int(current["requests"])) + delta["requests"]
    merged["late_ids"] = list(current.get("late_ids") or []) + [delta["delta_id"]]
    merged["applied_offset"] = max(int(current.get("applied_offset", -1)), delta["applied_offset"])
    if delta.get("event_ids"):
        merged["event_ids"] = pack_ids(unpack_ids(current.get("event_ids")) + unpack_ids(delta["event_ids"]))
    return merged


def delta_skip(current: dict | None, delta: dict) -> str | None:
    """Why the stored row already counts the delta's event, or None (merge it).

    ``"replayed"``: this very delta was merged (its id is in late_ids), or its source offset is
    at or below the row's: rows include a prefix (by source offset) of their window's events.
    ``"duplicate"``: another copy of its event is in the row (the row's event_ids hold it: the
    event was counted in the window, or merged as an earlier delta)."""
    if current is None:
        return None
    if delta["delta_id"] in (current.get("late_ids") or []) or \
            delta["applied_offset"] <= int(current.get("applied_offset", -1)):
        return "replayed"
    ids = delta.get("event_ids")
    if ids and current.get("event_ids") and ids_contain(unpack_ids(current["event_ids"]), unpack_ids(ids)):
        return "duplicate"
    return None


def delta_included(current: dict | None, delta: dict) -> bool:
    return delta_skip(current, delta) is not None
