"""The web dashboard: static assets at ``/`` and the live anomaly stream, on the usage API's port.

The page is a static HTML file and one script (``dashboard_assets/``); every number it shows
comes from the usage API's own routes with the key the user signed in with, so scoping and
queries are the API's, never a second implementation. The charts are Chart.js, vendored at a
pinned version (``make vendor-charts``): one library that draws stacked areas, bars and
scatters without ``eval`` or injected styles, so the page keeps a strict Content-Security-Policy
(no inline script or style, nothing from another origin).

``GET /v1/anomalies/stream`` is text/event-stream: an ``event: ready`` once the process's one
anomaly consumer is at the end of the topic, then one ``event: anomaly`` per new anomaly in the
caller's scope, and a comment every few seconds to keep proxies from closing the connection.
The browser reads it with ``fetch`` (EventSource cannot send the Authorization header, and
the key must not travel in a URL, where access logs keep it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from tokenaudit.errors import QueryParamError
from tokenaudit.reports.anomaly_feed import AnomalyFeed
from tokenaudit.reports.anomaly_feed import Scope as FeedScope
from tokenaudit.reports.params import parse_client

ASSETS = Path(__file__).parent / "dashboard_assets"
STREAM_PATH = "/v1/anomalies/stream"
STREAM_PARAMS = frozenset({"client", "department", "model"})
#: served without a key: the page and its assets (the data behind them all need one)
OPEN_PATHS = frozenset({"/", "/dashboard"})
#: no inline script or style, nothing from another origin, no framing, no plug-ins
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_KEEPALIVE_SECONDS = 10.0
_READY_WAIT_SECONDS = 30.0


class _SecuredStatic(StaticFiles):
    """The assets, with the page's security headers on every answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_endpoint(
    feed: AnomalyFeed, authenticate: Callable[[Request], Any], error: Callable[..., Response]
) -> Callable[[Request], Any]:
    """``GET /v1/anomalies/stream[?client=&department=&model=]``: scoped like the reports."""

    async def handle(request: Request) -> Response:
        key = authenticate(request)
        if isinstance(key, Response):
            return key
        raw = dict(request.query_params.multi_items())
        unknown = sorted(set(raw) - STREAM_PARAMS)
        if unknown:
            return error(400, "invalid_parameter", f"stream: unknown parameter {unknown[0][:40]!r}", unknown[0][:40])
        try:
            wanted = {name: parse_client(value, name) for name, value in raw.items() if value}
        except QueryParamError as exc:
            return error(400, "invalid_parameter", str(exc), exc.param)
        client = wanted.get("client")
        if not key.is_admin:
            if client is not None and client != key.client_id:
                return error(403, "forbidden_client", "a client key can only read its own usage", "client")
            client = key.client_id
        subscriber = feed.subscribe(FeedScope(client, wanted.get("department"), wanted.get("model")))

        async def events() -> AsyncIterator[bytes]:
            try:
                deadline = time.monotonic() + _READY_WAIT_SECONDS
                while not feed.ready.is_set() and time.monotonic() < deadline:  # no thread held meanwhile
                    await asyncio.sleep(0.05)
                yield _sse("ready", {"scope": client or "*", "live": feed.ready.is_set()})
                while True:
                    try:
                        anomaly = await asyncio.wait_for(subscriber.queue.get(), _KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield _sse("anomaly", anomaly)
            finally:
                feed.unsubscribe(subscriber)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return handle


async def _index(request: Request) -> Response:
    return FileResponse(ASSETS / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


def dashboard_routes(
    feed: AnomalyFeed, authenticate: Callable[[Request], Any], error: Callable[..., Response]
) -> list[BaseRoute]:
    """The page, its assets and the live stream, for the usage API's route list."""
    return [
        Route("/", _index, methods=["GET"]),
        Route(STREAM_PATH, stream_endpoint(feed, authenticate, error), methods=["GET"]),
        Mount("/dashboard", app=_SecuredStatic(directory=ASSETS), name="dashboard"),
    ]
