"""The ledger's Arrow insert (sinks/ledger_batch.py) stores, row for row, what the reference row
builder (:meth:`LedgerRows.row`) stores through clickhouse-connect's row insert: both into the
same real chDB table, read back whole and compared, for events that take every branch (the
app's default request id, a derived event id, nulls, latencies on a rounding tie, each
client-IP regime); and the ledger's own batch bound. The sink's use of it through the real
topic, and the refused rows: tests/test_ledger.py."""

from __future__ import annotations

import time

import pytest

from tests.support import synth
from tests.support.fakes import FakeConsumer, FakeMessage
from tokenaudit.infra.store import Store
from tokenaudit.schemas import EVENT, encode
from tokenaudit.schemas.client_ip import ip_policy
from tokenaudit.schemas.compiled import compile_decoder
from tokenaudit.settings import load_settings
from tokenaudit.sinks.ledger import LEDGER_COLUMNS, LedgerRows
from tokenaudit.sinks.ledger_batch import LedgerBatch, arrow_table, record_of
from tokenaudit.sinks.sink import Sink

T0 = int(time.time() * 1000) - 600_000


def _events() -> list[dict]:
    out = []
    for i in range(12):
        ev = synth.event(f"req-{i}", T0 + i * 7, f"c{i % 3}", input_tokens=10 + i, truncated=i == 2)
        ev["client_ip"] = ("203.0.113.7", "2001:db8:abcd:12::9", "not an ip")[i % 3]
        out.append(ev)
    out[0]["request_id"] = out[0]["event_id"].replace("-", "")  # the app's default: stored as ''
    out[1].update(latency_ms=0.125, queue_ms=1.005, inference_ms=2.675, ttft_ms=0.015)  # ties at 1/100 ms
    out[2].update(instance=None, api_key_id=None, error_type=None, batch_id=None, finish_reason=None)
    out[3].update(method="GET", path="/v1/models", batch_id=None, batch_size=0, position_in_batch=-1)
    out[4].update(event_id=None)  # a v1/v2 writer's event: its id is derived
    out[5].update(ttft_ms=None, status_code=500, error_type="generation_failed")
    return out


def _both_ways(store: Store, events: list[dict], client_ip) -> tuple[list[dict], list[dict], LedgerBatch]:
    """The table's rows after the reference row insert, and after the Arrow insert."""
    reference = LedgerRows(client_ip)
    batch = LedgerBatch()
    for ev in events:
        assert batch.add(ev, reference.event_id(ev))

    def stored() -> list[dict]:
        rows = store.query("SELECT * FROM {db}.usage_requests ORDER BY event_id_hi, event_id_lo")
        store.command("TRUNCATE TABLE {db}.usage_requests")
        return rows

    store.insert("usage_requests", [reference.row(ev, reference.event_id(ev)) for ev in events], LEDGER_COLUMNS)
    expected = stored()
    store.insert_arrow("usage_requests", arrow_table(batch.rows, store.arrow_types("usage_requests"), client_ip))
    return expected, stored(), batch


@pytest.mark.parametrize("regime", ["full", "truncated", "hashed"])
def test_the_arrow_insert_stores_what_the_row_builder_builds(ch_client, ch_database, regime):
    store = Store(ch_client, ch_database)
    store.migrate()
    client_ip = ip_policy(regime, b"k")
    events = _events()
    expected, got, batch = _both_ways(store, events, client_ip)
    assert len(got) == len(events) and got == expected
    assert not batch.add(events[7], events[7]["event_id"])  # a copy: once per batch
    by_id = {r["event_id_lo"]: r for r in got}
    first = by_id[int(events[0]["event_id"].replace("-", ""), 16) & (1 << 64) - 1]
    assert first["request_id"] == ""  # branches really taken, not only equal
    tie = by_id[int(events[1]["event_id"].replace("-", ""), 16) & (1 << 64) - 1]
    assert (tie["latency_ms_x100"], tie["queue_ms_x100"], tie["ttft_ms_x100"]) == (
        round(0.125 * 100),
        round(1.005 * 100),
        round(0.015 * 100),
    )
    assert record_of(batch.rows[5])["error_type"] == "generation_failed"


def test_values_a_column_cannot_hold_are_refused_naming_the_column(ch_client, ch_database):
    store = Store(ch_client, ch_database)
    store.migrate()
    types = store.arrow_types("usage_requests")
    for field, value, column in (
        ("position_in_batch", 40_000, "position_in_batch"),
        ("queue_ms", -1.0, "queue_ms_x100"),
        ("inference_ms", float("inf"), "inference_ms_x100"),
        ("batch_size", 70_000, "batch_size"),
    ):
        ev = synth.event("r", T0, "c1")
        ev[field] = value
        batch = LedgerBatch()
        batch.add(ev, ev["event_id"])
        with pytest.raises(ValueError, match=f"^column {column}: "):
            arrow_table(batch.rows, types, str)


def test_the_ledger_is_flushed_at_its_own_row_bound(ch_client, ch_database):
    """Ledger rows count against ``sink_ledger_batch_rows``, not ``sink_batch_rows`` (the poll
    takes ``sink_batch_rows`` messages at a time here; an in-memory consumer hands them out,
    the store is the real chDB one)."""
    s = load_settings(sink_batch_rows=3, sink_ledger_batch_rows=4, sink_batch_seconds=60.0)
    store = Store(ch_client, ch_database)
    store.migrate()
    events = [synth.event(f"b-{i}", T0 + i, "c1") for i in range(10)]
    consumer = FakeConsumer([FakeMessage(s.topic_usage, encode(EVENT, ev), b"k", 0, i) for i, ev in enumerate(events)])
    sink = Sink(s, store, consumer=consumer)
    while consumer.queue:
        sink.poll(timeout=0)
    assert consumer.commits == [6, 10]  # 3 ledger rows stayed batched under sink_batch_rows=3
    assert sink.counters.inserted_requests == 10 and sink.batch.messages == 0
    assert store.query("SELECT count() AS n FROM {db}.usage_requests")[0]["n"] == 10


def test_events_of_every_writer_version_as_the_sink_decodes_them(ch_client, ch_database):
    """v1-v3 writers' records are resolved to the current schema by the generic codec (v1/v2
    have no event id: derived), v4 by the native decoder: the same rows either way."""
    store = Store(ch_client, ch_database)
    store.migrate()
    decode = compile_decoder(EVENT)
    assert decode is not None
    events = []
    for version in (1, 2, 3, 4):
        ev = synth.event(f"v{version}", T0 + version, "c1", truncated=version == 3)
        events.append(decode(encode(EVENT, ev, version=version)))
    assert [e["event_id"] is None for e in events] == [True, True, False, False]
    expected, got, _ = _both_ways(store, events, str)
    assert len(got) == 4 and got == expected
