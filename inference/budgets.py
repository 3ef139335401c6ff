"""Hard budgets (``budgets set ... --hard``), enforced before dispatch with a reservation.

A request of a client or department with a hard budget passes only when, for each such scope,

    stream spend + local settled + in-flight reservations + this request's worst case <= limit

where *stream spend* is what the worker published on the spend topic (read through
:class:`~tokenaudit.infra.budget_view.BudgetView`), *in-flight reservations* are the worst cases
(input tokens + max new tokens, or their price) of this instance's requests still running, and
*local settled* is what this instance's finished requests really used and the stream has not
counted yet: each stays counted here until the spend record of its usage-topic partition has an
``offset`` at or past its event's offset (learnt from the event's delivery report, or, for an
event that went to the spool, from the replay's confirmation), or until its period ends.

So what one instance lets through beyond a limit is at most what the *other* instances have in
flight or settled and not yet counted by the stream (docs/operations.md, "Budgets"). Until the
view has read the budgets topic (start-up, broker unreachable) no budget is known and nothing is
refused. A request is settled when its audit event is published (the event's own input and
output tokens, the figures the stream counts), so a request whose path is not audited
(``TOKENAUDIT_AUDIT_EXCLUDE_PATHS``) reserves nothing: the stream would never count it.
Everything here runs on the event loop except the delivery hook, which the publisher's thread
calls: it only appends to a deque the loop drains (``deque.append`` is atomic), so no lock is
taken on the request path, which costs a few microseconds (bench/bench_budgets.py).

Hand-written rather than a library: the check is a few additions over per-scope sums; the
reservation, the settle and the hand-over to the stream by offset are this pipeline's own
protocol (the spend topic), which no rate-limit library knows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tokenaudit.inference.audit import AuditContext
from tokenaudit.inference.http_io import ApiError
from tokenaudit.infra.budget_view import BudgetView, ScopeKey
from tokenaudit.infra.prices import PriceTable
from tokenaudit.schemas.budgets import Budget, period_bounds
from tokenaudit.schemas.http_errors import INSUFFICIENT_QUOTA
from tokenaudit.schemas.records import TokenUsageEvent

DAY_S = 86_400
REFRESH_SECONDS = 0.05  # how stale the cached budgets and stream spend may be (the stream itself is ~1 s)

#: (input_tokens, output_tokens) -> cost with the price file, or None when the model is unpriced
Pricer = Callable[[int, int], float | None]
OnDelivered = Callable[[int, int], None]
PER = {"day": "daily", "month": "monthly"}


class Ledger:
    """One hard-budget scope's spend this instance knows and the stream does not (yet), in
    tokens (cost is their price: one model per instance, so linear in input and output), with
    the stream's own figures for the period cached between refreshes."""

    __slots__ = (
        "budget",
        "held",
        "key",
        "limit",
        "period_end",
        "period_start",
        "placed",
        "reserved_in",
        "reserved_out",
        "settled_in",
        "settled_out",
        "stale",
        "stream_cost",
        "stream_in",
        "stream_out",
        "tokens",
    )

    def __init__(self, key: ScopeKey, budget: Budget):
        self.key = key
        self.period_start = self.period_end = 0
        self.reserved_in = self.reserved_out = 0  # requests in flight (worst case)
        self.settled_in = self.settled_out = 0  # finished this period, not yet in the stream
        # partition -> (offset, in, out) of its delivered events, in offset order; tuples of ints
        # (not the charges): the garbage collector stops tracking them, however many wait here
        self.placed: dict[int, deque[tuple[int, int, int]]] = {}
        self.stream_in = self.stream_out = 0
        self.stream_cost = 0.0
        self.held = 0  # the six token counts above summed, kept in step: one read for the check per request
        self.budget, self.limit, self.tokens, self.stale = budget, budget["limit"], budget["unit"] == "tokens", True

    def use(self, budget: Budget) -> None:
        """The scope's budget changed (`budgets set` again): applies from the next request."""
        if self.budget["period"] != budget["period"]:
            self.period_end = 0  # another period kind: roll on the next request
        self.budget, self.limit, self.tokens, self.stale = budget, budget["limit"], budget["unit"] == "tokens", True

    def roll(self, now_ms: int, period_seconds: int | None) -> None:
        """A new period: what was settled belongs to the last one; in-flight reservations stay."""
        self.period_start, self.period_end = period_bounds(now_ms, self.budget["period"], period_seconds)
        self.settled_in = self.settled_out = 0
        self.placed.clear()
        self.stale = True
        self.recount()

    def load_stream(self, view: BudgetView) -> None:
        """The stream's spend this period, and forget the settled requests it now counts (their
        partition's spend offset reached their event's offset)."""
        stream = view.spent(self.key[0], self.key[1], self.budget["period"], self.period_start)
        self.stale = False
        if stream.period_start != self.period_start:
            self.stream_in = self.stream_out = 0
            self.stream_cost = 0.0
            self.recount()
            return
        self.stream_in, self.stream_out, self.stream_cost = stream.input_tokens, stream.output_tokens, stream.cost
        for partition, counted in stream.offsets:
            queue = self.placed.get(partition)
            while queue and queue[0][0] <= counted:
                _, used_in, used_out = queue.popleft()
                self.settled_in -= used_in
                self.settled_out -= used_out
        self.recount()

    def recount(self) -> None:
        """``held`` from its parts, where they change off the request path (roll, stream reload);
        the request path (reserve, settle) moves it by the same amounts as the parts."""
        self.held = (
            self.stream_in + self.stream_out + self.settled_in + self.settled_out + self.reserved_in + self.reserved_out
        )

    def counts(self, ts_ms: int) -> bool:
        return self.period_start <= ts_ms < self.period_end


class Charge:
    """One request's hold on the hard budgets it counts against: reserved, then settled; its
    :meth:`delivered` is its event's delivery hook (a bound method: no closure per request)."""

    __slots__ = ("input_tokens", "ledgers", "offset", "output_tokens", "partition", "reports", "ts_ms")
    partition: int  # where its event landed
    offset: int

    def __init__(
        self,
        ledgers: tuple[Ledger, ...],
        input_tokens: int,
        output_tokens: int,
        ts_ms: int,
        reports: deque[Charge],
    ):
        self.ledgers, self.input_tokens, self.output_tokens, self.ts_ms = ledgers, input_tokens, output_tokens, ts_ms
        self.reports = reports  # partition and offset: set by delivered, read only after it

    def delivered(self, partition: int, offset: int) -> None:
        """On the publisher's thread: note where the event landed, then hand the charge to the
        loop (``deque.append`` is atomic, and comes after the writes it publishes)."""
        self.partition, self.offset = partition, offset
        self.reports.append(self)


class BudgetEnforcer:
    """The hard budgets of this instance: the check before dispatch, the settle at publish."""

    def __init__(
        self,
        view: BudgetView,
        period_seconds: int | None = None,
        pricer: Pricer | None = None,
        clock: Callable[[], float] = time.time,
        unaudited: frozenset[str] | None = frozenset(),
    ):
        """``unaudited``: paths whose requests publish no event (None: the app audits nothing)."""
        self.view, self.period_seconds, self.pricer, self.clock = view, period_seconds, pricer, clock
        self.unaudited = unaudited
        self.hard: dict[ScopeKey, Budget] = {}
        self.ledgers: dict[ScopeKey, Ledger] = {}
        self.inflight: dict[str, Charge] = {}  # event_id -> the charge its event settles
        self._plans: dict[tuple[str, str], tuple[Ledger, ...]] = {}  # (client, department) -> ledgers
        self._reports: deque[Charge] = deque()  # delivered, from the publisher's thread
        self._refresh_at_ms = 0  # the request's own time decides: no clock call per request

    # --- the request path (event loop) --------------------------------------------------------
    def hold(self, ctx: AuditContext, path: str, input_tokens: int, max_new: int) -> None:
        """Before dispatch: reserve the request's worst case against its hard budgets, or raise
        the 429 ``insufficient_quota`` (nothing taken). Its event settles it (:meth:`settle`)."""
        if self.unaudited is None or path in self.unaudited:
            return
        charge = self.reserve(ctx.client_id, ctx.department, input_tokens, max_new, ctx.ts_ms)
        if charge is not None:
            self.inflight[ctx.event_id] = charge

    def reserve(self, client_id: str, department: str, input_tokens: int, max_new: int, ts_ms: int) -> Charge | None:
        """Take the worst case from each hard budget of the scopes, or raise the 429; None when
        none applies. Written flat (no helper calls on the common path): it runs per request."""
        if ts_ms >= self._refresh_at_ms:
            self._refresh(ts_ms)
        if not self.hard:
            return None
        plan = self._plans.get((client_id, department))
        if plan is None:
            plan = self._plan(client_id, department)
        if not plan:
            return None
        reports = self._reports
        while reports:  # delivery reports placed now, not batched: charges kept alive cost the gc dearly
            charge = reports.popleft()
            for ledger in charge.ledgers:
                if ledger.period_start <= charge.ts_ms < ledger.period_end:
                    queue = ledger.placed.get(charge.partition)
                    if queue is None:
                        queue = ledger.placed[charge.partition] = deque()
                    queue.append((charge.offset, charge.input_tokens, charge.output_tokens))
        worst = input_tokens + max_new
        for ledger in plan:
            # the period's bounds are cached as epoch ms: one comparison, no date arithmetic per request
            # Forward only: a request that arrived before the period began (tokenized late, in a
            # pool) is checked against the current one; its settle refunds it there, and the
            # stream counts it in its own period. Rolling back would drop this period's spend.
            if ts_ms >= ledger.period_end:
                ledger.roll(ts_ms, self.period_seconds)
            if ledger.stale:
                ledger.load_stream(self.view)
            if ledger.tokens:
                if ledger.held + worst > ledger.limit:
                    self._refuse(ledger, ledger.held + worst, worst)
            else:
                self._check_cost(ledger, input_tokens, max_new)
        for ledger in plan:
            ledger.reserved_in += input_tokens
            ledger.reserved_out += max_new
            ledger.held += worst
        return Charge(plan, input_tokens, max_new, ts_ms, reports)

    def settle(self, event: TokenUsageEvent) -> OnDelivered | None:
        """At publish: the event's request ends its reservation with what it used (the event's
        tokens), counted until the stream has it; the delivery hook that tells when (None when
        the event settles no charge)."""
        charge = self.inflight.pop(event["event_id"] or "", None)
        if charge is None:
            return None
        used_in, used_out, ts_ms = event["input_tokens"], event["output_tokens"], charge.ts_ms
        reserved_in, reserved_out = charge.input_tokens, charge.output_tokens
        refund, used = reserved_in + reserved_out, used_in + used_out
        for ledger in charge.ledgers:
            ledger.reserved_in -= reserved_in
            ledger.reserved_out -= reserved_out
            if ledger.period_start <= ts_ms < ledger.period_end:
                ledger.settled_in += used_in
                ledger.settled_out += used_out
                ledger.held += used - refund
            else:
                ledger.held -= refund
        if not used:
            return None
        charge.input_tokens, charge.output_tokens = used_in, used_out
        return charge.delivered

    # --- internals ----------------------------------------------------------------------------
    def _refresh(self, now_ms: int) -> None:
        """Every REFRESH_SECONDS: the current hard budgets, and the stream's spend re-read."""
        self._refresh_at_ms = now_ms + int(REFRESH_SECONDS * 1000)
        if not self.view.caught_up():  # a half-read spend topic would understate spend: enforce nothing yet
            return
        hard = {k: b for k, b in self.view.budgets().items() if b["hard"]}
        if hard != self.hard:
            self.hard = hard
            self._plans.clear()
            for key, ledger in list(self.ledgers.items()):
                if key in hard:
                    if ledger.budget is not hard[key]:
                        ledger.use(hard[key])
                elif not (ledger.reserved_in or ledger.reserved_out):  # removed: forget it once idle
                    del self.ledgers[key]
        for ledger in self.ledgers.values():
            ledger.stale = True

    def _plan(self, client_id: str, department: str) -> tuple[Ledger, ...]:
        ledgers = []
        for key in (("client", client_id), ("department", department)):
            budget = self.hard.get(key) if key[1] else None
            if budget is not None:
                ledger = self.ledgers.get(key)
                if ledger is None:
                    ledger = self.ledgers[key] = Ledger(key, budget)
                elif ledger.budget is not budget:  # removed while in flight, then set again
                    ledger.use(budget)
                ledgers.append(ledger)
        plan = self._plans[(client_id, department)] = tuple(ledgers)
        return plan

    def _check_cost(self, ledger: Ledger, input_tokens: int, max_new: int) -> None:
        """A cost budget: local tokens priced now, the stream's cost as the worker priced it."""
        pricer = self.pricer
        if pricer is None:
            return  # no price file: this instance counts no cost (as an unpriced model)
        local = pricer(
            ledger.settled_in + ledger.reserved_in + input_tokens, ledger.settled_out + ledger.reserved_out + max_new
        )
        used = ledger.stream_cost + (local or 0.0)
        if used > ledger.limit:
            self._refuse(ledger, used, pricer(input_tokens, max_new) or 0.0)

    def _refuse(self, ledger: Ledger, used: float, worst: float) -> None:
        budget, (scope, scope_id) = ledger.budget, ledger.key
        left = max(0.0, budget["limit"] - (used - worst))
        reset_s = max(1, math.ceil(ledger.period_end / 1000 - self.clock()))
        unit = "tokens" if ledger.tokens else "in cost"
        raise ApiError(
            429,
            INSUFFICIENT_QUOTA,
            f"the {scope} {scope_id!r} has spent its {PER[budget['period']]} budget of {budget['limit']:g} {unit} "
            f"(this request may use {worst:g}, {left:g} left); it resets in {reset_s}s",
            None,
            {"Retry-After": str(reset_s)},
        )


def model_pricer(table: PriceTable, model: str, clock: Callable[[], float] = time.time) -> Pricer:
    """``model``'s cost of (input, output) tokens at today's prices (UTC; prices change at the
    start of a day), as floats per token like the worker's spend; None when no price is in force."""
    today: list[Any] = [None, None]  # (day, per-token prices or None)

    def cost(input_tokens: int, output_tokens: int) -> float | None:
        day = int(clock() // DAY_S)
        if today[0] != day:
            entry = table.price_at(model, datetime.fromtimestamp(day * DAY_S, UTC).date())
            per_token = None if entry is None else (float(entry.input_per_1k) / 1000, float(entry.output_per_1k) / 1000)
            today[0], today[1] = day, per_token
        prices = today[1]
        return None if prices is None else input_tokens * prices[0] + output_tokens * prices[1]

    return cost
