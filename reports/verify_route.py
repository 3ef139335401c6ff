"""``GET /v1/admin/verify``: the store side of `tokenaudit verify` (:mod:`.verify`), served by
the process that owns the store (the usage API's listener)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tokenaudit.reports.verify import store_totals

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from tokenaudit.infra.keys import ApiKey
    from tokenaudit.infra.store import Store
    from tokenaudit.settings import Settings


def admin_verify_endpoint(
    store: Store,
    settings: Settings,
    authenticate: Callable[[Request], ApiKey | Response],
    error: Callable[..., Response],
) -> Callable[[Request], Awaitable[Response]]:
    """``GET /v1/admin/verify?since_ms=&until_ms=``: the store side of a verify, admin keys only.

    ``authenticate(request)`` returns the caller's key or the error response to send, and
    ``error(status, code, message[, param])`` makes the API's error response (the envelope);
    both come from the usage API, so this route
    authenticates and answers exactly like the others."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response

    async def handle(request: Request) -> Response:
        key = authenticate(request)
        if isinstance(key, Response):
            return key
        if not key.is_admin:
            return error(403, "admin_key_required", "verify needs an admin key")
        items = request.query_params.multi_items()
        params = dict(items)
        if len(items) != 2 or set(params) != {"since_ms", "until_ms"}:
            return error(
                400, "invalid_parameter", "verify: expected exactly since_ms and until_ms (epoch milliseconds)"
            )
        bounds = []
        for name in ("since_ms", "until_ms"):
            text = params[name]
            if not (text.isascii() and text.isdigit() and len(text) <= 15):  # "²".isdigit() is True
                return error(400, "invalid_parameter", f"{name}: expected epoch milliseconds, got {text[:32]!r}", name)
            bounds.append(int(text))
        if bounds[1] <= bounds[0]:
            return error(400, "invalid_parameter", "until_ms: must be after since_ms", "until_ms")
        rows = await run_in_threadpool(
            store_totals, store, bounds[0], bounds[1], settings.window_seconds * 1000, settings.ledger
        )
        return JSONResponse({"report": "verify", "scope": "*", "rows": rows})

    return handle
