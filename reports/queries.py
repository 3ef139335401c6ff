"""The fixed usage reports, as parameterised SQL over the contract tables.

Every table is read with ``FINAL`` so a window (or anomaly, or sampled request) that was
written more than once, whatever was replayed, counts once. The rollup reports read whole days
of their range from the daily pre-aggregate where it is current (reports/rollup_source.py). Values reach ClickHouse only as
bound ``{name:Type}`` parameters; the only SQL fragments chosen at run time come from the
whitelists below, keyed by already-validated names. Rows come back JSON-ready (ints, floats,
strings; times as ISO 8601 UTC) so the CLI prints the same thing whether it asked ClickHouse
directly or went through the usage API.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from tokenaudit.infra.daily_rollup import settle_seconds as settle_seconds  # re-exported: CLI, verify
from tokenaudit.infra.store import Store
from tokenaudit.reports import ledger
from tokenaudit.reports.params import ReportParams, parse_report_params
from tokenaudit.reports.report_sql import epoch_ms, jsonable, time_range
from tokenaudit.reports.report_sql import iso_utc as iso_utc  # re-exported: the CLI, usage API, verify
from tokenaudit.reports.rollup_source import LATENCY, TOTALS, rollup_source
from tokenaudit.schemas import columns, latency_hist

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


def settled_until(settings: Settings, now: datetime | None = None) -> datetime:
    """Windows that start before this instant are settled: their rows will not change any
    more (unless a late event arrives, which the stream applies as a correction)."""
    now = now or datetime.now(UTC)
    return (now - timedelta(seconds=settle_seconds(settings))).replace(microsecond=0)


def _given(value: _T | None, name: str) -> _T:
    """A parameter the report needs: parse_report_params sets it for every report that takes it."""
    if value is None:
        raise ValueError(f"report parameter {name} is not set: parse the parameters for this report")
    return value


def _source(
    store: Store, where: str, bound: dict[str, Any], params: ReportParams, columns: tuple[str, ...], whole_days: bool
) -> str:
    """The rollup rows of the report's range (rollup_source), whole current days from the daily table."""
    since, until = _given(params.since, "since"), _given(params.until, "until")
    return rollup_source(store, where, bound, since, until, columns, whole_days)


def usage(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Token totals in [since, until) grouped by client, department, model, minute, hour or day."""
    name, expr = _GROUP_EXPR[_given(params.by, "by")]
    where, bound = time_range("window_start", params, client)
    source = _source(store, where, bound, params, (*TOTALS, "last_window"), params.by not in ("minute", "hour"))
    extra = "argMax(department, last_window) AS dept," if params.by == "client" else ""
    order = f"{name}" if params.by in _TIME_GROUPS else f"sum(total_tokens) DESC, {name}"
    rows = store.query(
        f"SELECT {expr} AS {name}, {extra} {_SUMS} FROM {source} GROUP BY {name} ORDER BY {order} {_FINAL_SETTINGS}",
        bound,
    )
    if params.by == "client":  # put the department next to the client it belongs to (latest one)
        rows = [{"client_id": r.pop("client_id"), "department": r.pop("dept"), **r} for r in rows]
    return jsonable(rows)


def top(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """The heaviest clients by total tokens, with their share of all tokens in scope."""
    where, bound = time_range("window_start", params, client)
    bound["limit"] = params.limit
    source = _source(store, where, bound, params, (*TOTALS, "last_window"), True)
    rows = store.query(
        "SELECT client_id, argMax(department, last_window) AS dept, sum(requests) AS requests, "
        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(total_tokens) AS tokens, "
        "round(100 * tokens / greatest(sum(tokens) OVER (), 1), 2) AS share_pct "
        f"FROM {source} GROUP BY client_id "
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


def month_tokens(
    store: Store, params: ReportParams, client: str | None = None, periods: list[date] | None = None
) -> list[dict[str, Any]]:
    """Tokens per (department, client, model, UTC day) in one calendar month: the input of the
    cost report, which prices each day with the entry of the caller's price table in force on
    it (prices change at the start of a day: see prices.cost_report). Given ``periods`` (the
    first days of spans in which no price changes, the month's first day first), a row's
    ``day`` is the first day of its span instead: the same cost (it is linear in the tokens),
    in ~1/30 of the rows."""
    since, until = _given(params.month_start, "month"), _given(params.month_end, "month")
    bound: dict[str, Any] = {"since_ms": epoch_ms(since), "until_ms": epoch_ms(until)}
    where = (
        "window_start >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
        "AND window_start < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')"
    )
    if client is not None:
        where += " AND client_id = {client:String}"
        bound["client"] = client
    source = rollup_source(store, where, bound, since, until, TOTALS)
    day = "toDate(window_start)"
    if periods:
        day, bound["periods"] = "arrayLast(p -> p <= toDate(window_start), {periods:Array(Date)})", sorted(periods)
    # the day as ISO text from ClickHouse: every value is JSON-ready as read, so the rows (one per
    # client, model and day: 10k a day at 2,000 clients) skip jsonable, most of this report's time
    return store.query(
        f"SELECT department, client_id, model, toString({day}) AS day, "
        "sum(requests) AS requests, sum(input_tokens) AS input_tokens, "
        "sum(output_tokens) AS output_tokens, sum(total_tokens) AS total_tokens "
        f"FROM {source} "
        f"GROUP BY department, client_id, model, day ORDER BY department, client_id, model, day {_FINAL_SETTINGS}",
        bound,
    )


#: latency ``bucket=`` over time -> the SQL that truncates a window's start (the only run-time SQL there)
_TIME_BUCKET = {
    "minute": "toStartOfMinute(window_start)",
    "hour": "toStartOfHour(window_start)",
    "day": "toStartOfDay(window_start)",
}


def latency_percentiles(counts: dict[int, int]) -> dict[str, float | None]:
    """p50/p95/p99 of a latency histogram (latency bucket -> count): each the upper bound of the
    bucket that holds it; None past 60 s or for an empty histogram."""
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        upper = latency_hist.latency_range(latency_hist.quantile_bucket(counts, q))[1] if counts else None
        out[f"{name}_latency_ms"] = None if upper is None or upper == math.inf else upper
    return out


def _latency_by_input(store: Store, source: str, bound: dict[str, Any]) -> list[dict[str, Any]]:
    """p50/p95/p99 per input-token bucket over every request of the range, whatever its client or
    model; requests without a full histogram as a ``not covered`` line."""
    rows = store.query(
        f"SELECT sumMap(hist_covered) AS hist, sum(hist_uncovered) AS uncovered FROM {source} {_FINAL_SETTINGS}",
        bound,
    )
    by_input: dict[int, dict[int, int]] = {}
    for cell, n in ((rows[0]["hist"] if rows else None) or {}).items():
        if n:
            ib, lb = divmod(int(cell), latency_hist.CELLS_PER_INPUT)
            by_input.setdefault(ib, {})[lb] = by_input.get(ib, {}).get(lb, 0) + int(n)
    out: list[dict[str, Any]] = [
        {"input_tokens": latency_hist.input_range(ib), "requests": sum(c.values()), **latency_percentiles(c)}
        for ib, c in sorted(by_input.items())
    ]
    uncovered = int(rows[0]["uncovered"]) if rows else 0
    if uncovered:
        out.append({"input_tokens": "not covered", "requests": uncovered, **latency_percentiles({})})
    return out


def _latency_over_time(store: Store, source: str, bound: dict[str, Any], truncate: str) -> list[dict[str, Any]]:
    """p50/p95/p99 per time bucket over all requests, from the rollups' histograms merged across
    clients, models and input sizes (the dashboard's latency-over-time panel). A bucket whose
    rows do not all carry a full histogram says how many requests it leaves out (``not_covered``)."""
    rows = store.query(
        f"SELECT {truncate} AS time, sumMap(hist_covered) AS hist, sum(requests) AS requests, "
        f"sum(hist_uncovered) AS uncovered FROM {source} GROUP BY time ORDER BY time {_FINAL_SETTINGS}",
        bound,
    )
    out: list[dict[str, Any]] = []
    for r in rows:
        counts: dict[int, int] = {}
        for cell, n in (r["hist"] or {}).items():
            if n:
                lb = int(cell) % latency_hist.CELLS_PER_INPUT
                counts[lb] = counts.get(lb, 0) + int(n)
        out.append(
            {
                "time": r["time"],
                "requests": int(r["requests"]),
                "not_covered": int(r["uncovered"]),
                **latency_percentiles(counts),
            }
        )
    return jsonable(out)


def latency(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """End-to-end latency p50/p95/p99 over all requests per client, model and input-token
    bucket, from the rollups' histograms (:mod:`tokenaudit.schemas.latency_hist`): each value is
    the upper bound of the histogram bucket holding that percentile (the exact one lies within
    it: bounds are 19% apart); None past 60 s. Rows whose histogram does not count every request
    of their window (written before rollup schema v4, or a window restored from an older
    worker's state) are not guessed: their requests are a ``not covered`` line."""
    where, bound = time_range("window_start", params, client)
    source = _source(store, where, bound, params, LATENCY, params.bucket not in ("minute", "hour"))
    if params.bucket in _TIME_BUCKET:
        return _latency_over_time(store, source, bound, _TIME_BUCKET[params.bucket])
    if params.bucket == "input":  # all clients and models of the range merged (the dashboard's panel)
        return _latency_by_input(store, source, bound)
    rows = store.query(
        "SELECT client_id, model, sumMap(hist_covered) AS hist, sum(hist_uncovered) AS uncovered "
        f"FROM {source} GROUP BY client_id, model ORDER BY client_id, model {_FINAL_SETTINGS}",
        bound,
    )
    out: list[dict[str, Any]] = []
    for r in rows:
        by_input: dict[int, dict[int, int]] = {}
        for cell, n in (r["hist"] or {}).items():
            if n:
                ib, lb = divmod(int(cell), latency_hist.CELLS_PER_INPUT)
                by_input.setdefault(ib, {})[lb] = int(n)
        for ib in sorted(by_input):
            counts = by_input[ib]
            line: dict[str, Any] = {
                "client_id": r["client_id"],
                "model": r["model"],
                "input_tokens": latency_hist.input_range(ib),
                "requests": sum(counts.values()),
            }
            for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                upper = latency_hist.latency_range(latency_hist.quantile_bucket(counts, q))[1]
                line[f"{name}_latency_ms"] = None if upper == math.inf else upper
            out.append(line)
        if r["uncovered"]:
            out.append(
                {
                    "client_id": r["client_id"],
                    "model": r["model"],
                    "input_tokens": "not covered",
                    "requests": int(r["uncovered"]),
                    "p50_latency_ms": None,
                    "p95_latency_ms": None,
                    "p99_latency_ms": None,
                }
            )
    return out


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
    source = rollup_source(
        store,
        where,
        bound,
        datetime.fromtimestamp(since_s, UTC),
        datetime.fromtimestamp(until_s, UTC),
        (*TOTALS, "api_key_id", "latency_ms_max", "hist_covered", "hist_uncovered"),
        # a day's rows count in one bucket only if the whole day falls in one
        lambda day: (
            (int(day.timestamp()) - origin_s) // width_s == (int(day.timestamp()) + 86399 - origin_s) // width_s
        ),
    )
    return store.query(
        "SELECT intDiv(toInt64(toUnixTimestamp(window_start)) - {start:Int64}, {width:UInt32}) AS bucket, "
        + "".join(f"{c}, " for c in cols)
        + "sum(requests) AS requests, sum(errors) AS errors, sum(truncated) AS truncated, "
        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        "sum(latency_ms_sum) AS latency_ms_sum, max(latency_ms_max) AS latency_ms_max, "
        # the bucket's latency histogram, and the requests of rows without a full one (pre-v4)
        "sumMap(hist_covered) AS latency_hist, sum(hist_uncovered) AS latency_uncovered "
        f"FROM {source} GROUP BY {keys} "
        f"ORDER BY {keys} {_FINAL_SETTINGS}",
        bound,
    )


def samples(store: Store, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """The latest ``limit`` sampled requests in [since, until): the latency-against-tokens
    scatter of the dashboard (sizes and times only; no digest, no text)."""
    where, bound = time_range("ts", params, client)
    bound["limit"] = params.limit
    rows = store.query(
        "SELECT request_id, ts, client_id, department, model, input_tokens, output_tokens, latency_ms, "
        f"status_code, sample_reason FROM {{db}}.usage_sampled FINAL WHERE {where} "
        f"ORDER BY ts DESC, request_id LIMIT {{limit:UInt32}} {_FINAL_SETTINGS}",
        bound,
    )
    return jsonable(rows)


REPORTS = {
    "usage": usage,
    "top": top,
    "report": month_tokens,
    "latency": latency,
    "anomalies": anomalies,
    "samples": samples,
    "requests": ledger.requests,
    "request": ledger.request,
}


def run_report(store: Store, report: str, params: ReportParams, client: str | None = None) -> list[dict[str, Any]]:
    """Run one fixed report; ``client`` (the caller's scope) overrides ``params.client``."""
    return REPORTS[report](store, params, client if client is not None else params.client)


def run_raw(store: Store, report: str, raw: dict[str, str]) -> list[dict[str, Any]]:
    """Parse raw string parameters and run the report (the direct, server-mode path)."""
    return run_report(store, report, parse_report_params(report, raw))
