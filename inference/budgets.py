"""Hard budgets (``budgets set ... --hard``), enforced before dispatch with a reservation.

A request of a client or department with a hard budget passes only when, for each such scope,

    stream spend + local settled + in-flight reservations + this request's worst case <= limit

where *stream spend* is what the worker published on the spend topic (read through
:class:`~tokenaudit.infra.budget_view.BudgetView`), *in-flight reservations* are the worst cases
(input tokens + max new tokens, or their price) of this instance's requests still running, and
*local settled* is what this instance's finished requests really used and the stream has not
counted yet: each stays counted here until the spend record of its usage-topic partition has an
``offset`` at or past its event's offset (learnt from the event's delivery report), or, for an
event that went to the spool (no delivery report), until its period ends (conservative: a
spooled event is counted by the stream only when replayed).

So what one instance lets through beyond a limit is at most what the *other* instances have in
flight or settled and not yet counted by the stream (docs/operations.md, "Budgets"). Until the
view has read the budgets topic (start-up, broker unreachable) no budget is known and nothing is
refused. Everything here runs on the event loop except :meth:`BudgetEnforcer.delivered`, which the
publisher's thread calls: it only appends to a deque the loop drains (``deque.append`` is
atomic), so no lock is taken on the request path.

Hand-written rather than a library: the check is a few additions over per-scope sums; the
reservation, the settle and the hand-over to the stream by offset are this pipeline's own
protocol (the spend topic), which no rate-limit library knows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tokenaudit.inference.audit import context_of
from tokenaudit.inference.http_io import ApiError
from tokenaudit.infra.budget_view import BudgetView, ScopeKey, Spent
from tokenaudit.schemas.budgets import Budget, period_bounds
from tokenaudit.schemas.http_errors import INSUFFICIENT_QUOTA
from tokenaudit.schemas.records import TokenUsageEvent

SCOPE_KEY = "tokenaudit.budget_charge"
ENFORCER_KEY = "tokenaudit.budgets"
REFRESH_SECONDS = 0.05  # how stale the cached budgets and stream spend may be (the stream itself is ~1 s)

#: (input_tokens, output_tokens) -> cost with the price file, or None when the model is unpriced
Pricer = Callable[[int, int], float | None]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Charge:
    """One request's hold on the scopes it counts against: reserved, then settled to what it used."""

    __slots__ = ("input_tokens", "ledgers", "output_tokens", "period_start", "settled")

    def __init__(self, ledgers: list[Ledger], input_tokens: int, output_tokens: int, period_start: int):
        self.ledgers, self.input_tokens, self.output_tokens = ledgers, input_tokens, output_tokens
        self.period_start, self.settled = period_start, False


class Ledger:
    """One scope's spend this instance knows and the stream does not (yet), in tokens; cost is
    their price (one model per instance, so it is linear in input and output tokens)."""

    __slots__ = (
        "budget",
        "period_end",
        "period_start",
        "placed",
        "reserved_in",
        "reserved_out",
        "settled_in",
        "settled_out",
    )

    def __init__(self, budget: Budget):
        self.budget = budget
        self.period_start = self.period_end = 0
        self.reserved_in = self.reserved_out = 0  # requests in flight (worst case)
        self.settled_in = self.settled_out = 0  # finished this period, not yet in the stream
        self.placed: dict[int, deque[tuple[int, int, int]]] = {}  # partition -> (offset, in, out), delivered

    def roll(self, now_ms: int, period_seconds: int | None) -> None:
        """A new period: what was settled belongs to the last one; in-flight reservations stay."""
        if self.period_start <= now_ms < self.period_end:
            return
        self.period_start, self.period_end = period_bounds(now_ms, self.budget["period"], period_seconds)
        self.settled_in = self.settled_out = 0
        self.placed.clear()

    def hand_over(self, stream: Spent) -> None:
        """Forget the settled requests the stream now counts (their partition's offset reached)."""
        if stream.period_start != self.period_start:
            return
        for partition, counted in stream.offsets:
            queue = self.placed.get(partition)
            while queue and queue[0][0] <= counted:
                _, used_in, used_out = queue.popleft()
                self.settled_in -= used_in
                self.settled_out -= used_out


class BudgetEnforcer:
    """The hard budgets of this instance: the check before dispatch, the settle after."""

    def __init__(
        self,
        view: BudgetView,
        period_seconds: int | None = None,
        pricer: Pricer | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.view, self.period_seconds, self.pricer, self.clock = view, period_seconds, pricer, clock
        self.hard: dict[ScopeKey, Budget] = {}
        self.ledgers: dict[ScopeKey, Ledger] = {}
        self.awaiting: dict[str, Charge] = {}  # event_id -> a settled charge whose event is not published yet
        self._reports: deque[tuple[Charge, int, int]] = deque()  # from the publisher's thread
        self._stream: dict[ScopeKey, Spent] = {}
        self._refresh_at = 0.0

    # --- the request path (event loop) --------------------------------------------------------
    def reserve(self, client_id: str, department: str, input_tokens: int, max_new: int, ts_ms: int) -> Charge | None:
        """Take the worst case from each hard budget of the request, or raise the 429
        ``insufficient_quota`` (nothing taken); None when no hard budget applies."""
        now = self.clock()
        if now >= self._refresh_at:
            self._refresh(now)
        hard = self.hard
        if not hard:
            return None
        keys = [k for k in (("client", client_id), ("department", department)) if k[1] and k in hard]
        if not keys:
            return None
        if self._reports:
            self._place_reports()
        ledgers = [self._ledger(key, ts_ms) for key in keys]
        for key, ledger in zip(keys, ledgers):
            self._check(key, ledger, input_tokens, max_new)
        for ledger in ledgers:
            ledger.reserved_in += input_tokens
            ledger.reserved_out += max_new
        return Charge(ledgers, input_tokens, max_new, ledgers[0].period_start)

    def settle(self, charge: Charge, used_in: int, used_out: int, event_id: str) -> None:
        """The request ended: its reservation becomes what it used, counted until the stream has it."""
        if charge.settled:
            return
        charge.settled = True
        for ledger in charge.ledgers:
            ledger.reserved_in -= charge.input_tokens
            ledger.reserved_out -= charge.output_tokens
            if ledger.period_start == charge.period_start:
                ledger.settled_in += used_in
                ledger.settled_out += used_out
        charge.input_tokens, charge.output_tokens = used_in, used_out
        if used_in or used_out:
            self.awaiting[event_id] = charge

    def on_delivered(self, event: TokenUsageEvent) -> Callable[[int, int], None] | None:
        """The delivery hook for this event when it settled a charge (None for everyone else)."""
        charge = self.awaiting.pop(event["event_id"] or "", None) if self.awaiting else None
        if charge is None:
            return None
        reports = self._reports
        return lambda partition, offset: reports.append((charge, partition, offset))

    # --- internals ----------------------------------------------------------------------------
    def _refresh(self, now: float) -> None:
        self._refresh_at = now + REFRESH_SECONDS
        self._stream.clear()
        self.hard = {k: b for k, b in self.view.budgets().items() if b["hard"]}
        for key in [k for k in self.ledgers if k not in self.hard]:
            ledger = self.ledgers[key]
            if not (ledger.reserved_in or ledger.reserved_out):  # removed: forget it once idle
                del self.ledgers[key]

    def _ledger(self, key: ScopeKey, ts_ms: int) -> Ledger:
        budget = self.hard[key]
        ledger = self.ledgers.get(key)
        if ledger is None:
            ledger = self.ledgers[key] = Ledger(budget)
        elif ledger.budget is not budget:
            if ledger.budget["period"] != budget["period"]:
                ledger.period_end = 0  # another period kind: roll below
            ledger.budget = budget
        ledger.roll(ts_ms, self.period_seconds)
        return ledger

    def _check(self, key: ScopeKey, ledger: Ledger, input_tokens: int, max_new: int) -> None:
        stream = self._stream.get(key)
        if stream is None:
            stream = self._stream[key] = self.view.spent(key[0], key[1], ledger.budget["period"], ledger.period_start)
            ledger.hand_over(stream)
        budget = ledger.budget
        in_tokens = stream.input_tokens + ledger.settled_in + ledger.reserved_in + input_tokens
        out_tokens = stream.output_tokens + ledger.settled_out + ledger.reserved_out + max_new
        if budget["unit"] == "tokens":
            used, worst = float(in_tokens + out_tokens), float(input_tokens + max_new)
        else:  # local tokens priced now; the stream's cost as the worker priced it
            pricer = self.pricer
            local = pricer(in_tokens - stream.input_tokens, out_tokens - stream.output_tokens) if pricer else None
            used, worst = stream.cost + (local or 0.0), (pricer(input_tokens, max_new) or 0.0) if pricer else 0.0
        if used <= budget["limit"]:
            return
        left = budget["limit"] - (used - worst)
        reset_s = max(1, math.ceil(ledger.period_end / 1000 - self.clock()))
        unit = "tokens" if budget["unit"] == "tokens" else "in cost"
        raise ApiError(
            429,
            INSUFFICIENT_QUOTA,
            f"the {key[0]} {key[1]!r} has spent its {budget['period']}ly budget of {budget['limit']:g} {unit} "
            f"(this request may use {worst:g}, {max(0.0, left):g} left); it resets in {reset_s}s",
            None,
            {"Retry-After": str(reset_s)},
        )

    def _place_reports(self) -> None:
        reports = self._reports
        while reports:
            charge, partition, offset = reports.popleft()
            for ledger in charge.ledgers:
                if ledger.period_start == charge.period_start:
                    ledger.placed.setdefault(partition, deque()).append(
                        (offset, charge.input_tokens, charge.output_tokens)
                    )


def hold(scope: Scope, input_tokens: int, max_new: int) -> None:
    """Before dispatch: reserve against the request's hard budgets (a 429 ApiError when one is
    spent); nothing when the app enforces none."""
    enforcer: BudgetEnforcer | None = scope.get(ENFORCER_KEY)
    if enforcer is None:
        return
    ctx = context_of(scope)
    charge = enforcer.reserve(ctx.client_id, ctx.department, input_tokens, max_new, ctx.ts_ms)
    if charge is not None:
        scope[SCOPE_KEY] = charge


class BudgetMiddleware:
    """Outside the routes: hands them the enforcer and settles a request's charge when it ends
    (whatever the outcome: an error or a client that left still used what the model ran)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], enforcer: BudgetEnforcer):
        self.app, self.enforcer = app, enforcer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ENFORCER_KEY] = self.enforcer
        try:
            await self.app(scope, receive, send)
        finally:
            charge: Charge | None = scope.get(SCOPE_KEY)
            if charge is not None:
                ctx = context_of(scope)
                self.enforcer.settle(charge, ctx.input_tokens, ctx.output_tokens, ctx.event_id)
