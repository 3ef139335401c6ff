"""The audit layer: pure ASGI middleware emitting exactly one token-usage event per request.

Pure ASGI (not ``BaseHTTPMiddleware``, which costs 1.6-3.2x throughput and breaks body
streaming): it only wraps ``send`` to learn the status and add ``X-Request-ID``, and wraps
``receive`` to notice a client disconnect. Handlers write what they learn (identity, token
counts, batch, error type) into the request's :class:`AuditContext`. The event is built and
enqueued after the response has been sent, whatever the outcome: success, 4xx, 5xx, an
exception, or a client that went away (status 499, the nginx convention).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uuid_utils

from tokenaudit.errors import DigestSecretError
from tokenaudit.schemas.http_errors import send_error
from tokenaudit.schemas.records import TokenUsageEvent, token_usage_event

if TYPE_CHECKING:
    from tokenaudit.inference.app import AppState

log = logging.getLogger(__name__)

SCOPE_KEY = "tokenaudit.audit"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
STATUS_CLIENT_CLOSED = 499


@dataclass(slots=True)
class AuditContext:
    """What one request did; filled in as the request goes. Never holds prompt or output text."""

    request_id: str
    event_id: str
    ts_ms: int
    started: float
    client_id: str = ""
    department: str = ""
    api_key_id: str | None = None
    client_ip: str = ""
    model: str = ""
    input_tokens: int = 0
    untruncated_input_tokens: int = 0
    truncated: bool = False
    output_tokens: int = 0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_id: str | None = None
    batch_size: int = 0
    position_in_batch: int = -1
    device: str = ""
    prompt_digest: str | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    disconnected: bool = False
    ttft_ms: float | None = None  # streamed responses only (schema v4)
    tpot_ms: float | None = None

    @classmethod
    def new(cls, request_id: str | None = None) -> AuditContext:
        """A context with a fresh event_id (UUIDv7: unique, time-ordered, ~0.2 us from
        uuid-utils). A request without a usable X-Request-ID gets the event_id's hex as its
        request_id (uuid4().hex would cost ~2 us more per request)."""
        event_id = str(uuid_utils.uuid7())
        return cls(request_id or event_id.replace("-", ""), event_id, time.time_ns() // 1_000_000, time.perf_counter())

    def to_event(self, method: str, path: str, status: int, instance: str = "") -> TokenUsageEvent:
        """The request's event (schemas.records.token_usage_event, the one builder), its latency
        measured now. ``event_id`` is fixed when the context is made, so every copy of this event
        (retries, spool replays) carries it."""
        return token_usage_event(self, method, path, status, instance, (time.perf_counter() - self.started) * 1000)


def context_of(scope: MutableMapping[str, Any]) -> AuditContext:
    """The request's context; created on first use so handlers work with the audit layer off."""
    ctx = scope.get(SCOPE_KEY)
    if ctx is None:
        ctx = scope[SCOPE_KEY] = AuditContext.new()
    return ctx


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """A sane client-sent X-Request-ID (bounded, plain characters), else None."""
    for name, value in headers:
        if name == b"x-request-id":
            try:
                text = value.decode("ascii")
            except UnicodeDecodeError:
                return None
            return text if _REQUEST_ID_OK.match(text) else None
    return None


# --- prompt digest ------------------------------------------------------------------------------
SECRET_FILE = "prompt_digest.key"  # noqa: S105 (a file name, not a secret)
_MIN_SECRET_BYTES = 16


class PromptDigester:
    """HMAC-SHA256 of the prompt with a deployment secret: finds repeats, reveals nothing."""

    def __init__(self, secret: bytes):
        if not secret:
            raise DigestSecretError("the prompt-digest secret is empty")
        self._key = secret

    def __call__(self, prompt: str) -> str:
        return hmac.new(self._key, prompt.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    @classmethod
    def from_settings(cls, configured: str, data_dir: Path) -> PromptDigester:
        if configured:
            return cls(configured.encode())
        path = Path(data_dir) / SECRET_FILE
        if not path.exists():
            _create_secret(path)
        return cls(_read_secret(path))


def _create_secret(path: Path) -> None:
    """Write a new secret so that no reader ever sees it partly written: an exclusively created
    temp file (0600), fsynced, then linked to its name. A link, not a rename: a rename would
    replace a secret another process created a moment earlier (and may already use); a link
    fails instead, and the loser reads the winner's secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_bytes(32).hex())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its secret
        except OSError:  # a filesystem without hard links: rename, unless someone was first
            if not path.exists():
                os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def _read_secret(path: Path) -> bytes:
    fix = "remove it to generate a new one, or set TOKENAUDIT_PROMPT_DIGEST_SECRET"
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DigestSecretError(f"prompt-digest secret {path} is unreadable ({exc}); {fix}") from None
    if not text:
        raise DigestSecretError(f"prompt-digest secret {path} is empty; {fix}")
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise DigestSecretError(f"prompt-digest secret {path} is not hex; {fix}") from None
    if len(secret) < _MIN_SECRET_BYTES:
        raise DigestSecretError(
            f"prompt-digest secret {path} is too short ({len(secret)} bytes, at least {_MIN_SECRET_BYTES}); {fix}"
        )
    return secret


# --- the middleware -----------------------------------------------------------------------------
Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class AuditMiddleware:
    #: set by create_app on the outermost layer (tests and the server reach the app's state there)
    state: AppState

    def __init__(
        self,
        app,
        publish: Callable[[TokenUsageEvent], None],
        model_name: str,
        exclude_paths: frozenset[str] = frozenset(),
        instance: str = "",
    ):
        self.app = app
        self.publish = publish
        self.model_name = model_name
        self.exclude = exclude_paths
        self.instance = instance

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = AuditContext.new(incoming_request_id(scope["headers"]))
        ctx.model = self.model_name
        scope[SCOPE_KEY] = ctx
        rid_header = (b"x-request-id", ctx.request_id.encode())
        status = 0

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        async def receive_wrapper() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect":
                ctx.disconnected = True
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:
            if ctx.disconnected or isinstance(exc, OSError):
                ctx.disconnected = True
            else:
                log.error("request %s failed: %s", ctx.request_id, type(exc).__name__, exc_info=exc)
                ctx.error_type = ctx.error_type or "internal_error"
                if status == 0:
                    try:
                        await send_error(send_wrapper, 500, "internal_error", "internal error")
                    except Exception:
                        ctx.disconnected = True
                status = status or 500
        finally:
            if scope["path"] not in self.exclude:
                if ctx.disconnected and (status == 0 or ctx.error_type == "client_disconnect"):
                    status, ctx.error_type = STATUS_CLIENT_CLOSED, "client_disconnect"
                event = ctx.to_event(scope["method"], scope["path"], status or 500, self.instance)
                self.publish(event)
