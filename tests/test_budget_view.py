"""The budget view's reading of the spend topic, without a broker: records fed as its
follower applies them."""

from __future__ import annotations

from tokenaudit.infra.budget_view import BudgetView
from tokenaudit.schemas import SPEND, encode
from tokenaudit.schemas.budgets import period_bounds, spend_key
from tokenaudit.settings import load_settings

NOW = 1_800_000_000_000


def _spend(view: BudgetView, partition: int, offset: int, tokens: int, at: int = NOW) -> None:
    start, end = period_bounds(at, "day")
    record = {
        "scope": "client",
        "scope_id": "acme",
        "period_start": start,
        "period_end": end,
        "partition": partition,
        "offset": offset,
        "input_tokens": tokens,
        "output_tokens": 0,
        "cost": 0.0,
        "unpriced_tokens": 0,
        "events": 1,
        "updated_at": at,
    }
    view._apply(view._topics[1], spend_key("client", "acme", partition), encode(SPEND, record))


def test_spend_is_summed_over_partitions_and_never_goes_back_within_a_period():
    view = BudgetView(load_settings())
    _spend(view, 0, 10, 100)
    _spend(view, 1, 4, 50)
    assert view.spent("client", "acme", "day", NOW).tokens == 150
    _spend(view, 0, 7, 80)  # a worker that restored an older count after a crash
    spent = view.spent("client", "acme", "day", NOW)
    assert spent.tokens == 150 and dict(spent.offsets) == {0: 10, 1: 4}
    _spend(view, 0, 12, 120)
    assert view.spent("client", "acme", "day", NOW).tokens == 170
    tomorrow = NOW + 86_400_000
    _spend(view, 0, 3, 5, at=tomorrow)  # a new period starts from its own count
    assert view.spent("client", "acme", "day", tomorrow).tokens == 5
