"""``GET /v1/organization/usage/completions``: the usage API in OpenAI's Usage API shape.

Why: teams that own tooling already have scripts and dashboards written against OpenAI's
organization usage endpoint; answering in its shape lets them point those at self-hosted
traffic. The mapping: ``user_id`` is our client_id, ``project_id`` our department,
``api_key_id`` the hashed key id of the rollups, ``model`` the model. Buckets are counted from
``start_time`` in steps of ``bucket_width`` (a rollup window belongs to the bucket its start
falls in, so the totals over [start_time, end_time) equal ``/v1/usage`` over the same range);
empty buckets are listed with ``results: []``, as OpenAI does. ``limit`` counts buckets per
page, with OpenAI's defaults and maxima; ``page`` is the opaque ``next_page`` cursor.

Extension fields OpenAI lacks, which its clients ignore: ``num_errors``, ``num_truncated``,
``latency_ms_avg`` and ``latency_ms_max`` (exact, from the rollups) and ``latency_ms_p50`` and
``latency_ms_p95`` from the rollups' latency histograms (the upper bound of the histogram bucket
holding each; null for a bucket with rows written before rollup schema v4). Parsing is strict like the other reports: an unknown parameter, a bad
value or a ``bucket_width`` finer than the stream's window is a 400 before any SQL runs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenaudit.errors import QueryParamError
from tokenaudit.infra.store import Store
from tokenaudit.reports.params import LATEST, parse_client
from tokenaudit.reports.queries import latency_percentiles, usage_buckets
from tokenaudit.schemas import latency_hist

log = logging.getLogger(__name__)

PATH = "/v1/organization/usage/completions"
#: bucket_width -> (seconds, default limit, maximum limit): OpenAI's documented values
BUCKET_WIDTHS = {"1m": (60, 60, 1440), "1h": (3600, 24, 168), "1d": (86400, 7, 31)}
#: OpenAI's group_by / filter names -> our rollup columns (see queries.BUCKET_GROUPS)
GROUP_FIELDS = {"model": "model", "api_key_id": "api_key_id", "project_id": "department", "user_id": "client_id"}
FILTER_FIELDS = {"models": "model", "api_key_ids": "api_key_id", "project_ids": "department", "user_ids": "client_id"}
_SCALARS = frozenset({"start_time", "end_time", "bucket_width", "limit", "page"})
_ARRAYS = frozenset({"group_by", *FILTER_FIELDS})
_MAX_VALUES = 100
#: every parameter the route takes (docs_gen lists them)
PARAMETERS = _SCALARS | _ARRAYS


@dataclass(frozen=True)
class BucketQuery:
    start: int
    end: int
    width: int
    limit: int
    first: int  # index of the page's first bucket
    group_by: tuple[str, ...]  # OpenAI names, in the order given
    filters: dict[str, tuple[str, ...]]  # rollup column -> allowed values

    @property
    def buckets(self) -> int:
        return math.ceil((self.end - self.start) / self.width)


def _array_name(name: str) -> str:
    """``group_by[]`` (the brackets some HTTP clients add to arrays) means ``group_by``."""
    return name[:-2] if name.endswith("[]") else name


def _seconds(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 12):  # "²".isdigit() is True
        raise QueryParamError(f"{name}: expected Unix seconds, got {text[:32]!r}", name)
    value = int(text)
    if value >= LATEST.timestamp():
        raise QueryParamError(f"{name}: must be before {LATEST:%Y-%m-%d}", name)
    return value


def encode_page(query: BucketQuery, first: int) -> str:
    """The cursor names the query's start, width and the next page's first bucket."""
    return base64.urlsafe_b64encode(f"{query.start}:{query.width}:{first}".encode()).decode().rstrip("=")


def _decode_page(text: str, start: int, width: int, buckets: int) -> int:
    bad = QueryParamError("page: not a next_page cursor of this query", "page")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    parts = raw.split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise bad
    if (int(parts[0]), int(parts[1])) != (start, width) or not 0 < int(parts[2]) < buckets:
        raise bad
    return int(parts[2])


def parse_bucket_query(items: list[tuple[str, str]], window_seconds: int, now: float | None = None) -> BucketQuery:
    """Validate the raw query pairs; raises QueryParamError naming the parameter at fault."""
    scalars: dict[str, str] = {}
    arrays: dict[str, list[str]] = {name: [] for name in _ARRAYS}
    for raw_name, value in items:
        name = _array_name(raw_name)
        if len(value) > 256:
            raise QueryParamError(f"{name}: value too long", name)
        if name in _ARRAYS:
            arrays[name] += [v for v in value.split(",") if v]
        elif name in _SCALARS and raw_name == name:
            if name in scalars:
                raise QueryParamError(f"{name}: given more than once", name)
            scalars[name] = value
        else:
            accepted = ", ".join(sorted(_SCALARS | _ARRAYS))
            raise QueryParamError(f"unknown parameter {raw_name[:40]!r}; accepted: {accepted}", raw_name[:40])
    if "start_time" not in scalars:
        raise QueryParamError("start_time: required (Unix seconds)", "start_time")
    start = _seconds(scalars["start_time"], "start_time")
    end = _seconds(scalars["end_time"], "end_time") if scalars.get("end_time") else int(now or time.time())
    if end <= start:
        raise QueryParamError("end_time: must be after start_time", "end_time")
    width_name = scalars.get("bucket_width") or "1d"
    if width_name not in BUCKET_WIDTHS:
        raise QueryParamError(
            f"bucket_width: expected one of {'|'.join(BUCKET_WIDTHS)}, got {width_name!r}", "bucket_width"
        )
    width, default_limit, max_limit = BUCKET_WIDTHS[width_name]
    if width < window_seconds:
        raise QueryParamError(
            f"bucket_width: {width_name} is finer than the stream's {window_seconds}s window", "bucket_width"
        )
    limit = default_limit
    if scalars.get("limit"):
        text = scalars["limit"]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= max_limit:
            raise QueryParamError(f"limit: expected 1 to {max_limit} for bucket_width {width_name}", "limit")
        limit = int(text)
    group_by: list[str] = []
    for field in arrays["group_by"]:
        if field not in GROUP_FIELDS:
            raise QueryParamError(
                f"group_by: expected some of {', '.join(GROUP_FIELDS)}, got {field[:40]!r}", "group_by"
            )
        if field not in group_by:
            group_by.append(field)
    filters: dict[str, tuple[str, ...]] = {}
    for name, column in FILTER_FIELDS.items():
        values = arrays[name]
        if len(values) > _MAX_VALUES:
            raise QueryParamError(f"{name}: at most {_MAX_VALUES} values", name)
        if values:
            filters[column] = tuple(parse_client(v, name) for v in values)
    buckets = math.ceil((end - start) / width)
    first = _decode_page(scalars["page"], start, width, buckets) if scalars.get("page") else 0
    return BucketQuery(start, end, width, limit, first, tuple(group_by), filters)


def _latency_quantiles(row: dict[str, Any]) -> dict[str, float | None]:
    """p50/p95 from the bucket's merged histogram (the upper bound of the histogram bucket that
    holds each); null when some of its requests have none (rollups written before v4)."""
    counts: dict[int, int] = {}
    for cell, n in (row.get("latency_hist") or {}).items():
        if n:
            lb = int(cell) % latency_hist.CELLS_PER_INPUT
            counts[lb] = counts.get(lb, 0) + int(n)
    if row.get("latency_uncovered") or not counts:
        return {"latency_ms_p50": None, "latency_ms_p95": None}
    q = latency_percentiles(counts)
    return {"latency_ms_p50": q["p50_latency_ms"], "latency_ms_p95": q["p95_latency_ms"]}


def _result(row: dict[str, Any], group_by: tuple[str, ...]) -> dict[str, Any]:
    requests = int(row["requests"])
    result: dict[str, Any] = {
        "object": "organization.usage.completions.result",
        "input_tokens": int(row["input_tokens"]),
        "output_tokens": int(row["output_tokens"]),
        "input_cached_tokens": 0,
        "input_audio_tokens": 0,
        "output_audio_tokens": 0,
        "num_model_requests": requests,
        "project_id": None,
        "user_id": None,
        "api_key_id": None,
        "model": None,
        "batch": None,
        # extensions
        "num_errors": int(row["errors"]),
        "num_truncated": int(row["truncated"]),
        "latency_ms_avg": round(float(row["latency_ms_sum"]) / requests, 2) if requests else None,
        "latency_ms_max": float(row["latency_ms_max"]),
        **_latency_quantiles(row),
    }
    for field in group_by:
        result[field] = row[GROUP_FIELDS[field]]
    return result


def build_page(rows: list[dict[str, Any]], query: BucketQuery) -> dict[str, Any]:
    """OpenAI's page object over ``rows`` (usage_buckets rows of this page's range)."""
    last = min(query.first + query.limit, query.buckets)
    by_bucket: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_bucket.setdefault(int(row["bucket"]), []).append(_result(row, query.group_by))
    data = [
        {
            "object": "bucket",
            "start_time": query.start + i * query.width,
            "end_time": min(query.start + (i + 1) * query.width, query.end),
            "results": by_bucket.get(i, []),
        }
        for i in range(query.first, last)
    ]
    more = last < query.buckets
    return {"object": "page", "data": data, "has_more": more, "next_page": encode_page(query, last) if more else None}


def fetch_page(store: Store, query: BucketQuery, client: str | None) -> dict[str, Any]:
    """Run the one query for this page's buckets and shape the answer."""
    page_start = query.start + query.first * query.width
    page_end = min(query.start + (query.first + query.limit) * query.width, query.end)
    columns = tuple(GROUP_FIELDS[g] for g in query.group_by)
    rows = usage_buckets(store, query.start, query.width, page_start, page_end, columns, query.filters, client)
    return build_page(rows, query)


def usage_completions_endpoint(
    store: Store,
    window_seconds: int,
    authenticate: Callable[[Request], Any],
    error: Callable[..., Response],
) -> Callable[[Request], Any]:
    """The route handler; ``authenticate`` and ``error`` are the usage API's own, so this
    route authenticates, scopes and fails exactly like the others."""

    async def handle(request: Request) -> Response:
        key = authenticate(request)
        if isinstance(key, Response):
            return key
        try:
            query = parse_bucket_query(request.query_params.multi_items(), window_seconds)
        except QueryParamError as exc:
            return error(400, "invalid_parameter", str(exc), exc.param)
        scope = None
        if not key.is_admin:
            others = set(query.filters.get("client_id", ())) - {key.client_id}
            if others:
                return error(403, "forbidden_client", "a client key can only read its own usage", "user_ids")
            scope = key.client_id
        try:
            page = await run_in_threadpool(fetch_page, store, query, scope)
        except Exception:  # never leak SQL or engine internals to the caller
            log.exception("usage API: usage/completions failed")
            return error(500, "report_failed", "usage/completions failed; see the sink log")
        return JSONResponse(page)

    return handle
