"""Read-only usage API, served by the process that owns the store (the sink, in embedded mode).

Only the fixed reports of :mod:`tokenaudit.reports.queries` are exposed, never SQL:

    GET /healthz                                   (no key)
    GET /v1/usage?since=&until=&by=&client=
    GET /v1/top?since=&until=&limit=&client=
    GET /v1/report?month=YYYY-MM&client=&detail=   (tokens per department/client/model in
                                                    ``rows``, and ``cost``: the cost report priced
                                                    with TOKENAUDIT_PRICE_TABLE, or ``cost_error``;
                                                    detail=department: subtotals only, no rows,
                                                    see reports/cost_view.py)
    GET /v1/latency?since=&until=&bucket=&client=
    GET /v1/anomalies?since=&until=&limit=&client=
    GET /v1/samples?since=&until=&limit=&client=   (sampled requests: the scatter)
    GET /v1/organization/usage/completions         (OpenAI's Usage API shape: reports/openai_usage.py)
    GET /v1/anomalies/stream                       (server-sent events: reports/anomaly_feed.py)
    GET /                                          (the dashboard: reports/dashboard.py)
    GET /v1/requests?since=&until=&limit=&client=&ip=&status=&model=   (the ledger)
    GET /v1/requests/{id}                          (a request_id or event_id; 404 if none in scope)
    GET /v1/budgets?client=                        (limit, spent, remaining, resets_at per budget:
                                                    reports/budgets_route.py)
    POST /v1/admin/erase?client=                   (admin keys only: a client's ledger rows and
                                                    sampled records, see reports/erase.py)
    GET /v1/admin/verify?since_ms=&until_ms=       (admin keys only: the store side of
                                                    `tokenaudit verify`, see reports/verify_route.py)

usage, top, latency, anomalies and samples also take ``department=`` and ``model=`` filters.

Every /v1 call needs ``Authorization: Bearer <key>`` from the API-key registry. A client key
is scoped to its own client_id (asking for another is 403); an admin key sees everything
and may narrow with ``client=``. A bad or unknown parameter, or a repeated one, is a 400
with the error envelope before any SQL runs. Answers are ``{"report", "scope", "settled_until",
"rows": [...]}``: windows that start before ``settled_until`` will not change any more
(see :func:`~tokenaudit.reports.queries.settled_until`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tokenaudit.errors import QueryParamError
from tokenaudit.infra.kafka_clients import kafka_config
from tokenaudit.infra.keys import ApiKey, AuthError, KeyRegistry, marker_path
from tokenaudit.reports.anomaly_feed import AnomalyFeed
from tokenaudit.reports.budgets_route import PATH as BUDGETS_PATH
from tokenaudit.reports.budgets_route import BudgetsRoute
from tokenaudit.reports.cost_view import department_answer
from tokenaudit.reports.dashboard import dashboard_routes
from tokenaudit.reports.erase import ERASE_PATH, erase_endpoint
from tokenaudit.reports.openai_usage import PATH as OPENAI_USAGE_PATH
from tokenaudit.reports.openai_usage import usage_completions_endpoint
from tokenaudit.reports.params import REPORT_PARAMS, parse_report_params
from tokenaudit.reports.prices import priced_answer
from tokenaudit.reports.queries import iso_utc, run_report, settled_until
from tokenaudit.reports.verify import API_PATH
from tokenaudit.reports.verify_route import admin_verify_endpoint
from tokenaudit.schemas.http_errors import error_response

if TYPE_CHECKING:
    from tokenaudit.infra.store import Store
    from tokenaudit.settings import Settings

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, param: str | None = None) -> Response:
    """Every error of the usage API: the OpenAI envelope both HTTP services answer with."""
    return error_response(status, code, message, param)


def create_app(store: Store, settings: Settings, keys_path: Path | None = None) -> Starlette:
    """The usage API over ``store``; keys come from the registry named by ``settings`` (the
    same module, rules and reload as the inference app: revoked or expired keys stop working
    within a second; a missing registry after one existed is a 503)."""
    if keys_path:
        registry = KeyRegistry(Path(keys_path), marker=marker_path(settings), required=True)
    else:
        registry = KeyRegistry.from_settings(settings)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def authenticate(request: Request) -> ApiKey | Response:
        """The caller's key, or the error response to send (the usage API has no open mode)."""
        try:
            key = registry.authenticate(request.headers.get("authorization"), allow_open=False)
        except AuthError as err:
            return _error(err.status, err.code, err.message)
        if key is None:  # allow_open=False: authenticate returns a key or raises
            raise AssertionError("authenticate returned no key with allow_open=False")
        return key

    def endpoint(report: str, path_param: str | None = None) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            key = authenticate(request)
            if isinstance(key, Response):
                return key
            items = request.query_params.multi_items()
            if path_param is not None:  # /v1/requests/{id}: the id is part of the path
                items.append((path_param, request.path_params[path_param]))
            names = [name for name, _ in items]
            if len(names) != len(set(names)):
                return _error(400, "invalid_parameter", "a parameter was given more than once")
            try:
                params = parse_report_params(report, dict(items))
            except QueryParamError as exc:
                return _error(400, "invalid_parameter", str(exc), exc.param)
            scope = params.client
            if not key.is_admin:
                if scope is not None and scope != key.client_id:
                    return _error(403, "forbidden_client", "a client key can only read its own usage", "client")
                scope = key.client_id
            department = report == "report" and params.detail == "department"
            try:
                if department:  # the dashboard's cost panel: subtotals only, from fewer rows
                    priced = await run_in_threadpool(department_answer, store, params, scope, settings.price_table)
                    rows = priced.pop("rows")
                else:
                    rows = await run_in_threadpool(run_report, store, report, params, scope)
            except Exception:  # never leak SQL or engine internals to the caller
                log.exception("usage API: %s report failed", report)
                return _error(500, "report_failed", f"{report} report failed; see the sink log")
            if report == "request" and not rows:
                return _error(404, "not_found", f"no request {params.request_id} (in this key's scope)", "id")
            body = {
                "report": report,
                "scope": scope or "*",
                "settled_until": iso_utc(settled_until(settings)),
                "rows": rows,
            }
            if department:
                body.update(priced)
            elif report == "report":  # priced here, with the API's price table
                body.update(priced_answer(rows, settings.price_table))
            return JSONResponse(body)

        return handle

    # messages take the path from the scope: request.url raises on a query string that is not UTF-8
    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, "not_found", f"no route {request.scope['path'][:200]}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return _error(
            405, "method_not_allowed", f"{request.method[:16]} is not allowed on {request.scope['path'][:200]}"
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("usage API: %s on %s", type(exc).__name__, request.scope["path"][:200], exc_info=exc)
        return _error(500, "internal_error", "internal error; see the sink log")

    routes: list[BaseRoute] = [Route("/healthz", healthz)]
    routes += [Route(f"/v1/{name}", endpoint(name), methods=["GET"]) for name in REPORT_PARAMS if name != "request"]
    routes.append(Route("/v1/requests/{id:path}", endpoint("request", "id"), methods=["GET"]))
    routes.append(Route(f"/v1/{ERASE_PATH}", erase_endpoint(store, authenticate, _error), methods=["POST"]))
    routes.append(
        Route(f"/v1/{API_PATH}", admin_verify_endpoint(store, settings, authenticate, _error), methods=["GET"])
    )
    routes.append(
        Route(
            OPENAI_USAGE_PATH,
            usage_completions_endpoint(store, settings.window_seconds, authenticate, _error),
            methods=["GET"],
        )
    )
    budgets = BudgetsRoute(settings, authenticate, _error)
    routes.append(Route(BUDGETS_PATH, budgets.handle, methods=["GET"]))
    feed = AnomalyFeed(lambda: kafka_config(settings), settings.topic_anomalies)
    routes += dashboard_routes(feed, authenticate, _error)
    app = Starlette(
        routes=routes, exception_handlers={404: not_found, 405: method_not_allowed, Exception: server_error}
    )
    app.state.anomaly_feed = feed  # tests and the bench read how far it is
    app.state.budgets_route = budgets  # tests close its view
    return app
