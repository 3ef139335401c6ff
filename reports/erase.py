"""``tokenaudit erase --client C``: the right to erasure for a client's per-request data.

What goes: the client's ledger rows (``usage_requests``) and sampled records (``usage_sampled``),
the tables that describe single requests (when, from which IP, how long). What stays: the
rollups and anomalies, the per-window aggregates that invoices and audits rest on.

The process that owns the store does the delete: with the embedded store that is the sink, so
the CLI asks the usage API's admin route; when nothing serves it (or with a ClickHouse server)
the CLI opens the store itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tokenaudit.infra.store import Store
from tokenaudit.reports.params import parse_client

ERASABLE = ("usage_requests", "usage_sampled")
ERASE_PATH = "admin/erase"


def erase_client(store: Store, client: str) -> list[dict[str, Any]]:
    """Delete every ledger row and sampled record of ``client``; what was removed per table
    (rows as stored: copies of a row that ClickHouse has not merged yet count each)."""
    removed = []
    for table in ERASABLE:
        found = store.query(f"SELECT count() AS n FROM {{db}}.{table} WHERE client_id = {{c:String}}", {"c": client})
        n = int(found[0]["n"]) if found else 0
        if n:
            # a lightweight delete: gone from every query at once, from disk at the next merge
            store.command(f"DELETE FROM {{db}}.{table} WHERE client_id = {{c:String}}", {"c": client})
        removed.append({"table": table, "client_id": client, "rows_removed": n})
    return removed


def erase_endpoint(
    store: Store, authenticate: Callable[[Any], Any], error: Callable[..., Any]
) -> Callable[[Any], Awaitable[Any]]:
    """``POST /v1/admin/erase?client=C`` (admin keys only), authenticated and answered like the
    usage API's other routes (``authenticate`` and ``error`` are the API's)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from tokenaudit.errors import QueryParamError

    async def handle(request: Request) -> Any:
        key = authenticate(request)
        if isinstance(key, Response):
            return key
        if not key.is_admin:
            return error(403, "admin_key_required", "erase needs an admin key")
        items = request.query_params.multi_items()
        if [name for name, _ in items] != ["client"]:
            return error(400, "invalid_parameter", "erase: expected exactly one client", "client")
        try:
            client = parse_client(items[0][1])
        except QueryParamError as exc:
            return error(400, "invalid_parameter", str(exc), "client")
        rows = await run_in_threadpool(erase_client, store, client)
        return JSONResponse({"report": "erase", "scope": client, "rows": rows})

    return handle


def erase(settings: Any, client: str) -> list[dict[str, Any]]:
    """Erase through whoever owns the store (see the module docstring)."""
    import httpx

    from tokenaudit.errors import UsageApiError
    from tokenaudit.infra.keys import read_api_key
    from tokenaudit.reports.usage_client import usage_api_url

    client = parse_client(client)
    if settings.embedded_clickhouse:
        key = read_api_key(settings)
        if key is not None:
            try:
                response = httpx.post(
                    f"{usage_api_url(settings)}/v1/{ERASE_PATH}",
                    params={"client": client},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=600,
                )
            except httpx.TransportError:
                response = None  # nothing serves the store: open it below
            if response is not None:
                body = (
                    response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
                )
                if response.status_code != 200:
                    message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
                    raise UsageApiError(f"usage API: {message or f'HTTP {response.status_code}'}")
                return list(body["rows"])
    store = Store.from_settings(settings, migrate_schema=False)
    try:
        return erase_client(store, client)
    finally:
        store.close()
