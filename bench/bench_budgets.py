"""Cost of hard-budget enforcement on the request path: the reservation in the route (find the
request's hard budgets, check stream spend + local settled + in flight + worst case against each,
reserve) and the settle at publish (the event's tokens, its delivery hook, the report drained on
a later request), around a minimal ASGI route. Side by side in one run with the same route and no
enforcement (none), no budgets at all (off), budgets of other scopes only (other), and a hard
client budget and a hard department budget on the request (on), with 1,000 scopes' budgets and
stream spend in the view (records decoded by the real BudgetView, fed as its follower would).

Prints RESULT lines (medians of interleaved rounds, and the best round); the target is < 5 us
per request for the checks (on minus none).
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
SCOPES = 1000


def main() -> None:
    from tokenaudit.inference.audit import context_of
    from tokenaudit.inference.budgets import BudgetEnforcer
    from tokenaudit.infra.budget_view import BudgetView
    from tokenaudit.schemas import BUDGET, SPEND, encode
    from tokenaudit.schemas.budgets import budget, budget_key, period_bounds, spend_key
    from tokenaudit.settings import load_settings

    settings = load_settings()

    def view_with(scopes: list[tuple[str, str]]) -> BudgetView:
        view = BudgetView(settings)
        view._caught_up.set()  # fed below as its follower would, to the end
        start, end = period_bounds(int(time.time() * 1000), "day")
        for i, (scope, scope_id) in enumerate(scopes):
            record = budget(scope, scope_id, "tokens", 1e15, "day", True, 0)  # never refuses: the check is measured
            view._apply(settings.topic_budgets, budget_key(scope, scope_id), encode(BUDGET, record))
            spend = {
                "scope": scope,
                "scope_id": scope_id,
                "period_start": start,
                "period_end": end,
                "partition": i % 4,
                "offset": 10**9,
                "input_tokens": 1000,
                "output_tokens": 1000,
                "cost": 0.0,
                "unpriced_tokens": 0,
                "events": 10,
                "updated_at": start,
            }
            view._apply(settings.topic_spend, spend_key(scope, scope_id, i % 4), encode(SPEND, spend))
        return view

    others = [("client", f"client-{i}") for i in range(SCOPES)]
    on_view = view_with([*others[:-2], ("client", "bench"), ("department", "research")])

    def route_for(enforcer: BudgetEnforcer | None):
        async def route(scope: dict[str, Any], receive: Any, send: Any) -> None:
            ctx = context_of(scope)
            ctx.client_id, ctx.department = "bench", "research"
            if enforcer is not None:
                enforcer.hold(ctx, scope["path"], 12, 28)  # what the completions routes do after tokenizing
            ctx.input_tokens, ctx.output_tokens = 12, 20
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})
            if enforcer is not None:  # the app's publish: settle with the event's tokens, its delivery hook
                event = {"event_id": ctx.event_id, "input_tokens": 12, "output_tokens": 20}
                hook = enforcer.settle(event) if enforcer.inflight else None  # type: ignore[arg-type]
                if hook is not None:
                    delivered[0] += 1
                    hook(delivered[0] % 4, delivered[0])

        return route

    delivered = [0]

    def variant(view: BudgetView | None) -> tuple[Any, BudgetEnforcer | None]:
        enforcer = BudgetEnforcer(view) if view is not None else None
        return route_for(enforcer), enforcer

    variants = {
        "none": variant(None),
        "off": variant(view_with([])),
        "other": variant(view_with(others)),
        "on": variant(on_view),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def per_request_us(app: Any, enforcer: BudgetEnforcer | None) -> float:
        start = time.perf_counter()
        for _ in range(N):
            await app({"type": "http", "path": "/v1/completions"}, receive, send)
        return (time.perf_counter() - start) / N * 1e6

    async def rounds() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(ROUNDS):  # interleaved, so load on the shared box hits all alike
            for name, (app, enforcer) in variants.items():
                out[name].append(await per_request_us(app, enforcer))
        return out

    results = asyncio.run(rounds())
    median = {name: statistics.median(values) for name, values in results.items()}
    for name, value in median.items():
        print(f"RESULT budgets_{name}_us_per_request={value:.3f}")
    checks = median["on"] - median["none"]
    print(f"RESULT budgets_checks_us_per_request={checks:.3f}")
    print(f"RESULT budgets_checks_us_per_request_best={min(results['on']) - min(results['none']):.3f}")
    print(f"RESULT budgets_off_overhead_us_per_request={median['off'] - median['none']:.3f}")
    print(f"RESULT budgets_other_overhead_us_per_request={median['other'] - median['none']:.3f}")
    print(f"RESULT budgets_checks_vs_target_ratio={checks / TARGET_US:.3f}")


if __name__ == "__main__":
    main()
