"""The fixed usage reports, as parameterised SQL over the contract tables.

Every table is read with ``FINAL`` so a window (or anomaly, or sampled request) that was
written more than once, whatever was replayed, counts once. Values reach ClickHouse only as
bound ``{name:Type}`` parameters; the only SQL fragments chosen at run time come from the
whitelists below, keyed by already-validated names. Rows come back JSON-ready (ints, floats,
strings; times as ISO 8601 UTC) so the CLI prints the same thing whether it asked ClickHouse
directly or went through the usage API.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from tokenaudit.infra.store import Store
from tokenaudit.reports import ledger
from tokenaudit.reports.params import ReportParams, parse_report_params
from tokenaudit.schemas import columns

# prefer_column_name_to_alias: `sum(requests) AS requests` must not make a later
# `sum(requests)` refer to the alias (an aggregate inside an aggregate).
_FINAL_SETTINGS = "SETTINGS prefer_column_name_to_alias = 1"

#: --by value -> (output column, SQL expression); the only run-time SQL in this module
_GROUP_EXPR = {
    "client": ("client_id", "client_id"),
    "department": ("department", "department"),
    "model": ("model", "model"),
    "minute": ("minute", "toStartOfMinute(window_start)"),
    "hour": ("hour", "toStartOfHour(window_start)"),
    "day": ("day", "toDate(window_start)"),
}

#: groupings that are time buckets: ordered by time, not by tokens
_TIME_GROUPS = ("minute", "hour", "day")

_SUMS = """
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(total_tokens) AS total_tokens,
    sum(truncated) AS truncated,
    round(sum(latency_ms_sum) / greatest(sum(requests), 1), 2) AS avg_latency_ms"""


def settle_seconds(settings) -> float:
    """How long after a window starts its row can still change: the window itself, the grace
    the worker waits for stragglers, the idle timeout that closes quiet windows, and the
    sink's batch before the row reaches ClickHouse."""
    return (
        settings.window_seconds + settings.grace_seconds + settings.idle_timeout_seconds + settings.sink_batch_seconds
    )


def settled_until(settings, now: datetime | None = None) -> datetime:
    """Windows that start before this instant are settled: their rows will not change any
    more (unless a late event arrives, which the stream applies as a correction)."""
    now = now or datetime.now(UTC)
    return (now - timedelta(seconds=settle_seconds(settings))).replace(microsecond=0)


def iso_utc(value: datetime) -> str:
    """ISO 8601 UTC with a Z, as every report prints times."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def time_range(column: str, params: ReportParams, client: str | None) -> tuple[str, dict[str, Any]]:
    """WHERE clause for [since, until) on ``column`` and an optional client scope."""
    where = (
        f"{column} >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC') "
        f"AND {column} < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC')"
    )
    bound: dict[str, Any] = {"since_ms": _ms(params.since), "until_ms": _ms(params.until)}
    if client is not None:
        where += " AND client_id = {client:String}"
        bound["client"] = client
    return where, bound


def jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        clean = {}
        for key, value in row.items():
            if isinstance(value, datetime):
                value = iso_utc(value)
            elif isinstance(value, date):
                value = value.isoformat()
            clean[key] = value
        out.append(clean)
    return out


def usage(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Token totals in [since, until) grouped by client, department, model, minute, hour or day."""
    name, expr = _GROUP_EXPR[params.by]
    where, bound = time_range("window_start", params, client)
    extra = "argMax(department, window_start) AS dept," if params.by == "client" else ""
    order = f"{name}" if params.by in _TIME_GROUPS else f"sum(total_tokens) DESC, {name}"
    rows = store.query(
        f"SELECT {expr} AS {name}, {extra} {_SUMS} FROM {{db}}.usage_rollup FINAL "
        f"WHERE {where} GROUP BY {name} ORDER BY {order} {_FINAL_SETTINGS}",
        bound,
    )
    if params.by == "client":  # put the department next to the client it belongs to (latest one)
        rows = [{"client_id": r.pop("client_id"), "department": r.pop("dept"), **r} for r in rows]
    return jsonable(rows)


def top(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """The heaviest clients by total tokens, with their share of all tokens in scope."""
    where, bound = time_range("window_start", params, client)
    bound["limit"] = params.limit
    rows = store.query(
        "SELECT client_id, argMax(department, window_start) AS dept, sum(requests) AS requests, "
        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(total_tokens) AS tokens, "
        "round(100 * tokens / greatest(sum(tokens) OVER (), 1), 2) AS share_pct "
        f"FROM {{db}}.usage_rollup FINAL WHERE {where} GROUP BY client_id "
        f"ORDER BY tokens DESC, client_id LIMIT {{limit:UInt32}} {_FINAL_SETTINGS}",
        bound,
    )
    return [
        {
            "rank": i,
            "client_id": r["client_id"],
            "department": r["dept"],
            "requests": r["requests"],
            "input_tokens": r["input_tokens"],
            "output_tokens": r["output_tokens"],
            "total_tokens": r["tokens"],
            "share_pct": r["share_pct"],
        }
        for i, r in enumerate(rows, 1)
    ]


def month_tokens(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Tokens per (department, client, model, UTC day) in one calendar month: the input of the
    cost report, which prices each day with the entry of the caller's price table in force on
    it (prices change at the start of a day: see prices.cost_report)."""
    bound: dict[str, Any] = {"since_ms": _ms(params.month_start), "until_ms": _ms(params.month_end)}
    scope = ""
    if client is not None:
        scope, bound["client"] = " AND client_id = {client:String}", client
    rows = store.query(
        "SELECT department, client_id, model, toDate(window_start) AS day, "
        "sum(requests) AS requests, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, sum(total_tokens) AS total_tokens "
        "FROM {db}.usage_rollup FINAL "
        "WHERE window_start >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
        f"AND window_start < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC'){scope} "
        f"GROUP BY department, client_id, model, day ORDER BY department, client_id, model, day {_FINAL_SETTINGS}",
        bound,
    )
    return jsonable(rows)


def latency(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Latency p50/p95 of successful sampled requests by input-token bucket (powers of two),
    to show from which input length latency starts to climb."""
    where, bound = time_range("ts", params, client)
    rows = store.query(
        "SELECT if(input_tokens <= 16, 16, toUInt64(exp2(ceil(log2(input_tokens))))) AS upper, "
        "count() AS requests, round(avg(input_tokens), 1) AS avg_input_tokens, "
        "quantilesExact(0.5, 0.95)(latency_ms) AS q "
        f"FROM {{db}}.usage_sampled FINAL WHERE {where} AND status_code < 400 "
        f"GROUP BY upper ORDER BY upper {_FINAL_SETTINGS}",
        bound,
    )
    return [
        {
            "input_tokens": f"{1 if r['upper'] == 16 else r['upper'] // 2 + 1}-{r['upper']}",
            "requests": r["requests"],
            "avg_input_tokens": r["avg_input_tokens"],
            "p50_latency_ms": round(r["q"][0], 2),
            "p95_latency_ms": round(r["q"][1], 2),
        }
        for r in rows
    ]


ANOMALY_COLUMNS = columns.ANOMALIES


def anomalies(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """The latest ``limit`` anomalies in [since, until), oldest first."""
    where, bound = time_range("ts", params, client)
    bound["limit"] = params.limit
    rows = store.query(
        f"SELECT * FROM (SELECT {', '.join(ANOMALY_COLUMNS)} FROM {{db}}.anomalies FINAL WHERE {where} "
        f"ORDER BY ts DESC, anomaly_id DESC LIMIT {{limit:UInt32}}) ORDER BY ts, anomaly_id {_FINAL_SETTINGS}",
        bound,
    )
    return jsonable(rows)


REPORTS = {
    "usage": usage,
    "top": top,
    "report": month_tokens,
    "latency": latency,
    "anomalies": anomalies,
    "requests": ledger.requests,
    "request": ledger.request,
}


def run_report(store: Store, report: str, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Run one fixed report; ``client`` (the caller's scope) overrides ``params.client``."""
    return REPORTS[report](store, params, client if client is not None else params.client)


def run_raw(store: Store, report: str, raw: dict[str, str]) -> list[dict[str, Any]]:
    """Parse raw string parameters and run the report (the direct, server-mode path)."""
    return run_report(store, report, parse_report_params(report, raw))
