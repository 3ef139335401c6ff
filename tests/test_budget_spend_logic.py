"""Budget spend and alerts, the pure logic (no broker): the processor counts every client's and
department's tokens and cost per source partition and period exactly (copies, replays after a
crash at any point, late events), a new period starts from zero, the publisher sends only what
changed, and the 50/80/100% alerts are raised once per period, by one owner, also after a restart."""

from __future__ import annotations

import random
import zlib
from collections import defaultdict

import pytest

from tests.support import synth
from tokenaudit.infra.prices import PriceTable
from tokenaudit.schemas.budgets import budget, budget_anomaly_id, spend_key
from tokenaudit.settings import load_settings
from tokenaudit.streams.budget_alerts import BudgetAlerts, alert_partition
from tokenaudit.streams.outputs import Outputs
from tokenaudit.streams.processor import Processor
from tokenaudit.streams.spend_publisher import SpendPublisher
from tokenaudit.streams.state import MemoryState

T0 = 1_750_000_000_000 - 1_750_000_000_000 % 600_000  # a period start (600 s periods)
PARTS = 2
PRICES = """
currency = "USD"
[models."t5-tiny"]
input_per_1k = 0.5
output_per_1k = 2
"""


def settings(tmp_path, **kw):
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    base = dict(window_seconds=2, grace_seconds=1, budget_period_seconds=600, price_table=str(prices))
    base.update(kw)
    return load_settings(**base)


def partitioned(events):
    """(partition, offset, key, value) as a consumer sees them (client keyed, in partition order)."""
    logs: dict[int, list] = defaultdict(list)
    for key, value in synth.encoded(events):
        p = zlib.crc32(key) % PARTS
        logs[p].append((p, len(logs[p]), key, value))
    return [
        m for i in range(max(map(len, logs.values()))) for p in sorted(logs) if i < len(logs[p]) for m in [logs[p][i]]
    ]


def run(proc: Processor, msgs, batch: int = 7) -> None:
    for i in range(0, len(msgs), batch):
        out = Outputs()
        for p, off, key, value in msgs[i : i + batch]:
            proc.process(p, off, key, value, out)
        proc.end_batch(out)


def stream(n: int = 120, seed: int = 1) -> list[dict]:
    rnd = random.Random(seed)
    events = []
    for i in range(n):
        client = rnd.choice(["alice", "bob", "carol"])
        model = "t5-tiny" if i % 5 else "gpt2-tiny"  # gpt2-tiny has no price
        dept = "research" if client != "carol" else "ops"
        events.append(
            synth.event(f"r{i}", T0 + i * 100, client, model, rnd.randint(1, 50), rnd.randint(0, 20), department=dept)
        )
    return events


def truth(events) -> dict[tuple[str, str], list]:
    """(scope, scope_id) -> [input, output, cost, unpriced, events], over all partitions."""
    sums: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0.0, 0, 0])
    for e in events:
        for scope in (("client", e["client_id"]), ("department", e["department"])):
            s = sums[scope]
            s[0] += e["input_tokens"]
            s[1] += e["output_tokens"]
            if e["model"] == "t5-tiny":
                s[2] += e["input_tokens"] * 0.0005 + e["output_tokens"] * 0.002
            else:
                s[3] += e["input_tokens"] + e["output_tokens"]
            s[4] += 1
    return dict(sums)


def spend(proc: Processor, scope: str, scope_id: str, period: str = "day") -> list:
    total = [0, 0, 0.0, 0, 0]
    for p in range(PARTS):
        r = proc.spend.record(p, scope, scope_id, period, -1, 0)
        if r is not None:
            assert r["period_start"] == T0 and r["period_end"] == T0 + 600_000
            for i, name in enumerate(("input_tokens", "output_tokens", "cost", "unpriced_tokens", "events")):
                total[i] += r[name]
    return total


def assert_spend(proc: Processor, expected: dict) -> None:
    for (scope, scope_id), want in expected.items():
        got = spend(proc, scope, scope_id)
        assert got[:2] + got[3:] == want[:2] + want[3:], (scope, scope_id)
        assert got[2] == pytest.approx(want[2], rel=1e-9), (scope, scope_id)


def test_spend_is_exact_with_copies_and_crashes_at_random_points(tmp_path):
    events = stream()
    copies, _ = synth.with_copies(events, 0.2, seed=2)
    msgs = partitioned(copies)
    s = settings(tmp_path)
    reference = Processor(s, MemoryState())
    run(reference, msgs)
    expected = truth(events)
    assert_spend(reference, expected)
    assert {k[1] for k in expected if k[0] == "department"} == {"research", "ops"}
    # both departments and the unpriced model are really in the stream
    assert expected[("department", "research")][3] > 0 and expected[("department", "research")][2] > 0

    rnd = random.Random(5)
    for _ in range(5):
        state = MemoryState()
        proc = Processor(s, state)
        cut = rnd.randrange(1, len(msgs))
        run(proc, msgs[:cut])
        # SIGKILL: a prefix of the writes survives; the restart replays the whole stream
        state.writes = state.writes[: rnd.randint(0, len(state.writes))]
        restored = Processor(s, state.persisted())
        run(restored, msgs)
        assert_spend(restored, expected)


def test_a_new_period_starts_from_zero_and_a_late_event_of_the_last_one_changes_nothing(tmp_path):
    proc = Processor(settings(tmp_path), MemoryState())
    first = [synth.event(f"a{i}", T0 + i, "alice", input_tokens=10, output_tokens=5) for i in range(3)]
    later = [synth.event(f"b{i}", T0 + 600_000 + i, "alice", input_tokens=1, output_tokens=1) for i in range(2)]
    late = [synth.event("late", T0 + 500, "alice", input_tokens=100, output_tokens=100)]
    msgs = [(0, i, k, v) for i, (k, v) in enumerate(synth.encoded(first + later + late))]
    run(proc, msgs[:3])
    r = proc.spend.record(0, "client", "alice", "month", 2, 0)
    assert (r["period_start"], r["input_tokens"], r["output_tokens"], r["events"]) == (T0, 30, 15, 3)
    run(proc, msgs[3:])
    r = proc.spend.record(0, "client", "alice", "month", 5, 0)
    assert (r["period_start"], r["period_end"]) == (T0 + 600_000, T0 + 1_200_000)
    assert (r["input_tokens"], r["output_tokens"], r["events"], r["offset"]) == (2, 2, 2, 5)


def test_day_and_month_periods_are_counted_side_by_side(tmp_path):
    s = settings(tmp_path, budget_period_seconds=None)
    proc = Processor(s, MemoryState())
    day0 = 1_767_225_600_000 - 86_400_000  # 2025-12-31 00:00 UTC
    evs = [synth.event("d1", day0 + 1000, "alice"), synth.event("d2", day0 + 86_400_000 + 1000, "alice")]
    run(proc, [(0, i, k, v) for i, (k, v) in enumerate(synth.encoded(evs))])
    day = proc.spend.record(0, "client", "alice", "day", 1, 0)
    month = proc.spend.record(0, "client", "alice", "month", 1, 0)
    assert (day["period_start"], day["events"]) == (day0 + 86_400_000, 1)  # 2026-01-01
    assert (month["period_start"], month["events"]) == (day0 + 86_400_000, 1)  # January
    assert month["period_end"] == day0 + 86_400_000 + 31 * 86_400_000


def test_the_publisher_sends_budgeted_scopes_only_when_they_change(tmp_path):
    proc = Processor(settings(tmp_path), MemoryState())
    pub = SpendPublisher(proc.spend)
    budgets = {("department", "research"): budget("department", "research", "tokens", 100, "day", False, 0)}
    evs = [synth.event(f"e{i}", T0 + i, c, department="research") for i, c in enumerate(["alice", "bob", "alice"])]
    msgs = partitioned(evs)
    run(proc, msgs)
    position = {p: max(o for q, o, _, _ in msgs if q == p) for p in range(PARTS)}
    now = T0 + 1000
    due = pub.due(budgets, range(PARTS), position.__getitem__, now)
    assert sorted(k for k, _ in due) == sorted(
        spend_key("department", "research", p) for p in {m[0] for m in msgs}
    )  # alice and bob are budgeted through their department only
    assert sum(r["events"] for _, r in due) == 3 and all(r["offset"] == position[r["partition"]] for _, r in due)
    pub.sent(due)
    assert pub.due(budgets, range(PARTS), position.__getitem__, now) == []
    # the partition moved on (another client's event): the record's offset is republished
    moved = {p: o + 1 for p, o in position.items()}
    assert len(pub.due(budgets, range(PARTS), moved.__getitem__, now)) == len(due)
    # ... but not once its period is over
    assert pub.due(budgets, range(PARTS), moved.__getitem__, T0 + 600_000) == []
    assert pub.due({}, range(PARTS), moved.__getitem__, now) == []


def _spend_of(amounts: dict[tuple[str, str], float]):
    def spend_of(scope: str, scope_id: str, period: str):
        return T0, T0 + 600_000, int(amounts.get((scope, scope_id), 0)), 0, amounts.get((scope, scope_id), 0)

    return spend_of


def test_alerts_at_50_80_100_once_per_period_and_after_a_restart():
    budgets = {
        ("department", "research"): budget("department", "research", "tokens", 1000, "day", True, 0),
        ("client", "alice"): budget("client", "alice", "cost", 10, "month", False, 0),
    }
    state = MemoryState()
    alerts = BudgetAlerts(state, 4)
    owned = range(4)
    amounts = {("department", "research"): 400.0, ("client", "alice"): 5.0}
    anomalies, updates = alerts.due(budgets, owned, _spend_of(amounts), T0 + 5)
    assert [(a["client_id"], a["threshold"]) for a in anomalies] == [("alice", 5.0)]
    alerts.raised(updates)
    amounts[("department", "research")] = 1200.0  # past 50, 80 and 100% at once: three alerts
    anomalies, updates = alerts.due(budgets, owned, _spend_of(amounts), T0 + 6)
    assert [a["threshold"] for a in anomalies] == [500.0, 800.0, 1000.0]
    for a, level in zip(anomalies, (0.5, 0.8, 1.0), strict=True):
        assert a["anomaly_id"] == budget_anomaly_id("department", "research", T0, level)
        assert (a["rule"], a["client_id"], a["department"], a["window_start"]) == ("budget", "", "research", T0)
        assert a["observed"] == 1200.0 and a["ts"] == T0 + 6
    assert [a["severity"] for a in anomalies] == ["warning", "warning", "critical"]
    # not raised yet (not delivered): asked again, the same ones
    assert [a["anomaly_id"] for a in alerts.due(budgets, owned, _spend_of(amounts), T0 + 7)[0]] == [
        a["anomaly_id"] for a in anomalies
    ]
    alerts.raised(updates)
    state.flush()
    assert alerts.due(budgets, owned, _spend_of(amounts), T0 + 8) == ([], [])
    # a restart: the levels raised come back from the changelog, nothing is raised again
    restarted = BudgetAlerts(state.persisted(), 4)
    assert restarted.due(budgets, owned, _spend_of(amounts), T0 + 9) == ([], [])
    # only the owner of a scope's alert partition raises its alerts
    other = BudgetAlerts(MemoryState(), 4)
    mine = alert_partition("department", "research", 4)
    assert [a["department"] for a in other.due(budgets, [mine], _spend_of(amounts), T0)[0]] == ["research"] * 3
    assert all(
        a["department"] != "research" for a in other.due(budgets, set(owned) - {mine}, _spend_of(amounts), T0)[0]
    )


def test_a_new_period_raises_its_alerts_again():
    budgets = {("client", "bob"): budget("client", "bob", "tokens", 10, "day", False, 0)}
    state = MemoryState()
    alerts = BudgetAlerts(state, 1)
    anomalies, updates = alerts.due(budgets, [0], _spend_of({("client", "bob"): 10}), T0)
    assert len(anomalies) == 3
    alerts.raised(updates)

    def next_period(scope, scope_id, period):
        return T0 + 600_000, T0 + 1_200_000, 6, 0, 0.0

    anomalies, _ = alerts.due(budgets, [0], next_period, T0 + 600_001)
    assert [(a["window_start"], a["threshold"]) for a in anomalies] == [(T0 + 600_000, 5.0)]


def test_cost_budgets_price_with_the_price_file(tmp_path):
    table = PriceTable.parse(PRICES)
    proc = Processor(settings(tmp_path), MemoryState())
    assert proc.spend.pricing.table is not None
    assert proc.spend.pricing.per_token("t5-tiny", T0) == (
        float(table.models["t5-tiny"][0].input_per_1k) / 1000,
        0.002,
    )
    assert proc.spend.pricing.per_token("unknown", T0) is None


def test_the_month_holds_its_earlier_days_and_a_client_is_summed_over_its_departments(tmp_path):
    proc = Processor(settings(tmp_path, budget_period_seconds=None), MemoryState())
    march = 1_772_323_200_000  # 2026-03-01 00:00 UTC
    day = 86_400_000
    evs = [
        synth.event("m1", march + 1000, "alice", input_tokens=10, output_tokens=0, department="ops"),
        synth.event("m2", march + 1 * day + 1000, "alice", input_tokens=20, output_tokens=0, department="ops"),
        synth.event("m3", march + 1 * day + 2000, "alice", input_tokens=40, output_tokens=0, department="research"),
        synth.event("m4", march + 3000, "alice", input_tokens=80, output_tokens=0, department="ops"),  # late: day 1
        synth.event("m5", march - day, "alice", input_tokens=160, output_tokens=0, department="ops"),  # February
    ]
    run(proc, [(0, i, k, v) for i, (k, v) in enumerate(synth.encoded(evs))])
    today = proc.spend.record(0, "client", "alice", "day", 4, 0)
    month = proc.spend.record(0, "client", "alice", "month", 4, 0)
    assert (today["period_start"], today["input_tokens"], today["events"]) == (march + day, 60, 2)
    assert (month["period_start"], month["input_tokens"], month["events"]) == (march, 150, 4)
    ops = proc.spend.record(0, "department", "ops", "month", 4, 0)
    assert (ops["input_tokens"], ops["events"]) == (110, 3)
    assert proc.spend.record(0, "department", "research", "day", 4, 0)["input_tokens"] == 40
    assert proc.spend.record(1, "client", "alice", "day", 4, 0) is None
    # a restart: the index of a partition's values is built again from the restored state
    restored = Processor(settings(tmp_path, budget_period_seconds=None), proc.state.persisted())
    assert restored.spend.record(0, "client", "alice", "month", 4, 0) == month
