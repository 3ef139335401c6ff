"""The ledger's read side: every request of ``usage_requests``, filtered, and one request by its
id (request_id or event_id).

Read with ``FINAL``: copies of an event (retries, spool replays) are one row. The stored
``request_id`` is '' where it was the event id's hex (the app's default), and is put back here
(:data:`~tokenaudit.schemas.columns.LEDGER_REQUEST_ID`), so callers never see the difference.
"""

from __future__ import annotations

import uuid
from typing import Any

from tokenaudit.infra.store import Store
from tokenaudit.reports.params import ReportParams
from tokenaudit.reports.report_sql import jsonable, time_range
from tokenaudit.schemas import columns
from tokenaudit.schemas.client_ip import stored_forms

_HALVES = ("event_id_hi", "event_id_lo")
_SELECT = ", ".join(
    (
        f"{columns.LEDGER_REQUEST_ID} AS request_id",
        columns.REQUESTS_EVENT_ID,
        # the ALIAS columns in ms over the stored hundredths
        *(
            c.removesuffix(columns.REQUESTS_X100)
            for c in columns.USAGE_REQUESTS
            if c != "request_id" and c not in _HALVES
        ),
    )
)


def requests(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """The latest ``limit`` requests in [since, until) matching the filters, oldest first."""
    where, bound = time_range("ts", params, client)
    if params.ip is not None:
        where += " AND client_ip IN {ips:Array(String)}"
        bound["ips"] = stored_forms(params.ip)
    if params.status is not None:
        where += " AND status_code = {status:UInt16}"
        bound["status"] = params.status
    bound["limit"] = params.limit
    rows = store.query(
        f"SELECT * FROM (SELECT {_SELECT} FROM {{db}}.usage_requests FINAL WHERE {where} "
        "ORDER BY ts DESC, event_id_hi DESC, event_id_lo DESC LIMIT {limit:UInt32}) ORDER BY ts, event_id",
        bound,
    )
    return _clean(jsonable(rows))


def request(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Every request with this request_id or event_id (a request_id is the client's and need
    not be unique), oldest first; [] when none (in the caller's scope)."""
    wanted = params.request_id or ""
    bound: dict[str, Any] = {"rid": wanted}
    where = f"{columns.LEDGER_REQUEST_ID} = {{rid:String}}"
    event_id = _as_uuid(wanted)
    if event_id is not None:  # the stored halves (event_id is an ALIAS computed per row)
        where = f"((event_id_hi = {{hi:UInt64}} AND event_id_lo = {{lo:UInt64}}) OR {where})"
        bound["hi"], bound["lo"] = event_id >> 64, event_id & ((1 << 64) - 1)
    if client is not None:
        where += " AND client_id = {client:String}"
        bound["client"] = client
    rows = store.query(
        f"SELECT {_SELECT} FROM {{db}}.usage_requests FINAL WHERE {where} "
        "ORDER BY ts, event_id_hi, event_id_lo LIMIT 1000",
        bound,
    )
    return _clean(jsonable(rows))


def _as_uuid(text: str) -> int | None:
    try:
        return uuid.UUID(text).int
    except ValueError:
        return None


def _clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["event_id"] = str(row["event_id"])
        row["truncated"] = bool(row["truncated"])
        for key in ("latency_ms", "queue_ms", "inference_ms", "ttft_ms"):
            if row[key] is not None:
                row[key] = round(float(row[key]), 3)
    return rows
