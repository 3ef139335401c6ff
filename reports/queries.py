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
from typing import TYPE_CHECKING, Any, TypeVar

from tokenaudit.infra.store import Store
from tokenaudit.reports.params import ReportParams, parse_report_params
from tokenaudit.schemas import columns

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

_T = TypeVar("_T")

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

_SUMS = """
    sum(requests) AS requests,
    sum(errors) AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(total_tokens) AS total_tokens,
    round(sum(latency_ms_sum) / greatest(sum(requests), 1), 2) AS avg_latency_ms"""


def settle_seconds(settings: Settings) -> float:
    """How long after a window starts its row can still change: the window itself, the grace
    the worker waits for stragglers, the idle timeout that closes quiet windows, and the
    sink's batch before the row reaches ClickHouse."""
    return (
        settings.window_seconds + settings.grace_seconds + settings.idle_timeout_seconds + settings.sink_batch_seconds
    )


def settled_until(settings: Settings, now: datetime | None = None) -> datetime:
    """Windows that start before this instant are settled: their rows will not change any
    more (unless a late event arrives, which the stream applies as a correction)."""
    now = now or datetime.now(UTC)
    return (now - timedelta(seconds=settle_seconds(settings))).replace(microsecond=0)


def iso_utc(value: datetime) -> str:
    """ISO 8601 UTC with a Z, as every report prints times."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _given(value: _T | None, name: str) -> _T:
    """A parameter the report needs: parse_report_params sets it for every report that takes it."""
    if value is None:
        raise ValueError(f"report parameter {name} is not set: parse the parameters for this report")
    return value


def _range(column: str, params: ReportParams, client: str | None) -> tuple[str, dict[str, Any]]:
    """WHERE clause for [since, until) on ``column``, an optional client scope and the optional
    department and model filters (every table read here has the three columns)."""
    where = (
        f"{column} >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC') "
        f"AND {column} < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC')"
    )
    bound: dict[str, Any] = {
        "since_ms": _ms(_given(params.since, "since")),
        "until_ms": _ms(_given(params.until, "until")),
    }
    for name, column_name, value in (
        ("client", "client_id", client),
        ("department", "department", params.department),
        ("model", "model", params.model),
    ):
        if value is not None:
            where += f" AND {column_name} = {{{name}:String}}"
            bound[name] = value
    return where, bound


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    """Token totals in [since, until) grouped by client, department, model, hour or day."""
    name, expr = _GROUP_EXPR[_given(params.by, "by")]
    where, bound = _range("window_start", params, client)
    extra = "argMax(department, window_start) AS dept," if params.by == "client" else ""
    order = f"{name}" if params.by in ("minute", "hour", "day") else f"sum(total_tokens) DESC, {name}"
    rows = store.query(
        f"SELECT {expr} AS {name}, {extra} {_SUMS} FROM {{db}}.usage_rollup FINAL "
        f"WHERE {where} GROUP BY {name} ORDER BY {order} {_FINAL_SETTINGS}",
        bound,
    )
    if params.by == "client":  # put the department next to the client it belongs to (latest one)
        rows = [{"client_id": r.pop("client_id"), "department": r.pop("dept"), **r} for r in rows]
    return _jsonable(rows)


def top(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """The heaviest clients by total tokens, with their share of all tokens in scope."""
    where, bound = _range("window_start", params, client)
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
    """Tokens per (department, client, model) in one calendar month (UTC): the input of the
    cost report, which prices them with the caller's price table (see prices.cost_report)."""
    bound: dict[str, Any] = {
        "since_ms": _ms(_given(params.month_start, "month")),
        "until_ms": _ms(_given(params.month_end, "month")),
    }
    scope = ""
    if client is not None:
        scope, bound["client"] = " AND client_id = {client:String}", client
    return store.query(
        "SELECT department, client_id, model, sum(requests) AS requests, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, sum(total_tokens) AS total_tokens "
        "FROM {db}.usage_rollup FINAL "
        "WHERE window_start >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
        f"AND window_start < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC'){scope} "
        f"GROUP BY department, client_id, model ORDER BY department, client_id, model {_FINAL_SETTINGS}",
        bound,
    )


#: latency ``bucket=`` over time -> the SQL that truncates ``ts`` (the only run-time SQL there)
_TIME_BUCKET = {"minute": "toStartOfMinute(ts)", "hour": "toStartOfHour(ts)", "day": "toStartOfDay(ts)"}


def latency(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Latency p50/p95 of successful sampled requests by input-token bucket (powers of two),
    to show from which input length latency starts to climb; or, with ``bucket`` minute, hour
    or day, per time bucket (the dashboard's latency-over-time panel)."""
    where, bound = _range("ts", params, client)
    if params.bucket in _TIME_BUCKET:
        series = store.query(
            f"SELECT {_TIME_BUCKET[params.bucket]} AS time, count() AS requests, "
            "quantilesExact(0.5, 0.95)(latency_ms) AS q "
            f"FROM {{db}}.usage_sampled FINAL WHERE {where} AND status_code < 400 "
            f"GROUP BY time ORDER BY time {_FINAL_SETTINGS}",
            bound,
        )
        return _jsonable(
            [
                {
                    "time": r["time"],
                    "requests": r["requests"],
                    "p50_latency_ms": round(r["q"][0], 2),
                    "p95_latency_ms": round(r["q"][1], 2),
                }
                for r in series
            ]
        )
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
    where, bound = _range("ts", params, client)
    bound["limit"] = params.limit
    rows = store.query(
        f"SELECT * FROM (SELECT {', '.join(ANOMALY_COLUMNS)} FROM {{db}}.anomalies FINAL WHERE {where} "
        f"ORDER BY ts DESC, anomaly_id DESC LIMIT {{limit:UInt32}}) ORDER BY ts, anomaly_id {_FINAL_SETTINGS}",
        bound,
    )
    return _jsonable(rows)


#: grouping name of the bucketed usage -> rollup column (the only run-time SQL of usage_buckets)
BUCKET_GROUPS = {"model": "model", "api_key_id": "api_key_id", "department": "department", "client_id": "client_id"}


def usage_buckets(
    store: Store,
    origin_s: int,
    width_s: int,
    since_s: int,
    until_s: int,
    group_by: tuple[str, ...],
    filters: dict[str, tuple[str, ...]],
    client: str | None = None,
) -> list[dict[str, Any]]:
    """Token sums per fixed-width time bucket numbered from ``origin_s`` (Unix seconds; a window
    belongs to the bucket its start falls in) over [since_s, until_s), grouped by the named
    rollup columns, each filter a list of allowed values: the OpenAI-shaped usage endpoint."""
    cols = [BUCKET_GROUPS[g] for g in group_by]
    where = (
        "window_start >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
        "AND window_start < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')"
    )
    bound: dict[str, Any] = {
        "since_ms": since_s * 1000,
        "until_ms": until_s * 1000,
        "start": origin_s,
        "width": width_s,
    }
    for name, values in filters.items():
        where += f" AND has({{{name}:Array(String)}}, {BUCKET_GROUPS[name]})"
        bound[name] = list(values)
    if client is not None:
        where += " AND client_id = {client:String}"
        bound["client"] = client
    keys = ", ".join(["bucket", *cols])
    return store.query(
        "SELECT intDiv(toInt64(toUnixTimestamp(window_start)) - {start:Int64}, {width:UInt32}) AS bucket, "
        + "".join(f"{c}, " for c in cols)
        + "sum(requests) AS requests, sum(errors) AS errors, sum(truncated) AS truncated, "
        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        "sum(latency_ms_sum) AS latency_ms_sum, max(latency_ms_max) AS latency_ms_max "
        f"FROM {{db}}.usage_rollup FINAL WHERE {where} GROUP BY {keys} "
        f"ORDER BY {keys} {_FINAL_SETTINGS}",
        bound,
    )


def samples(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """The latest ``limit`` sampled requests in [since, until): the latency-against-tokens
    scatter of the dashboard (sizes and times only; no digest, no text)."""
    where, bound = _range("ts", params, client)
    bound["limit"] = params.limit
    rows = store.query(
        "SELECT request_id, ts, client_id, department, model, input_tokens, output_tokens, latency_ms, "
        f"status_code, sample_reason FROM {{db}}.usage_sampled FINAL WHERE {where} "
        f"ORDER BY ts DESC, request_id LIMIT {{limit:UInt32}} {_FINAL_SETTINGS}",
        bound,
    )
    return _jsonable(rows)


REPORTS = {
    "usage": usage,
    "top": top,
    "report": month_tokens,
    "latency": latency,
    "anomalies": anomalies,
    "samples": samples,
}


def run_report(store: Store, report: str, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Run one fixed report; ``client`` (the caller's scope) overrides ``params.client``."""
    return REPORTS[report](store, params, client if client is not None else params.client)


def run_raw(store: Store, report: str, raw: dict[str, str]) -> list[dict[str, Any]]:
    """Parse raw string parameters and run the report (the direct, server-mode path)."""
    return run_report(store, report, parse_report_params(report, raw))
