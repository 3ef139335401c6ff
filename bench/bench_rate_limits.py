"""Cost of the per-key rate limits on the request path: the rate-limit layer (find the key's
buckets, reserve one request and the worst case in tokens, add the six headers to the response,
settle when it ends) around a minimal ASGI route, side by side in one run with the same route
behind the layer for a key without limits (limits off) and with no layer at all.

Prints RESULT lines (medians of interleaved rounds, and the best round); the target is < 5 us
per request for the checks (limits on minus no layer).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = 20_000
ROUNDS = 7
TARGET_US = 5.0


def main() -> None:
    from tokenaudit.inference.audit import context_of
    from tokenaudit.inference.rate_limits import RateLimiter, RateLimitMiddleware, reserve
    from tokenaudit.infra.keys import ApiKey

    async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reserve(scope, 40)  # what the completions routes do after tokenizing
        ctx = context_of(scope)
        ctx.input_tokens, ctx.output_tokens = 12, 20
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    # limits so high nothing is refused: the bench measures the check, not a 429
    limited = ApiKey("k_limitedkey0", "bench", "", rpm=10**12, tpm=10**12)
    unlimited = ApiKey("k_unlimited00", "bench", "")
    layer = RateLimitMiddleware(route, RateLimiter())
    variants = {"none": (route, limited), "off": (layer, unlimited), "on": (layer, limited)}

    async def per_request_us(app: Any, key: ApiKey) -> float:
        start = time.perf_counter()
        for _ in range(N):
            await app({"type": "http", "path": "/v1/completions", "tokenaudit.api_key": key}, receive, send)
        return (time.perf_counter() - start) / N * 1e6

    async def rounds() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(ROUNDS):  # interleaved, so load on the shared box hits all alike
            for name, (app, key) in variants.items():
                out[name].append(await per_request_us(app, key))
        return out

    results = asyncio.run(rounds())
    median = {name: statistics.median(values) for name, values in results.items()}
    for name, value in median.items():
        print(f"RESULT rate_limit_{name}_us_per_request={value:.3f}")
    checks = median["on"] - median["none"]
    print(f"RESULT rate_limit_checks_us_per_request={checks:.3f}")
    # the fastest round of each: the cost itself, less what the shared box's load adds
    print(f"RESULT rate_limit_checks_us_per_request_best={min(results['on']) - min(results['none']):.3f}")
    print(f"RESULT rate_limit_off_overhead_us_per_request={median['off'] - median['none']:.3f}")
    print(f"RESULT rate_limit_on_vs_off_ratio={median['on'] / median['off']:.3f}")
    print(f"RESULT rate_limit_checks_vs_target_ratio={checks / TARGET_US:.3f}")


if __name__ == "__main__":
    main()
