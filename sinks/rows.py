"""Decoded Avro records -> ClickHouse rows (one builder per table, over the table's one column
list in :mod:`tokenaudit.schemas.columns`), batch dedup keys, and the late-delta merge
(applied once per delta and once per event id)."""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from tokenaudit.schemas import columns, latency_hist
from tokenaudit.schemas.event_ids import ids_contain, pack_ids, unpack_ids

ROLLUP_COLUMNS = columns.USAGE_ROLLUP
ROLLUP_SUMS = columns.ROLLUP_SUMS
ROLLUP_MAXES = columns.ROLLUP_MAXES
ROLLUP_KEY = columns.ROLLUP_KEY
#: a rollup row that merged late deltas carries their ids too
MERGED_ROLLUP_COLUMNS = (*columns.USAGE_ROLLUP, columns.ROLLUP_LATE_IDS)
SAMPLED_COLUMNS = columns.USAGE_SAMPLED
ANOMALY_COLUMNS = columns.ANOMALIES
REJECTED_COLUMNS = columns.REJECTED_ROWS

rollup_key = itemgetter(*columns.ROLLUP_KEY)
sampled_key = itemgetter(*columns.SAMPLED_KEY)
anomaly_key = itemgetter(*columns.ANOMALY_KEY)

#: a record as the sink decodes it from its topic (the output schemas' fields, timestamps as epoch ms)
Record = dict[str, Any]


# itemgetter: one C call per row (the sink builds tens of thousands of rows a second)
_rollup_values = itemgetter(*ROLLUP_COLUMNS)
_ROLLUP_HIST = ROLLUP_COLUMNS.index("latency_hist")


def rollup_row(r: dict[str, Any]) -> list[Any]:
    """A rollup's row; its latency histogram from the wire text to the Map column's dict."""
    row = list(_rollup_values(r))
    row[_ROLLUP_HIST] = _hist(r["latency_hist"])
    return row


def _hist(value: str | dict[int, int] | None) -> dict[int, int]:
    """A histogram as a dict, from a record's wire text or a stored row's Map."""
    return dict(value) if isinstance(value, dict) else latency_hist.decode(value)


_SAMPLED_TRUNCATED = SAMPLED_COLUMNS.index("truncated")


def sampled_row(r: Record) -> list[Any]:
    row = [r[c] for c in SAMPLED_COLUMNS]
    row[_SAMPLED_TRUNCATED] = int(bool(r["truncated"]))
    return row


anomaly_row = itemgetter(*ANOMALY_COLUMNS)


def merge_delta(current: Record | None, delta: Record) -> Record:
    """A stored rollup row plus a one-event late delta (its id joins the row's event_ids)."""
    if current is None:
        merged = {c: delta.get(c) for c in ROLLUP_COLUMNS}
        merged[columns.ROLLUP_LATE_IDS] = [delta["delta_id"]]
        merged["version"] = delta["requests"]
        merged["latency_hist"] = _hist(delta.get("latency_hist"))
        return merged
    merged = {c: current.get(c, delta.get(c)) for c in ROLLUP_COLUMNS}
    # the same window: its bounds as the delta has them (int epoch ms, like every other row the
    # sink writes; a stored row reads back as datetimes, and one insert takes one kind)
    merged["window_start"], merged["window_end"] = delta["window_start"], delta["window_end"]
    for c in ROLLUP_SUMS:
        merged[c] = current[c] + delta[c]
    for c in ROLLUP_MAXES:
        merged[c] = max(current[c], delta[c])
    merged["version"] = max(int(current["version"]), int(current["requests"])) + delta["requests"]
    merged[columns.ROLLUP_LATE_IDS] = list(current.get(columns.ROLLUP_LATE_IDS) or []) + [delta["delta_id"]]
    merged["applied_offset"] = max(int(current.get("applied_offset", -1)), delta["applied_offset"])
    merged["latency_hist"] = latency_hist.add(_hist(current.get("latency_hist")), _hist(delta.get("latency_hist")))
    if delta.get("event_ids"):
        merged["event_ids"] = pack_ids(unpack_ids(current.get("event_ids")) + unpack_ids(delta["event_ids"]))
    return merged


def delta_skip(current: Record | None, delta: Record) -> str | None:
    """Why the stored row already counts the delta's event, or None (merge it).

    ``"replayed"``: this very delta was merged (its id is in late_ids), or its source offset is
    at or below the row's: rows include a prefix (by source offset) of their window's events.
    ``"duplicate"``: another copy of its event is in the row (the row's event_ids hold it: the
    event was counted in the window, or merged as an earlier delta)."""
    if current is None:
        return None
    if delta["delta_id"] in (current.get(columns.ROLLUP_LATE_IDS) or []) or delta["applied_offset"] <= int(
        current.get("applied_offset", -1)
    ):
        return "replayed"
    ids = delta.get("event_ids")
    if ids and current.get("event_ids") and ids_contain(unpack_ids(current["event_ids"]), unpack_ids(ids)):
        return "duplicate"
    return None


def delta_included(current: Record | None, delta: Record) -> bool:
    return delta_skip(current, delta) is not None


def merged_rollup_row(r: Record) -> list[Any]:
    """A rollup row with the ids of the late deltas it merged."""
    row = [r[c] for c in MERGED_ROLLUP_COLUMNS]
    row[_ROLLUP_HIST] = _hist(r["latency_hist"])
    return row
