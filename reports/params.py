"""Parse and validate the parameters of the fixed usage reports.

One parser for both doors in (the CLI and the usage API) so the same string means the same
thing everywhere and a bad value fails the same way. Every value is checked against a
whitelist, a pattern or a range before any SQL is built; the SQL itself only ever sees the
parsed values as bound parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from tokenaudit.errors import QueryParamError

GROUPINGS = ("client", "department", "model", "minute", "hour", "day")
#: latency ``bucket=``: per client, model and input-token bucket (the default); by input-token
#: bucket over every client and model; or over time
LATENCY_BUCKETS = ("client", "input", "minute", "hour", "day")
#: the cost report's ``detail=``: every client line with the token rows per day (the default), or
#: the department subtotals and the total only (the dashboard's panel: a small answer all month)
REPORT_DETAILS = ("client", "department")
#: narrowing filters every ranged report takes (the dashboard's department and model pickers)
_FILTERS = frozenset({"client", "department", "model"})

#: report name -> the parameters it accepts (anything else is an error, not ignored)
REPORT_PARAMS: dict[str, frozenset[str]] = {
    "usage": frozenset({"since", "until", "by"}) | _FILTERS,
    "top": frozenset({"since", "until", "limit"}) | _FILTERS,
    "report": frozenset({"month", "client", "detail"}),
    "latency": frozenset({"since", "until", "bucket"}) | _FILTERS,
    "anomalies": frozenset({"since", "until", "limit"}) | _FILTERS,
    "samples": frozenset({"since", "until", "limit"}) | _FILTERS,
    # the ledger (usage_requests): every request, filtered; one request by its id
    "requests": frozenset({"since", "until", "limit", "client", "ip", "status", "model"}),
    "request": frozenset({"id", "client"}),
}
DEFAULT_SINCE = "24h"
MAX_LIMIT = 10_000
_MAX_VALUE_LEN = 64
_RELATIVE = re.compile(r"(\d{1,6})([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# client ids are issued by the key registry; this pattern admits every id it can issue that a
# human would type, and nothing with quotes, spaces, semicolons or comment markers
_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+/-]{0,127}")
_MONTH = re.compile(r"(\d{4})-(\d{2})")
# an IPv4/IPv6 address, a truncated network or a hashed address's hex (what the ledger stores)
_IP = re.compile(r"[0-9A-Fa-f:.]{1,64}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+/-]{0,127}")
# request ids are the client's X-Request-ID (inference/audit.py: printable, bounded) or the
# event id's hex; event ids are UUID text
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:@+/=-]{1,128}")
_LONG_VALUES = {"id": 128}
# times the store can hold (DateTime64 reaches 2299) and arithmetic on them cannot overflow
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ReportParams:
    """Parsed, validated parameters; fields a report does not take stay None."""

    since: datetime | None = None
    until: datetime | None = None
    by: str | None = None
    limit: int | None = None
    month_start: datetime | None = None
    month_end: datetime | None = None
    client: str | None = None
    department: str | None = None
    model: str | None = None
    bucket: str | None = None
    detail: str | None = None
    ip: str | None = None
    status: int | None = None
    request_id: str | None = None


def parse_time(value: str, name: str, now: datetime) -> datetime:
    """``15m``/``24h``/``7d``/``2w`` before ``now``, or an ISO date/time (naive means UTC)."""
    text = value.strip()
    match = _RELATIVE.fullmatch(text)
    try:
        if match:
            parsed = now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        else:
            parsed = (
                datetime.fromisoformat(text.replace("Z", "+00:00"))
                if "T" in text or " " in text
                else datetime.combine(date.fromisoformat(text), datetime.min.time())
            )
            parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except ValueError:
        raise QueryParamError(
            f"{name}: expected a duration like 15m, 24h, 7d or an ISO time like 2026-01-31T12:00, got {value!r}", name
        ) from None
    except OverflowError:  # 999999w back from now, or year 1 shifted by its zone
        parsed = EARLIEST - timedelta(days=1)
    if not EARLIEST <= parsed < LATEST:
        raise QueryParamError(f"{name}: must be between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}, got {value!r}", name)
    return parsed


def parse_month(value: str) -> tuple[datetime, datetime]:
    """``YYYY-MM`` -> [first instant of the month, first instant of the next), UTC."""
    match = _MONTH.fullmatch(value.strip())
    if not match or not 1 <= int(match.group(2)) <= 12 or not EARLIEST.year <= int(match.group(1)) < LATEST.year:
        raise QueryParamError(f"month: expected YYYY-MM (e.g. 2026-01), got {value!r}", "month")
    year, month = int(match.group(1)), int(match.group(2))
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def parse_limit(value: str) -> int:
    text = value.strip()
    # isascii: "²".isdigit() is True, but int("²") raises
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise QueryParamError(f"limit: expected a whole number from 1 to {MAX_LIMIT}, got {value!r}", "limit")
    return int(text)


def parse_client(value: str, name: str = "client") -> str:
    """A client id, department or model name: the same safe pattern for all three."""
    if not _CLIENT.fullmatch(value):
        what = "a client id" if name == "client" else f"a {name} name"
        raise QueryParamError(f"{name}: expected {what} (letters, digits, _ . : @ + / -), got {value!r}", name)
    return value


def parse_report_params(report: str, raw: Mapping[str, str], now: datetime | None = None) -> ReportParams:
    """Validate raw string parameters for ``report``; raises QueryParamError on the first bad one."""
    if report not in REPORT_PARAMS:
        raise QueryParamError(f"unknown report {report!r}; one of {', '.join(REPORT_PARAMS)}")
    allowed = REPORT_PARAMS[report]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise QueryParamError(
            f"{report}: unknown parameter(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(sorted(allowed))}",
            unknown[0],
        )
    for name, value in raw.items():
        if not isinstance(value, str) or len(value) > _LONG_VALUES.get(name, _MAX_VALUE_LEN):
            raise QueryParamError(f"{name}: value too long or not text", name)
    now = now or datetime.now(UTC)
    values: dict[str, Any] = {}
    if "since" in allowed:
        values["since"] = parse_time(raw.get("since") or DEFAULT_SINCE, "since", now)
        values["until"] = parse_time(raw["until"], "until", now) if raw.get("until") else now
        if values["until"] <= values["since"]:
            raise QueryParamError("until: must be after since", "until")
    if "by" in allowed:
        by = raw.get("by") or "client"
        if by not in GROUPINGS:
            raise QueryParamError(f"by: expected one of {'|'.join(GROUPINGS)}, got {by!r}", "by")
        values["by"] = by
    if "bucket" in allowed:
        bucket = raw.get("bucket") or "client"
        if bucket not in LATENCY_BUCKETS:
            raise QueryParamError(f"bucket: expected one of {'|'.join(LATENCY_BUCKETS)}, got {bucket!r}", "bucket")
        values["bucket"] = bucket
    if "limit" in allowed:
        values["limit"] = parse_limit(raw["limit"]) if raw.get("limit") else (10 if report == "top" else 1000)
    if "month" in allowed:
        if not raw.get("month"):
            raise QueryParamError("month: required (YYYY-MM)", "month")
        values["month_start"], values["month_end"] = parse_month(raw["month"])
    if "detail" in allowed:
        detail = raw.get("detail") or "client"
        if detail not in REPORT_DETAILS:
            raise QueryParamError(f"detail: expected one of {'|'.join(REPORT_DETAILS)}, got {detail!r}", "detail")
        values["detail"] = detail
    for name in ("client", "department"):
        if raw.get(name):
            values[name] = parse_client(raw[name], name)
    if raw.get("model"):
        values["model"] = _match(_MODEL, raw["model"], "model", "a model name")
    if "ip" in allowed and raw.get("ip"):
        values["ip"] = _match(_IP, raw["ip"].strip(), "ip", "an IP address like 10.0.0.5 or 2001:db8::1")
    if "status" in allowed and raw.get("status"):
        text = raw["status"].strip()
        if not (text.isascii() and text.isdigit() and 100 <= int(text) <= 599):
            raise QueryParamError(f"status: expected an HTTP status from 100 to 599, got {raw['status']!r}", "status")
        values["status"] = int(text)
    if "id" in allowed:
        if not raw.get("id"):
            raise QueryParamError("id: required (a request_id or event_id)", "id")
        values["request_id"] = _match(_REQUEST_ID, raw["id"], "id", "a request_id or event_id")
    return ReportParams(**values)


def _match(pattern: re.Pattern[str], value: str, name: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise QueryParamError(f"{name}: expected {what}, got {value!r}", name)
    return value
