"""The one error envelope of every HTTP service (the inference app and the usage API):
OpenAI's shape, ``{"error": {"type", "message", "param", "code"}}``.

Why one writer: the shape was built in three places in the inference app and the usage API
answered ``{"error": "..."}``; OpenAI-compatible clients (the ``openai`` package among them)
read ``error.message`` and ``error.code``, so every service answers the same shape, written
here. ``type`` follows the status (OpenAI's names); ``code`` is the machine-readable reason
(the inference app also records it as the event's ``error_type``); ``param`` names the request
parameter at fault, when there is one.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.responses import Response

#: status -> OpenAI error type (anything else: invalid_request_error below 500, server_error from 500)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


#: a hard budget is spent (429): OpenAI answers an exhausted quota with this code and type, which
#: its clients tell apart from a rate limit (retrying will not help before the budget resets)
INSUFFICIENT_QUOTA = "insufficient_quota"

#: codes whose OpenAI error type is not their status's
CODE_TYPES = {INSUFFICIENT_QUOTA: "insufficient_quota"}


def error_type(status: int, code: str = "") -> str:
    return (
        CODE_TYPES.get(code)
        or ERROR_TYPES.get(status)
        or ("server_error" if status >= 500 else "invalid_request_error")
    )


def error_envelope(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": error_type(status, code), "message": message, "param": param, "code": code}}


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    # as Starlette's JSONResponse writes JSON (compact, UTF-8), whichever path sends it
    return json.dumps(error_envelope(status, code, message, param), ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    )


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    """A Starlette response carrying the envelope (routes and exception handlers)."""
    from starlette.responses import Response

    return Response(
        error_body(status, code, message, param),
        status_code=status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


async def send_error(
    send: Callable[[dict[str, Any]], Awaitable[None]],
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """The envelope sent on a raw ASGI ``send`` (middleware that answers before any route)."""
    body = error_body(status, code, message, param)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
