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


#: (limit, remaining, reset) header names per dimension, encoded once
REQUEST_HEADERS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
TOKEN_HEADERS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


#: "0ms" .. "1000ms" rendered once: a reset under a second is on most responses of a busy key
_RESET_MS = tuple(b"%dms" % ms for ms in range(1001))


class Bucket:
    """``level`` units left of ``limit``, refilled at ``limit`` per minute."""

    __slots__ = ("full", "level", "limit", "limit_text", "per_second")

    def __init__(self, limit: int):
        self.level = float(limit)
        self.set_limit(limit)

    def set_limit(self, limit: int) -> None:
        self.limit, self.limit_text, self.per_second = limit, b"%d" % limit, limit / WINDOW_S
        self.full = (self.limit_text, self.limit_text, b"0ms")  # (limit, remaining, reset) of a full bucket

    def refill(self, limit: int, elapsed: float) -> None:
        if limit != self.limit:  # `keys update`: a raised limit adds the difference, a lowered one caps
            self.level = min(self.level + max(0, limit - self.limit), float(limit))
            self.set_limit(limit)
        # plain comparisons instead of min(): this runs on every request of a limited key
        level = self.level + elapsed * self.per_second
        self.level = level if level < limit else float(limit)

    def seconds_until(self, amount: float) -> float:
        """How long until ``amount`` units are free (0 when they are now)."""
        return max(0.0, (amount - self.level) * WINDOW_S / self.limit)

    def values(self) -> tuple[bytes, bytes, bytes]:
        """(limit, remaining, reset) as header values. Rendered on every response of a limited
        key, so without a str round trip, and the sub-second resets looked up."""
        level, limit = self.level, self.limit
        if level >= limit:
            return self.full
        reset_ms = (limit - level) * 1000 / self.per_second
        reset = _RESET_MS[int(reset_ms + 0.5)] if reset_ms < 1000 else duration(reset_ms / 1000).encode()
        return self.limit_text, str(int(level)).encode() if level > 0 else b"0", reset

    def headers(self, names: tuple[bytes, bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
        limit, remaining, reset = self.values()
        return (names[0], limit), (names[1], remaining), (names[2], reset)


def duration(seconds: float) -> str:
    """As OpenAI writes the reset headers: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


class KeyBuckets:
    """One key's buckets (None for an unlimited dimension), refilled together on one clock read."""

    __slots__ = ("at", "requests", "tokens")

    def __init__(self, now: float):
        self.at = now
        self.requests: Bucket | None = None
        self.tokens: Bucket | None = None

    def refill(self, key: ApiKey, now: float) -> None:
        """Bring both buckets to ``now`` and to the key's current limits (a limit added since
        starts full; a removed one is dropped)."""
        elapsed, self.at = now - self.at, now
        rpm, tpm, requests, tokens = key.rpm, key.tpm, self.requests, self.tokens
        # the common case written out (an unchanged limit): this runs on every request of a limited key
        if requests is not None and rpm == requests.limit:
            level = requests.level + elapsed * requests.per_second
            requests.level = level if level < rpm else float(rpm)
        elif rpm is None:
            self.requests = None
        elif requests is None:
            self.requests = Bucket(rpm)
        else:
            requests.refill(rpm, elapsed)
        if tokens is not None and tpm == tokens.limit:
            level = tokens.level + elapsed * tokens.per_second
            tokens.level = level if level < tpm else float(tpm)
        elif tpm is None:
            self.tokens = None
        elif tokens is None:
            self.tokens = Bucket(tpm)
        else:
            tokens.refill(tpm, elapsed)


class RateLimiter:
    """The buckets of every limited key this instance has seen (keyed by key_id)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.keys: dict[str, KeyBuckets] = {}

    def of(self, key: ApiKey) -> KeyBuckets:
        found = self.keys.get(key.key_id)
        if found is None:
            found = self.keys[key.key_id] = KeyBuckets(self.clock())
        return found


class Meter:
    """One request of a limited key: its buckets and its reservation, settled when it ends."""

    __slots__ = ("buckets", "clock", "key", "refilled", "reserved")

    def __init__(self, limiter: RateLimiter, key: ApiKey):
        self.buckets, self.clock, self.key = limiter.of(key), limiter.clock, key
        self.reserved, self.refilled = -1, False

    def reserve(self, tokens: int) -> None:
        """Take one request and ``tokens`` from the key's buckets, or raise the 429 (nothing taken)."""
        buckets = self.buckets
        buckets.refill(self.key, self.clock())
        self.refilled = True
        requests, budget = buckets.requests, buckets.tokens
        if (requests is None or requests.level >= 1) and (budget is None or budget.level >= tokens):
            if requests is not None:  # the common case first: room for it
                requests.level -= 1
            if budget is not None:
                budget.level -= tokens
            self.reserved = tokens
            return
        if budget is not None and tokens > budget.limit:
            raise ApiError(
                429,
                "rate_limit_exceeded",
                f"this request may use {tokens} tokens (input + max tokens), over the key's limit of "
                f"{budget.limit} tokens per minute; send a shorter prompt or a lower max_tokens",
                None,
                {"Retry-After": str(int(WINDOW_S))},
            )
        # out of requests or of tokens for now: wait is > 0 (what fits was taken above)
        wait = max(requests.seconds_until(1) if requests else 0.0, budget.seconds_until(tokens) if budget else 0.0)
        what = "requests" if requests is not None and requests.level < 1 else "tokens"
        raise ApiError(
            429,
            "rate_limit_exceeded",
            f"rate limit of the key {self.key.key_id} reached ({what} per minute, this instance); retry in {wait:.2f}s",
            None,
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def settle(self, used: int) -> None:
        """Refund what the request reserved but did not use (or take what it used beyond it)."""
        if self.reserved < 0:
            return
        budget = self.buckets.tokens
        if budget is not None:
            level = budget.level + self.reserved - used
            budget.level = level if level < budget.limit else float(budget.limit)
        self.reserved = -1

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The key's limits, what is left and when it is full again, as of the last refill: the
        reservation's, or now for a request that reserved nothing (one clock read and one
        refill per request keeps the check cheap; a stale figure only understates)."""
        buckets = self.buckets
        if not self.refilled:
            buckets.refill(self.key, self.clock())
        requests, tokens = buckets.requests, buckets.tokens
        out: list[tuple[bytes, bytes]] = []
        if requests is not None:
            limit, remaining, reset = requests.values()
            out += ((REQUEST_HEADERS[0], limit), (REQUEST_HEADERS[1], remaining), (REQUEST_HEADERS[2], reset))
        if tokens is not None:
            limit, remaining, reset = tokens.values()
            out += ((TOKEN_HEADERS[0], limit), (TOKEN_HEADERS[1], remaining), (TOKEN_HEADERS[2], reset))
        return out


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
            if message["type"] == "http.response.start":  # a fresh dict per send: extended in place
                message["headers"] = [*message.get("headers", ()), *meter.headers()]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            ctx = context_of(scope)
            meter.settle(ctx.input_tokens + ctx.output_tokens)
