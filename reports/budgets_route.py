"""``GET /v1/budgets``: each budget with what its scope spent this period and what is left.

Spend comes from the stream (the spend topic, about every second, through the shared
:class:`~tokenaudit.infra.budget_view.BudgetView`), so it trails requests by a second or two and
does not include what inference instances hold in reservations. Scoping: an admin key sees
every budget (``client=`` narrows to that client's own budget); a client key
sees the budgets its own requests count against: its client's and its department's (a
department budget can refuse its requests, so it must see it); asking for another client is 403.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tokenaudit.infra.budget_view import BudgetView, ScopeKey, scopes_of
from tokenaudit.reports.report_sql import iso_utc
from tokenaudit.schemas.budgets import spent

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from tokenaudit.infra.keys import ApiKey
    from tokenaudit.settings import Settings

PATH = "/v1/budgets"
PARAMS = frozenset({"client"})
CATCH_UP_SECONDS = 10.0  # after the view starts, calls wait this long at most for the topics to be read


def budget_rows(view: BudgetView, scopes: set[ScopeKey] | None, now_ms: int | None = None) -> list[dict[str, Any]]:
    """One row per budget (all, or those of ``scopes``), sorted by scope: limit, spent,
    remaining and when the period resets, in the budget's unit."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    rows = []
    for (scope, scope_id), b in sorted(view.budgets().items()):
        if scopes is not None and (scope, scope_id) not in scopes:
            continue
        s = view.spent(scope, scope_id, b["period"], now)
        used = spent(b["unit"], s.input_tokens, s.output_tokens, s.cost)
        rows.append(
            {
                "scope": scope,
                "scope_id": scope_id,
                "unit": b["unit"],
                "period": b["period"],
                "hard": b["hard"],
                "limit": b["limit"],
                "spent": used,
                "remaining": max(0.0, b["limit"] - used),
                "period_start": iso_utc(datetime.fromtimestamp(s.period_start / 1000, UTC)),
                "resets_at": iso_utc(datetime.fromtimestamp(s.period_end / 1000, UTC)),
                "input_tokens": s.input_tokens,
                "output_tokens": s.output_tokens,
                "cost": s.cost,
                "unpriced_tokens": s.unpriced_tokens,
            }
        )
    return rows


class BudgetsRoute:
    """The route, authenticating and answering errors like every usage-API route. The view
    (a follower of the budgets and spend topics) starts on the first call, so an API that is
    never asked for budgets opens no Kafka connection; :meth:`close` stops it. Only the calls of
    the view's first seconds wait for it to read the topics: once that time is out, a view still
    not caught up (the broker unreachable) is a 503 at once, not an empty list that would read as
    "no budgets", nor a wait on every call that would hold the dashboard's refresh."""

    def __init__(
        self,
        settings: Settings,
        authenticate: Callable[[Request], ApiKey | Response],
        error: Callable[..., Response],
        view_factory: Callable[[Settings], BudgetView] = BudgetView,
    ):
        self.settings, self.authenticate, self.error, self.view_factory = settings, authenticate, error, view_factory
        self._lock = threading.Lock()
        self._view: BudgetView | None = None
        self._wait_until = 0.0  # monotonic: calls before it wait for the view to catch up

    def view(self) -> BudgetView | None:
        """The view, caught up with the topics, or None when it is not (after its first seconds)."""
        with self._lock:
            if self._view is None:
                self._view = self.view_factory(self.settings).start()
                self._wait_until = time.monotonic() + CATCH_UP_SECONDS
            view, wait = self._view, self._wait_until - time.monotonic()
        return view if view.wait_caught_up(max(0.0, wait)) else None

    def close(self) -> None:
        with self._lock:
            if self._view is not None:
                self._view.close()
                self._view = None

    async def handle(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, Response

        key = self.authenticate(request)
        if isinstance(key, Response):
            return key
        items = request.query_params.multi_items()
        if any(name not in PARAMS for name, _ in items) or len(items) > 1:
            return self.error(400, "invalid_parameter", "budgets: the only parameter is client (once)")
        client = items[0][1] if items else None
        if client is not None and not client:
            return self.error(400, "invalid_parameter", "client: must not be empty", "client")
        scopes: set[ScopeKey] | None = None
        if not key.is_admin:
            if client is not None and client != key.client_id:
                return self.error(403, "forbidden_client", "a client key can only read its own budgets", "client")
            scopes = set(scopes_of(key.client_id, key.department))
        elif client is not None:
            scopes = {("client", client)}
        view = await run_in_threadpool(self.view)
        if view is None:
            return self.error(
                503, "budgets_unavailable", "budgets: the budget topics cannot be read now (is Kafka reachable?)"
            )
        rows = budget_rows(view, scopes)
        return JSONResponse({"report": "budgets", "scope": "*" if key.is_admin else key.client_id, "rows": rows})
