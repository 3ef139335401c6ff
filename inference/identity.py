"""Who is calling: an API key from the registry, or (development mode) the client address.

Bearer parsing, expiry and the registry's life cycle live in ``api_keys`` (shared with the
usage API); this layer only maps its answer onto the request: the key's identity, a 401, or a
503 while the registry is unavailable (fail closed).

Pure ASGI, inside the audit layer, so even a rejected request is audited with the identity
that was established (client_id ``unauthenticated`` and the caller's address for a bad key).
``X-Forwarded-For`` is believed only when the direct peer is a configured trusted proxy, and
then the right-most address that is not itself a trusted proxy is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tokenaudit.errors import SettingsError
from tokenaudit.inference.audit import context_of
from tokenaudit.infra.keys import AuthError, KeyRegistry
from tokenaudit.schemas.http_errors import send_error

if TYPE_CHECKING:
    from tokenaudit.inference.app import AppState

UNAUTHENTICATED = "unauthenticated"


def parse_networks(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise SettingsError(f"TOKENAUDIT_TRUSTED_PROXIES: {part!r} is not an IP address or CIDR") from None
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


def _authorization(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            return value
    return None


class IdentityMiddleware:
    #: set by create_app on the outermost layer (tests and the server reach the app's state there)
    state: AppState

    def __init__(self, app, registry: KeyRegistry, trusted_proxies: list, open_paths: frozenset[str]):
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
        try:
            key = self.registry.authenticate(_authorization(scope["headers"]))
        except AuthError as err:
            if scope["path"] in self.open_paths:  # probes and scrapes need no key
                ctx.client_id = UNAUTHENTICATED
                await self.app(scope, receive, send)
                return
            ctx.client_id, ctx.error_type = UNAUTHENTICATED, err.code
            await _refuse(send, err)
            return
        if key is None:  # development mode: no registry has ever existed
            ctx.client_id = ctx.client_ip or "unknown"
        else:
            ctx.client_id, ctx.department, ctx.api_key_id = key.client_id, key.department, key.key_id
            scope["tokenaudit.api_key"] = key
        await self.app(scope, receive, send)


async def _refuse(send, err: AuthError) -> None:
    """401 (with WWW-Authenticate) or 503, in the OpenAI error shape."""
    extra = (b"www-authenticate", b'Bearer realm="tokenaudit"') if err.status == 401 else (b"retry-after", b"5")
    await send_error(send, err.status, err.code, err.message, headers=[extra])
