"""The reservation arithmetic of hard budgets (inference/budgets.py), without a broker: a view
whose budgets and stream spend the test sets, a clock the test moves."""

from __future__ import annotations

import pytest

from tokenaudit.inference.budgets import REFRESH_SECONDS, BudgetEnforcer
from tokenaudit.inference.http_io import ApiError
from tokenaudit.infra.budget_view import Spent
from tokenaudit.schemas.budgets import Budget, budget, period_bounds
from tokenaudit.schemas.http_errors import INSUFFICIENT_QUOTA, error_envelope

PERIOD_S = 60
T0 = 1_800_000_000.0  # a period boundary (a multiple of 60 s)


class View:
    """What BudgetView answers: the test sets budgets and the stream's spend (per scope)."""

    def __init__(self) -> None:
        self.budgets_: dict[tuple[str, str], Budget] = {}
        self.spend: dict[tuple[str, str], Spent] = {}

    def caught_up(self) -> bool:
        return True

    def budgets(self) -> dict[tuple[str, str], Budget]:
        return dict(self.budgets_)

    def spent(self, scope: str, scope_id: str, period: str, now_ms: int | None = None) -> Spent:
        start, end = period_bounds(int(now_ms or 0), period, PERIOD_S)
        found = self.spend.get((scope, scope_id))
        return found if found is not None and found.period_start == start else Spent(start, end)

    def set(self, scope: str, scope_id: str, limit: float, unit: str = "tokens", hard: bool = True) -> None:
        self.budgets_[(scope, scope_id)] = budget(scope, scope_id, unit, limit, "day", hard, 0)

    def stream(self, scope: str, scope_id: str, at: float, tokens: int, offset: int, partition: int = 0) -> None:
        start, end = period_bounds(int(at * 1000), "day", PERIOD_S)
        self.spend[(scope, scope_id)] = Spent(start, end, tokens, 0, 0.0, 0, 1, ((partition, offset),))


class Clock:
    def __init__(self) -> None:
        self.now = T0 + 1

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = REFRESH_SECONDS) -> None:
        self.now += seconds


@pytest.fixture
def setup() -> tuple[View, Clock, BudgetEnforcer]:
    view, clock = View(), Clock()
    return view, clock, BudgetEnforcer(view, PERIOD_S, clock=clock)  # type: ignore[arg-type]


def _ms(clock: Clock) -> int:
    return int(clock.now * 1000)


def _settle(enforcer: BudgetEnforcer, charge, used_in: int, used_out: int, event_id: str):
    """What the app's publish does with the request's event: settle, and get the delivery hook."""
    enforcer.inflight[event_id] = charge
    return enforcer.settle({"event_id": event_id, "input_tokens": used_in, "output_tokens": used_out})  # type: ignore[typeddict-item]


def _refused(enforcer: BudgetEnforcer, clock: Clock, client: str, dept: str, n_in: int, n_out: int) -> ApiError:
    with pytest.raises(ApiError) as caught:
        enforcer.reserve(client, dept, n_in, n_out, _ms(clock))
    return caught.value


def test_no_hard_budget_reserves_nothing(setup):
    view, clock, enforcer = setup
    assert enforcer.reserve("acme", "research", 10, 10, _ms(clock)) is None
    view.set("client", "acme", 5, hard=False)  # a soft budget only alerts
    clock.tick()
    assert enforcer.reserve("acme", "research", 10, 10, _ms(clock)) is None


def test_concurrent_reservations_stop_at_the_limit_and_the_refusal_is_insufficient_quota(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 100)
    first = enforcer.reserve("acme", "", 30, 20, _ms(clock))
    second = enforcer.reserve("acme", "", 30, 20, _ms(clock))  # exactly the limit: allowed
    assert first is not None and second is not None
    err = _refused(enforcer, clock, "acme", "", 1, 0)
    assert (err.status, err.code) == (429, INSUFFICIENT_QUOTA)
    assert 1 <= int(err.headers["Retry-After"]) <= PERIOD_S
    assert "client 'acme'" in err.message and "0 left" in err.message
    assert error_envelope(429, err.code, err.message)["error"]["type"] == "insufficient_quota"
    enforcer.reserve("other", "", 500, 500, _ms(clock))  # another client is not touched


def test_settling_refunds_the_unused_worst_case(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 100)
    charge = enforcer.reserve("acme", "", 30, 70, _ms(clock))
    _refused(enforcer, clock, "acme", "", 1, 0)
    _settle(enforcer, charge, 30, 10, "e1")  # used 40 of the 100 reserved
    assert enforcer.reserve("acme", "", 40, 20, _ms(clock)) is not None  # 40 + 60 = 100
    _refused(enforcer, clock, "acme", "", 1, 0)
    assert enforcer.settle({"event_id": "e1", "input_tokens": 30, "output_tokens": 10}) is None  # type: ignore[typeddict-item]
    _refused(enforcer, clock, "acme", "", 1, 0)  # a second event of it (a copy) settles nothing


def test_settled_spend_is_counted_once_until_and_after_the_stream_includes_its_offset(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 100)
    view.stream("client", "acme", clock.now, tokens=50, offset=6)  # the stream counted up to offset 6
    charge = enforcer.reserve("acme", "", 20, 10, _ms(clock))
    hook = _settle(enforcer, charge, 20, 10, "e7")
    assert hook is not None
    hook(0, 7)  # the event is offset 7 of partition 0
    clock.tick()
    assert enforcer.reserve("acme", "", 20, 0, _ms(clock)) is not None  # 50 + 30 local + 20 = 100
    assert _settle(enforcer, enforcer.reserve("acme", "", 0, 0, _ms(clock)), 0, 0, "e-none") is None
    _refused(enforcer, clock, "acme", "", 1, 0)
    # the stream now includes offset 7 (50 + 30): the local 30 must not be counted a second time
    view.stream("client", "acme", clock.now, tokens=80, offset=7)
    clock.tick()
    assert enforcer.reserve("acme", "", 0, 0, _ms(clock)) is not None  # 80 + 20 in flight = 100
    _refused(enforcer, clock, "acme", "", 1, 0)


def test_a_spooled_event_stays_counted_until_the_period_ends(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 100)
    charge = enforcer.reserve("acme", "", 60, 40, _ms(clock))
    _settle(enforcer, charge, 60, 40, "e1")  # published to the spool: its hook is never called
    view.stream("client", "acme", clock.now, tokens=0, offset=99)  # whatever the stream says
    clock.tick(10)
    _refused(enforcer, clock, "acme", "", 1, 0)
    clock.tick(PERIOD_S)  # the next period: a fresh budget
    assert enforcer.reserve("acme", "", 60, 40, _ms(clock)) is not None


def test_a_spent_department_refuses_its_clients_and_takes_nothing_from_their_own_budget(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 100)
    view.set("department", "research", 1000)
    view.stream("department", "research", clock.now, tokens=990, offset=3)
    err = _refused(enforcer, clock, "acme", "research", 10, 10)
    assert "department 'research'" in err.message
    assert enforcer.reserve("acme", "sales", 50, 50, _ms(clock)) is not None  # the client's 100 intact


def test_a_client_day_budget_and_a_department_month_budget_each_keep_their_own_period(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 100)
    view.budgets_[("department", "research")] = budget("department", "research", "tokens", 1000, "month", True, 0)
    enforcer.period_seconds = None  # real days and months
    clock.now = 1_798_761_600.0 - 30  # 2026-12-31 23:59:30 UTC: the day and the month end together
    charge = enforcer.reserve("acme", "research", 50, 50, _ms(clock))
    clock.now += 60  # settled in the next day and month: counted in neither new period
    _settle(enforcer, charge, 50, 50, "e1")
    second = enforcer.reserve("acme", "research", 50, 50, _ms(clock))
    assert enforcer.ledgers[("department", "research")].settled_in == 0
    _settle(enforcer, second, 50, 0, "e-second")
    clock.now = 1_798_761_600.0 + 3600  # a day on (same month): the client's day rolls, the month not
    charge = enforcer.reserve("acme", "research", 10, 0, _ms(clock))
    clock.tick(86_400)
    _settle(enforcer, charge, 10, 0, "e2")
    assert enforcer.reserve("acme", "research", 0, 0, _ms(clock)) is not None  # the next day's first
    assert enforcer.ledgers[("department", "research")].settled_in == 60  # still this month
    assert enforcer.ledgers[("client", "acme")].settled_in == 0  # another day


def test_a_budget_change_applies_without_restart(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 10)
    _refused(enforcer, clock, "acme", "", 10, 10)
    view.set("client", "acme", 1000)
    clock.tick()
    assert enforcer.reserve("acme", "", 10, 10, _ms(clock)) is not None
    del view.budgets_[("client", "acme")]  # removed (a tombstone)
    view.set("client", "other", 1)
    clock.tick()
    assert enforcer.reserve("acme", "", 10**6, 10**6, _ms(clock)) is None


def test_a_cost_budget_prices_the_worst_case_with_the_served_models_prices(setup):
    view, clock, _ = setup
    enforcer = BudgetEnforcer(view, PERIOD_S, lambda i, o: i * 0.001 + o * 0.002, clock=clock)  # type: ignore[arg-type]
    view.set("client", "acme", 1.0, unit="cost")
    charge = enforcer.reserve("acme", "", 200, 300, _ms(clock))  # 0.2 + 0.6
    _refused(enforcer, clock, "acme", "", 100, 51)  # 0.1 + 0.102 > the 0.2 left
    _settle(enforcer, charge, 200, 100, "e1")  # used 0.4
    assert enforcer.reserve("acme", "", 100, 250, _ms(clock)) is not None  # 0.4 + 0.6 = 1.0
    unpriced = BudgetEnforcer(view, PERIOD_S, lambda i, o: None, clock=clock)  # type: ignore[arg-type]
    assert unpriced.reserve("acme", "", 10**6, 10**6, _ms(clock)) is not None  # no price: no cost, as the stream


def test_the_served_models_price_is_the_one_in_force_today():
    from tokenaudit.inference.budgets import model_pricer
    from tokenaudit.infra.prices import PriceTable

    table = PriceTable.parse(
        """
        [[models."gpt2-tiny"]]
        input_per_1k = 1.0
        output_per_1k = 2.0
        effective_to = 2027-01-01
        [[models."gpt2-tiny"]]
        input_per_1k = 3.0
        output_per_1k = 4.0
        effective_from = 2027-01-01
        """
    )
    clock = Clock()
    clock.now = 1_798_761_600.0 - 1  # 2026-12-31 23:59:59 UTC
    cost = model_pricer(table, "gpt2-tiny", clock)
    assert cost(1000, 500) == pytest.approx(1.0 + 1.0)
    clock.now += 2  # the new year's prices
    assert cost(1000, 500) == pytest.approx(3.0 + 2.0)
    assert model_pricer(table, "unpriced", clock)(1000, 500) is None


def _parts(enforcer: BudgetEnforcer) -> list[tuple[int, int]]:
    """Each ledger's running total (what the check reads) beside the sum of the counts it stands for."""
    return [
        (
            ledger.held,
            ledger.stream_in
            + ledger.stream_out
            + ledger.settled_in
            + ledger.settled_out
            + ledger.reserved_in
            + ledger.reserved_out,
        )
        for ledger in enforcer.ledgers.values()
    ]


def test_the_running_total_the_check_reads_stays_the_sum_of_its_counts(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 10_000)
    view.set("department", "research", 10_000)
    view.stream("client", "acme", clock.now, tokens=100, offset=4)
    charges = [enforcer.reserve("acme", "research", 10 * i, 5, _ms(clock)) for i in range(1, 5)]
    hooks = [_settle(enforcer, charge, 7, 3, f"e{i}") for i, charge in enumerate(charges[:3])]
    for offset, hook in enumerate(hooks, start=5):
        assert hook is not None
        hook(0, offset)
    _refused(enforcer, clock, "acme", "research", 10**6, 0)  # a refusal takes nothing
    assert all(held == total for held, total in _parts(enforcer))
    view.stream("client", "acme", clock.now, tokens=110, offset=5)  # the stream counted offset 5 only
    clock.tick()
    assert enforcer.reserve("acme", "research", 1, 1, _ms(clock)) is not None
    assert enforcer.ledgers[("client", "acme")].settled_in == 14  # offsets 6 and 7 still local
    assert all(held == total for held, total in _parts(enforcer))
    clock.tick(PERIOD_S)  # a new period: settled dropped, the in-flight charge kept
    assert enforcer.reserve("acme", "research", 1, 1, _ms(clock)) is not None
    _settle(enforcer, charges[3], 40, 5, "e-late")  # reserved last period: refunded, counted in neither
    assert [total for _, total in _parts(enforcer)] == [2 + 2, 2 + 2]  # the two new reservations only
    assert all(held == total for held, total in _parts(enforcer))


def test_a_request_from_before_the_period_never_rolls_the_budget_back(setup):
    """Requests reach the check out of time order around a boundary (each is tokenized in a
    pool after it arrived): an older one must not roll the budget back to the last period,
    which would drop what this period already used here."""
    view, clock, enforcer = setup
    view.set("client", "acme", 100)
    clock.now = T0 + PERIOD_S + 1  # the next period
    newer = enforcer.reserve("acme", "", 30, 30, _ms(clock))
    _settle(enforcer, newer, 30, 30, "new")  # 60 used this period, not yet in the stream
    older = enforcer.reserve("acme", "", 10, 10, int((T0 + PERIOD_S - 0.1) * 1000))  # arrived before it began
    assert older is not None  # checked against this period: 60 + 20 fit
    _refused(enforcer, clock, "acme", "", 11, 10)  # 60 + 20 held + 21 > 100: nothing was dropped
    _settle(enforcer, older, 10, 10, "old")  # the stream counts it in its own period
    assert enforcer.reserve("acme", "", 20, 20, _ms(clock)) is not None  # 60 + 40 = 100
    _refused(enforcer, clock, "acme", "", 1, 0)


def test_nothing_is_enforced_until_the_view_has_read_the_topics(setup):
    view, clock, enforcer = setup
    view.set("client", "acme", 10)
    view.caught_up = lambda: False  # type: ignore[method-assign]
    assert enforcer.reserve("acme", "", 50, 50, _ms(clock)) is None  # documented: fail open until read
    view.caught_up = lambda: True  # type: ignore[method-assign]
    clock.tick()
    _refused(enforcer, clock, "acme", "", 50, 50)
