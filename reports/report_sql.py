"""The pieces every report query shares: the time range and client scope as a bound WHERE
clause, and rows made JSON-ready (times as ISO 8601 UTC with a Z). Its own module so that the
report modules (queries, ledger) can share them without importing each other."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from tokenaudit.reports.params import ReportParams


def iso_utc(value: datetime) -> str:
    """ISO 8601 UTC with a Z, as every report prints times."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def epoch_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def time_range(column: str, params: ReportParams, client: str | None) -> tuple[str, dict[str, Any]]:
    """WHERE clause for [since, until) on ``column``, an optional client scope and the optional
    department and model filters (every table read here has the three columns)."""
    where = (
        f"{column} >= fromUnixTimestamp64Milli({{since_ms:Int64}}, 'UTC') "
        f"AND {column} < fromUnixTimestamp64Milli({{until_ms:Int64}}, 'UTC')"
    )
    if params.since is None or params.until is None:  # parse_report_params sets both for a ranged report
        raise ValueError("a ranged report needs since and until")
    bound: dict[str, Any] = {"since_ms": epoch_ms(params.since), "until_ms": epoch_ms(params.until)}
    for name, column_name, value in (
        ("client", "client_id", client),
        ("department", "department", params.department),
        ("model", "model", params.model),
    ):
        if value is not None:
            where += f" AND {column_name} = {{{name}:String}}"
            bound[name] = value
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
