"""Call an ASGI app in process with raw bytes (no client library to tidy headers or bodies up):
what the fuzz tests use to reach every layer with exactly what they generated."""

from __future__ import annotations

import asyncio
import json


async def call(
    app,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> tuple[int, dict, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in headers],
        "client": client,
        "server": ("127.0.0.1", 8000),
    }
    sent_body = False
    done = asyncio.Event()
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start["headers"]}, out


def run(app, *args, **kwargs) -> tuple[int, dict, bytes]:
    return asyncio.run(call(app, *args, **kwargs))


def json_body(raw: bytes):
    return json.loads(raw.decode("utf-8"))
