"""Request bodies in, JSON errors out: the input rules every /v1 route shares.

The body limit is enforced while the body streams in (a declared Content-Length over the limit
is refused before reading anything), so an oversized upload costs at most the limit in memory.
Errors use OpenAI's shape ``{"error": {"type", "message", "param", "code"}}``, written by
:mod:`tokenaudit.schemas.http_errors` (the one envelope of every HTTP service); ``code`` is also
the event's ``error_type``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from tokenaudit.inference.audit import context_of
from tokenaudit.schemas import http_errors


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers


class Disconnected(Exception):
    """The client went away while we were reading its request."""


def error_response(request: Request, err: ApiError) -> Response:
    context_of(request.scope).error_type = err.code
    return http_errors.error_response(err.status, err.code, err.message, err.param, err.headers)


async def read_json_object(request: Request, limit: int) -> dict:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {ctype or 'none'!r}")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:  # "²".isdigit() is True
        raise ApiError(413, "body_too_large", f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body_too_large", f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Disconnected() from None
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, "invalid_json", f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError:  # an integer past Python's digit limit (int_max_str_digits)
        raise ApiError(400, "invalid_json", "request body holds a number too long to read") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", f"request body must be a JSON object, got {type(data).__name__}")
    return data


def require_prompt(data: dict, name: str = "prompt") -> str:
    value = data.get(name)
    if isinstance(value, list) and len(value) == 1:  # OpenAI allows a one-element list
        value = value[0]
    if value is None:
        raise ApiError(400, "invalid_prompt", f"'{name}' is required", name)
    if not isinstance(value, str):
        raise ApiError(400, "invalid_prompt", f"'{name}' must be a string, got {type(value).__name__}", name)
    if not value.strip():
        raise ApiError(400, "invalid_prompt", f"'{name}' must not be empty", name)
    return value


def optional_int(data: dict, names: tuple[str, ...], default: int, low: int, high: int) -> int:
    for name in names:
        if name in data and data[name] is not None:
            value: Any = data[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ApiError(
                    400, "invalid_max_new_tokens", f"'{name}' must be an integer, got {type(value).__name__}", name
                )
            if not low <= value <= high:
                raise ApiError(
                    400, "invalid_max_new_tokens", f"'{name}' must be between {low} and {high}, got {value}", name
                )
            return value
    return default


def optional_bool(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_parameter", f"'{name}' must be a boolean", name)
    return value
