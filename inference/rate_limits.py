"""Requests and tokens per minute per API key (``keys add|update --rpm --tpm``), enforced in
this instance: each instance keeps its own buckets, so N instances behind a balancer let a key
through up to N times its limit (documented in docs/http-api.md and docs/operations.md).

A token bucket per key and per dimension: full at the limit, refilled continuously at the limit
per 60 s. A request reserves one request and its worst case in tokens (input tokens plus the
max new tokens it may generate) before it is dispatched, so concurrent requests cannot all pass
a check made on spend not yet counted; when it ends, the reservation is settled to what the
request really consumed (its audit event's input + output tokens) and the rest refunded.

Hand-written (about forty lines) rather than a library such as ``limits``: that one checks and
consumes a fixed cost with storage and a lock per call, and has no reserve-then-settle; the
request path is single-threaded on the event loop here, so plain floats suffice and the check
stays well under the 5 us budget (bench/bench_rate_limits.py).

Every response of a limited key carries the ``x-ratelimit-*`` headers OpenAI clients read (for
each limited dimension: limit, remaining, reset); a refusal is a 429 ``rate_limit_exceeded``
with ``Retry-After``, raised from the route so its audit event records the 429.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tokenaudit.inference.audit import context_of
from tokenaudit.inference.http_io import ApiError
from tokenaudit.infra.keys import ApiKey

SCOPE_KEY = "tokenaudit.rate_meter"
WINDOW_S = 60.0

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Bucket:
    """``level`` units left of ``limit``, refilled at ``limit`` per minute."""

    __slots__ = ("at", "level", "limit")

    def __init__(self, limit: int, now: float):
        self.limit, self.level, self.at = limit, float(limit), now

    def refill(self, limit: int, now: float) -> None:
        if limit != self.limit:  # `keys update`: a raised limit adds the difference, a lowered one caps
            self.level = min(self.level + max(0, limit - self.limit), float(limit))
            self.limit = limit
        self.level = min(float(self.limit), self.level + (now - self.at) * self.limit / WINDOW_S)
        self.at = now

    def seconds_until(self, amount: float) -> float:
        """How long until ``amount`` units are free (0 when they are now)."""
        return max(0.0, (amount - self.level) * WINDOW_S / self.limit)

    def headers(self, what: str) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-ratelimit-limit-" + what.encode(), str(self.limit).encode()),
            (b"x-ratelimit-remaining-" + what.encode(), str(max(0, math.floor(self.level))).encode()),
            (b"x-ratelimit-reset-" + what.encode(), duration(self.seconds_until(self.limit)).encode()),
        ]


def duration(seconds: float) -> str:
    """As OpenAI writes the reset headers: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class RateLimiter:
    """The buckets of every limited key this instance has seen (keyed by key_id)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.requests: dict[str, Bucket] = {}
        self.tokens: dict[str, Bucket] = {}

    def buckets(self, key: ApiKey) -> tuple[Bucket | None, Bucket | None]:
        """The key's (requests, tokens) buckets, refilled to now; None for an unlimited dimension."""
        now = self.clock()
        return _bucket(self.requests, key.key_id, key.rpm, now), _bucket(self.tokens, key.key_id, key.tpm, now)


def _bucket(table: dict[str, Bucket], key_id: str, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    bucket = table.get(key_id)
    if bucket is None:
        bucket = table[key_id] = Bucket(limit, now)
    else:
        bucket.refill(limit, now)
    return bucket


class Meter:
    """One request of a limited key: its reservation, settled when the request ends."""

    __slots__ = ("key", "limiter", "reserved")

    def __init__(self, limiter: RateLimiter, key: ApiKey):
        self.limiter, self.key, self.reserved = limiter, key, -1

    def reserve(self, tokens: int) -> None:
        """Take one request and ``tokens`` from the key's buckets, or raise the 429 (nothing taken)."""
        requests, budget = self.limiter.buckets(self.key)
        wait = max(requests.seconds_until(1) if requests else 0.0, budget.seconds_until(tokens) if budget else 0.0)
        if budget is not None and tokens > budget.limit:
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"this request may use {tokens} tokens (input + max tokens), over the key's limit of "
                f"{budget.limit} tokens per minute; send a shorter prompt or a lower max_tokens",
                None,
                {"Retry-After": str(int(WINDOW_S))},
            )
        if wait > 0:
            what = "requests" if requests is not None and requests.level < 1 else "tokens"
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"rate limit of the key {self.key.key_id} reached ({what} per minute, this instance); "
                f"retry in {wait:.2f}s",
                None,
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if requests is not None:
            requests.level -= 1
        if budget is not None:
            budget.level -= tokens
        self.reserved = tokens

    def settle(self, used: int) -> None:
        """Refund what the request reserved but did not use (or take what it used beyond it)."""
        if self.reserved < 0:
            return
        budget = self.limiter.tokens.get(self.key.key_id) if self.key.tpm is not None else None
        if budget is not None:
            budget.level = min(float(budget.limit), budget.level + self.reserved - used)
        self.reserved = -1

    def headers(self) -> list[tuple[bytes, bytes]]:
        requests, budget = self.limiter.buckets(self.key)
        return [*(requests.headers("requests") if requests else ()), *(budget.headers("tokens") if budget else ())]


def reserve(scope: Scope, tokens: int) -> None:
    """Before dispatch: reserve for a limited key (a 429 ApiError when over); nothing otherwise."""
    meter = scope.get(SCOPE_KEY)
    if meter is not None:
        meter.reserve(tokens)


class RateLimitMiddleware:
    """Inside the identity layer (it needs the key), outside the routes: meters a limited key's
    requests, adds the headers to each of its responses and settles when the request ends."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limiter: RateLimiter):
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key: ApiKey | None = scope.get("tokenaudit.api_key")
        if key is None or (key.rpm is None and key.tpm is None):
            await self.app(scope, receive, send)
            return
        meter = scope[SCOPE_KEY] = Meter(self.limiter, key)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *meter.headers()]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            ctx = context_of(scope)
            meter.settle(ctx.input_tokens + ctx.output_tokens)
