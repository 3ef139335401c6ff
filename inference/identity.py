"""Who is calling: an API key from the registry, or (development mode) the client address.

Pure ASGI, inside the audit layer, so even a rejected request is audited with the identity
that was established (client_id ``unauthenticated`` and the caller's address for a bad key).
``X-Forwarded-For`` is believed only when the direct peer is a configured trusted proxy, and
then the right-most address that is not itself a trusted proxy is the client.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Iterable

from tokenaudit.inference.api_keys import KeyRegistry
from tokenaudit.inference.audit import context_of

UNAUTHENTICATED = "unauthenticated"


def parse_networks(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"TOKENAUDIT_TRUSTED_PROXIES: {part!r} is not an IP address or CIDR") from None
    return nets


def _trusted(addr: str, nets: Iterable) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in nets)


def client_address(scope: dict, trusted: list) -> str:
    peer = (scope.get("client") or ("", 0))[0] or ""
    if not trusted or not _trusted(peer, trusted):
        return peer
    forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
    hops = [h.strip() for h in ",".join(forwarded).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: fall back to what we saw
    return peer


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class IdentityMiddleware:
    def __init__(self, app, registry: KeyRegistry | None, trusted_proxies: list, open_paths: frozenset[str]):
        self.app = app
        self.registry = registry
        self.trusted = trusted_proxies
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = context_of(scope)
        ctx.client_ip = client_address(scope, self.trusted)
        if self.registry is None:
            ctx.client_id = ctx.client_ip or "unknown"
            await self.app(scope, receive, send)
            return
        raw = bearer_token(scope["headers"])
        key = self.registry.lookup(raw) if raw else None
        if key is not None:
            ctx.client_id, ctx.department, ctx.api_key_id = key.client_id, key.department, key.key_id
            scope["tokenaudit.api_key"] = key
        elif scope["path"] not in self.open_paths:
            ctx.client_id, ctx.error_type = UNAUTHENTICATED, "invalid_api_key"
            message = "missing API key" if raw is None else "invalid API key"
            body = json.dumps({"error": {"type": "authentication_error", "message": message + " (send "
                               "Authorization: Bearer <key>)", "param": None, "code": "invalid_api_key"}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b'Bearer realm="tokenaudit"')]})
            await send({"type": "http.response.body", "body": body})
            return
        else:
            ctx.client_id = UNAUTHENTICATED
        await self.app(scope, receive, send)
