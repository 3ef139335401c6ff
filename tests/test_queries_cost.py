"""Monthly cost report: reconciles with usage_rollup to the cent; bad price tables fail clearly."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal

import pytest

from tests.support.usage_seed import ROLLUP_COLUMNS, rollup_rows, superseded
from tokenaudit.infra.daily_rollup import DailyBuilder
from tokenaudit.infra.store import Store
from tokenaudit.reports.cost_view import department_answer
from tokenaudit.reports.params import parse_report_params
from tokenaudit.reports.prices import PriceTable, PriceTableError, cost_report
from tokenaudit.reports.queries import month_tokens

PRICES = """
currency = "USD"
[models."t5-tiny"]
input_per_1k = 0.0004
output_per_1k = 0.0016
[models."gpt2-tiny"]
input_per_1k = "0.00033"
output_per_1k = 0.00117
"""


@pytest.fixture
def month_store(ch_client, ch_database):
    """Rollups in March 2026 (plus a window in February and one in April that must not count)."""
    store = Store(ch_client, ch_database)
    store.migrate()
    rows = rollup_rows(datetime(2026, 3, 1, 0, 31, tzinfo=UTC), windows=30)  # 2026-03-01 00:00..00:29
    rows += rollup_rows(datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC), windows=28, seed=9)
    outside = [
        [*r[:3], datetime(2026, 2, 28, 23, 59, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC), *r[5:]] for r in rows[:3]
    ]
    outside += [
        [*r[:3], datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 4, 1, 0, 1, tzinfo=UTC), *r[5:]] for r in rows[3:6]
    ]
    store.insert("usage_rollup", superseded(rows) + outside, ROLLUP_COLUMNS)
    store.insert("usage_rollup", rows, ROLLUP_COLUMNS)
    store.insert("usage_rollup", rows[::3], ROLLUP_COLUMNS)  # replayed windows
    return store


def test_cost_report_reconciles_to_the_cent(month_store):
    prices = PriceTable.parse(PRICES)
    params = parse_report_params("report", {"month": "2026-03"})
    report = cost_report(month_tokens(month_store, params), prices)

    # independent check straight from usage_rollup: tokens per model x price, rounded once
    per_model = month_store.query(
        "SELECT model, sum(input_tokens) AS i, sum(output_tokens) AS o, sum(total_tokens) AS t "
        "FROM {db}.usage_rollup FINAL WHERE toYYYYMM(window_start) = 202603 GROUP BY model"
    )
    exact = sum(
        (
            Decimal(r["i"]) * prices.models[r["model"]][0].input_per_1k
            + Decimal(r["o"]) * prices.models[r["model"]][0].output_per_1k
        )
        / 1000
        for r in per_model
    )
    expected_total = exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)

    total = report[-1]
    assert total["level"] == "total" and total["currency"] == "USD"
    assert Decimal(total["cost"]) == expected_total
    assert total["total_tokens"] == sum(r["t"] for r in per_model)
    clients = [r for r in report if r["level"] == "client"]
    departments = [r for r in report if r["level"] == "department"]
    assert sum(Decimal(r["cost"]) for r in clients) == expected_total
    assert sum(Decimal(r["cost"]) for r in departments) == expected_total
    assert sum(r["total_tokens"] for r in clients) == total["total_tokens"]
    for dept in departments:
        members = [r for r in clients if r["department"] == dept["department"]]
        assert Decimal(dept["cost"]) == sum(Decimal(r["cost"]) for r in members)
        assert dept["input_tokens"] == sum(r["input_tokens"] for r in members)
    # each line is within a cent of its exact cost
    for line in clients:
        rows = month_store.query(
            "SELECT model, sum(input_tokens) AS i, sum(output_tokens) AS o FROM {db}.usage_rollup FINAL "
            "WHERE toYYYYMM(window_start) = 202603 AND client_id = {c:String} GROUP BY model",
            {"c": line["client_id"]},
        )
        line_exact = sum(prices.models[r["model"]][0].cost(r["i"], r["o"]) for r in rows)
        assert abs(Decimal(line["cost"]) - line_exact) < Decimal("0.01")


def test_cost_report_scoped_to_a_client(month_store):
    prices = PriceTable.parse(PRICES)
    params = parse_report_params("report", {"month": "2026-03"})
    report = cost_report(month_tokens(month_store, params, client="beta-app"), prices)
    assert {r["client_id"] for r in report if r["level"] == "client"} == {"beta-app"}


def test_tokens_of_a_model_without_a_price_are_listed_not_costed_and_not_failing(month_store):
    prices = PriceTable.parse('[models."t5-tiny"]\ninput_per_1k = 0.1\noutput_per_1k = 0.2\n', "prices.toml")
    rows = month_tokens(month_store, parse_report_params("report", {"month": "2026-03"}))
    report = cost_report(rows, prices)
    gpt2 = [r for r in rows if r["model"] == "gpt2-tiny"]
    t5 = [r for r in rows if r["model"] == "t5-tiny"]
    unpriced = [r for r in report if r["level"] == "unpriced"]
    assert {r["model"] for r in unpriced} == {"gpt2-tiny"} and all(r["cost"] == "" for r in unpriced)
    assert sum(r["total_tokens"] for r in unpriced) == sum(r["total_tokens"] for r in gpt2)
    total = report[-1]
    assert total["total_tokens"] == sum(r["total_tokens"] for r in t5)  # the priced tokens only
    exact = sum((prices.models["t5-tiny"][0].cost(r["input_tokens"], r["output_tokens"]) for r in t5), Decimal(0))
    assert Decimal(total["cost"]) == exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    gap = sum(r["total_tokens"] for r in gpt2)
    assert f"excludes {gap} unpriced tokens (gpt2-tiny)" in total["note"]
    assert f"prices sha256 {prices.sha256}" in total["note"]


DATED = """
currency = "USD"
[models."gpt2-tiny"]
input_per_1k = 0.001
output_per_1k = 0.002
[[models."t5-tiny"]]
input_per_1k = 0.0004
output_per_1k = 0.0016
effective_to = 2026-03-15
[[models."t5-tiny"]]
input_per_1k = "0.0100"
output_per_1k = "0.0300"
effective_from = 2026-03-15
"""


def test_each_window_is_priced_with_the_entry_in_force(month_store):
    prices = PriceTable.parse(DATED)
    report = cost_report(month_tokens(month_store, parse_report_params("report", {"month": "2026-03"})), prices)
    # independent: per model and day straight from usage_rollup (windows on the 1st and the 31st)
    per_day = month_store.query(
        "SELECT model, toDate(window_start) AS d, sum(input_tokens) AS i, sum(output_tokens) AS o "
        "FROM {db}.usage_rollup FINAL WHERE toYYYYMM(window_start) = 202603 GROUP BY model, d"
    )
    assert {r["d"] for r in per_day} == {date(2026, 3, 1), date(2026, 3, 31)}
    rates = {"early": (Decimal("0.0004"), Decimal("0.0016")), "late": (Decimal("0.0100"), Decimal("0.0300"))}
    exact = Decimal(0)
    for r in per_day:
        if r["model"] == "gpt2-tiny":
            rate = (Decimal("0.001"), Decimal("0.002"))
        else:
            rate = rates["early" if r["d"] < date(2026, 3, 15) else "late"]
        exact += (r["i"] * rate[0] + r["o"] * rate[1]) / 1000
    assert Decimal(report[-1]["cost"]) == exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert not [r for r in report if r["level"] == "unpriced"]
    # an entry that ends before the month's last windows leaves those tokens unpriced
    ended = PriceTable.parse(
        DATED.replace("effective_from = 2026-03-15\n", "effective_from = 2026-03-15\neffective_to = 2026-03-20\n")
    )
    late = [
        r
        for r in cost_report(month_tokens(month_store, parse_report_params("report", {"month": "2026-03"})), ended)
        if r["level"] == "unpriced"
    ]
    late_tokens = sum(r["i"] + r["o"] for r in per_day if r["model"] == "t5-tiny" and r["d"] == date(2026, 3, 31))
    assert {r["model"] for r in late} == {"t5-tiny"} and sum(r["total_tokens"] for r in late) == late_tokens


@pytest.mark.parametrize("daily", [False, True], ids=["windows", "daily"])
def test_department_detail_is_the_full_reports_subtotals(month_store, tmp_path, daily):
    """detail=department sums tokens per span of unchanged prices, not per day: its department,
    unpriced and total lines are the full report's, whatever the prices do mid-month."""
    if daily:  # and the same once March's days are read from the daily pre-aggregate
        assert DailyBuilder(month_store, settle_seconds=0, quiet_seconds=0).run_once(datetime(2026, 4, 2, tzinfo=UTC))
    ended = DATED.replace("effective_from = 2026-03-15\n", "effective_from = 2026-03-15\neffective_to = 2026-03-20\n")
    params = parse_report_params("report", {"month": "2026-03", "detail": "department"})
    for text in (PRICES, DATED, ended):
        path = tmp_path / "prices.toml"
        path.write_text(text)
        for client in (None, "beta-app"):
            full = cost_report(month_tokens(month_store, params, client), PriceTable.parse(text))
            answer = department_answer(month_store, params, client, path)
            assert answer["rows"] == [] and answer["cost_error"] is None
            assert answer["cost"]["rows"] == [line for line in full if line["level"] != "client"]
    # one span: a row per department, client and model, where per day there is one for each day
    assert len(month_tokens(month_store, params, None, [date(2026, 3, 1)])) * 2 == len(
        month_tokens(month_store, params)
    )
    assert department_answer(month_store, params, None, None)["cost_error"].startswith("no price table")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            '[models."m"]\ninput_per_1k = "cheap"\noutput_per_1k = 1\n',
            r'\[models."m"\].input_per_1k: expected a number',
        ),
        ('[models."m"]\ninput_per_1k = -1\noutput_per_1k = 1\n', r"input_per_1k: expected a non-negative"),
        ('[models."m"]\ninput_per_1k = 1\n', r'\[models."m"\]: missing output_per_1k'),
        (
            '[models."m"]\ninput_per_1k = 1\noutput_per_1k = 1\ninput_per_1K = 2\n',
            r"unknown key\(s\) \['input_per_1K'\]",
        ),
        ('[models."m"]\ninput_per_1k = true\noutput_per_1k = 1\n', r"input_per_1k: expected a number"),
        ('[models."m"]\ninput_per_1k = nan\noutput_per_1k = 1\n', r"non-negative finite"),
        ("currency = 'USD'\n", r"no \[models"),
        (
            (
                '[[models."m"]]\ninput_per_1k = 1\noutput_per_1k = 1\neffective_to = 2026-03-16\n'
                '[[models."m"]]\ninput_per_1k = 2\noutput_per_1k = 2\neffective_from = 2026-03-15\n'
            ),
            r"entries overlap",
        ),
        (
            '[models."m"]\ninput_per_1k = 1\noutput_per_1k = 1\neffective_from = 2026-03-15T12:00:00Z\n',
            r"start of a UTC day",
        ),
        ('[models."m"]\ninput_per_1k = 1\noutput_per_1k = 1\neffective_from = "soon"\n', r"expected a date"),
        (
            '[models."m"]\ninput_per_1k = 1\noutput_per_1k = 1\neffective_from = 2026-03-15\neffective_to = 2026-03-01\n',
            r"must be after effective_from",
        ),
        ("[models\n", r"not valid TOML"),
    ],
)
def test_malformed_price_tables(text, match):
    with pytest.raises(PriceTableError, match=match):
        PriceTable.parse(text, "prices.toml")


def test_price_table_file_errors(tmp_path):
    with pytest.raises(PriceTableError, match="does not exist"):
        PriceTable.load(tmp_path / "missing.toml")
    path = tmp_path / "p.toml"
    path.write_text(PRICES)
    table = PriceTable.load(path)
    assert table.models["gpt2-tiny"][0].input_per_1k == Decimal("0.00033")
    assert table.models["t5-tiny"][0].cost(1000, 1000) == Decimal("0.0020")
    assert table.sha256 == hashlib.sha256(PRICES.encode()).hexdigest()


def test_cent_allocation_sums_exactly():
    # three clients with a third of a cent each: lines must still add up to the rounded total
    prices = PriceTable.parse('[models."m"]\ninput_per_1k = 0.01\noutput_per_1k = 0\n')
    rows = [
        {
            "department": "d",
            "client_id": c,
            "model": "m",
            "requests": 1,
            "input_tokens": 1333,
            "output_tokens": 0,
            "total_tokens": 1333,
        }
        for c in ("a", "b", "c")
    ]
    report = cost_report(rows, prices)
    lines = [Decimal(r["cost"]) for r in report if r["level"] == "client"]
    assert Decimal(report[-1]["cost"]) == Decimal("0.04")  # 3 x 0.01333 = 0.03999
    assert sum(lines) == Decimal("0.04") and sorted(lines) == [Decimal("0.01"), Decimal("0.01"), Decimal("0.02")]
    assert report[-1]["cost"] == "0.04"
