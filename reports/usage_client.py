"""Where the CLI's reports come from: ClickHouse directly, or the usage API over HTTP.

A chDB store can be opened by one process at a time, and while the pipeline runs that is
the sink. So in embedded mode the CLI asks the sink's usage API (if nothing serves it, the
store is free and is opened directly); in server mode (http(s) DSN) the CLI queries
ClickHouse itself. Both paths take the same raw string parameters through the same parser,
so they accept and reject exactly the same input and return the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import httpx

from tokenaudit.errors import UsageApiError, UsageApiUnreachable
from tokenaudit.infra.keys import admin_key_path, read_api_key
from tokenaudit.reports.params import parse_report_params
from tokenaudit.reports.queries import run_report

if TYPE_CHECKING:
    from tokenaudit.infra.store import Store
    from tokenaudit.settings import Settings

#: raw report parameters as the CLI and the API take them (None or "": not given)
RawParams = Mapping[str, str | None]


class Reports(Protocol):
    def fetch(self, report: str, params: RawParams) -> list[dict[str, Any]]: ...


class DirectReports:
    """Reports straight from a Store (server mode, or embedded when no sink holds the store)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def fetch(self, report: str, params: RawParams) -> list[dict[str, Any]]:
        from clickhouse_connect.driver.exceptions import ClickHouseError as DriverError

        from tokenaudit.infra.clickhouse import ClickHouseError

        parsed = parse_report_params(report, _drop_empty(params))
        try:
            return run_report(self.store, report, parsed)
        except DriverError as exc:  # e.g. a server whose schema was never migrated
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ClickHouseError(f"{report} query failed: {first} (has `tokenaudit db migrate` run?)") from None


class ApiReports:
    """Reports from the usage API; ``http`` may be any httpx.Client (a Starlette TestClient too)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0, http: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http or httpx.Client(timeout=timeout)
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def fetch(self, report: str, params: RawParams) -> list[dict[str, Any]]:
        query = _drop_empty(params)
        if report == "request":  # GET /v1/requests/{id}
            url = f"{self.base_url}/v1/requests/{quote(query.pop('id', ''), safe='')}"
        else:
            url = f"{self.base_url}/v1/{report}"
        try:
            response = self.http.get(url, params=query, headers=self.headers)
        except httpx.TransportError as exc:
            raise UsageApiUnreachable(
                f"usage API at {self.base_url} is not reachable ({exc.__class__.__name__}); "
                "is the pipeline running (`tokenaudit up`)?"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if report == "request" and response.status_code == 404:
            return []  # no such request in this key's scope: the same answer as the direct path
        if response.status_code != 200:
            error = body.get("error") if isinstance(body, dict) else None
            message = error.get("message") if isinstance(error, dict) else None  # the OpenAI envelope
            raise UsageApiError(f"usage API: {message or f'HTTP {response.status_code}'}")
        rows: list[dict[str, Any]] = body["rows"]  # the usage API's answer (reports/usage_api.py)
        return rows


def _drop_empty(params: RawParams) -> dict[str, str]:
    return {k: v for k, v in params.items() if v is not None and v != ""}


def usage_api_url(settings: Settings) -> str:
    return f"http://{settings.usage_api_host}:{settings.usage_api_port}"


class _EmbeddedReports:
    """Embedded mode: the usage API if a sink serves it, else the (then free) store itself."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._direct: DirectReports | None = None

    def fetch(self, report: str, params: RawParams) -> list[dict[str, Any]]:
        if self._direct is None:
            key = read_api_key(self.settings)
            try:
                if key is None:
                    raise UsageApiUnreachable("no key")  # no key: only the direct path can work
                return ApiReports(usage_api_url(self.settings), key).fetch(report, params)
            except UsageApiUnreachable as unreachable:
                parse_report_params(report, _drop_empty(params))  # a bad parameter fails as such
                self._direct = self._open_direct(unreachable, key is None)
        return self._direct.fetch(report, params)

    def _open_direct(self, unreachable: UsageApiUnreachable, no_key: bool) -> DirectReports:
        from tokenaudit.infra.clickhouse import ClickHouseError
        from tokenaudit.infra.store import Store

        try:
            return DirectReports(Store.from_settings(self.settings))
        except ClickHouseError as exc:
            hint = (
                (
                    f"no API key for the usage API: set TOKENAUDIT_API_KEY or run `tokenaudit up` "
                    f"(it writes {admin_key_path(self.settings)})"
                )
                if no_key
                else str(unreachable)
            )
            raise UsageApiError(f"{hint}; and the store cannot be opened directly: {exc}") from None


def open_reports(settings: Settings) -> Reports:
    """The right report source for these settings (see the module docstring)."""
    if settings.embedded_clickhouse:
        return _EmbeddedReports(settings)
    from tokenaudit.infra.store import Store

    return DirectReports(Store.from_settings(settings, migrate_schema=False))
