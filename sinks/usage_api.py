"""Read-only usage API, served by the process that owns the store (the sink, in embedded mode).

Only the fixed reports of :mod:`tokenaudit.sinks.queries` are exposed, never SQL:

    GET /healthz                                   (no key)
    GET /v1/usage?since=&until=&by=&client=
    GET /v1/top?since=&until=&limit=&client=
    GET /v1/report?month=YYYY-MM&client=           (tokens per department/client/model;
                                                    the caller prices them)
    GET /v1/latency?since=&until=&client=
    GET /v1/anomalies?since=&until=&limit=&client=
    GET /v1/admin/verify?since_ms=&until_ms=       (admin keys only: the store side of
                                                    `tokenaudit verify`, see sinks/verify.py)

Every /v1 call needs ``Authorization: Bearer <key>`` from the API-key registry. A client key
is scoped to its own client_id (asking for another is 403); an admin key sees everything
and may narrow with ``client=``. A bad or unknown parameter, or a repeated one, is a 400
with a JSON error before any SQL runs. Answers are ``{"report", "scope", "settled_until",
"rows": [...]}``: windows that start before ``settled_until`` will not change any more
(see :func:`~tokenaudit.sinks.queries.settled_until`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tokenaudit.sinks.admin_key import registry_path
from tokenaudit.sinks.params import REPORT_PARAMS, QueryParamError, parse_report_params
from tokenaudit.sinks.queries import iso_utc, run_report, settled_until
from tokenaudit.sinks.verify import API_PATH, admin_verify_endpoint

log = logging.getLogger(__name__)


class _Registry:
    """The key registry, re-read when the file changes (keys added while the sink runs work
    at once, without a restart)."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._registry = None
        self._lock = threading.Lock()

    def lookup(self, raw: str):
        from tokenaudit.inference.api_keys import KeyRegistry

        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        with self._lock:
            if self._stamp != (st.st_mtime_ns, st.st_size):
                self._registry = KeyRegistry.load(self.path)
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._registry.lookup(raw)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(store, settings, keys_path: Path | None = None) -> Starlette:
    """The usage API over ``store``; keys come from the registry named by ``settings``."""
    registry = _Registry(Path(keys_path) if keys_path else registry_path(settings))

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def endpoint(report: str):
        async def handle(request: Request) -> JSONResponse:
            scheme, _, raw_key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not raw_key.strip():
                return _error(401, "missing Authorization: Bearer <api key>")
            try:
                key = registry.lookup(raw_key.strip())
            except ValueError as exc:  # KeyRegistryError: the registry file is broken
                log.error("usage API: %s", exc)
                return _error(503, "API-key registry is unreadable; see the sink log")
            if key is None:
                return _error(401, "unknown API key")
            items = request.query_params.multi_items()
            names = [name for name, _ in items]
            if len(names) != len(set(names)):
                return _error(400, "a parameter was given more than once")
            try:
                params = parse_report_params(report, dict(items))
            except QueryParamError as exc:
                return _error(400, str(exc))
            scope = params.client
            if not key.is_admin:
                if scope is not None and scope != key.client_id:
                    return _error(403, "a client key can only read its own usage")
                scope = key.client_id
            try:
                rows = await run_in_threadpool(run_report, store, report, params, scope)
            except Exception:  # never leak SQL or engine internals to the caller
                log.exception("usage API: %s report failed", report)
                return _error(500, f"{report} report failed; see the sink log")
            return JSONResponse({"report": report, "scope": scope or "*",
                                 "settled_until": iso_utc(settled_until(settings)), "rows": rows})

        return handle

    routes = [Route("/healthz", healthz)]
    routes += [Route(f"/v1/{name}", endpoint(name), methods=["GET"]) for name in REPORT_PARAMS]
    routes.append(Route(f"/v1/{API_PATH}", admin_verify_endpoint(store, settings, registry.lookup, _error),
                        methods=["GET"]))
    return Starlette(routes=routes)
