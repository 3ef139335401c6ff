"""The sink's flush protocol as pure logic (1. batch, 2. deduplicate, 3. insert, 4. commit),
with an in-memory consumer and store: offsets are committed only after every row before them
is stored, refused rows are isolated, a store that is down is retried and a stopping sink
commits nothing unstored. (The broker and chDB versions: test_sink_service.py, test_sink_faults.py.)"""

from __future__ import annotations

import threading

import pytest

from tests.support import synth
from tests.support.fakes import FakeConsumer, FakeMessage, FakeProducer, FakeStore
from tokenaudit.schemas import ANOMALY, ROLLUP, SAMPLED, encode, records
from tokenaudit.settings import load_settings
from tokenaudit.sinks.sink import Sink
from tokenaudit.streams.window_state import Window

T0 = 1_750_000_000_000


def _settings(**kw):
    return load_settings(**{"sink_batch_rows": 1000, "sink_batch_seconds": 60.0, **kw})


def _rollup(client: str, requests: int, ws: int = T0) -> bytes:
    w = Window("eng", 0)
    w.requests = w.input_tokens = w.total_tokens = requests
    w.applied_offset = requests
    return encode(ROLLUP, records.usage_rollup(client, "eng", "", "t5", ws, ws + 60_000, w))


def _messages(s) -> list[FakeMessage]:
    ev = synth.event("r1", T0, "acme", input_tokens=5000)
    anomaly = records.anomaly("input_tokens", "acme", "eng", "t5", T0, 5000, 2048, "big", ts=T0, request_id="r1")
    values = [
        (s.topic_rollups, _rollup("acme", 1)),
        (s.topic_rollups, _rollup("acme", 3)),
        (s.topic_rollups, _rollup("acme", 2)),  # an older version after a newer one: the newer stays
        (s.topic_rollups, _rollup("beta", 4)),
        (s.topic_sampled, encode(SAMPLED, records.sampled_record(ev, "top_fraction", 1.0))),
        (s.topic_anomalies, encode(ANOMALY, anomaly)),
        (s.topic_anomalies, encode(ANOMALY, anomaly)),
    ]
    return [FakeMessage(topic, value, b"acme", 0, i) for i, (topic, value) in enumerate(values)]


def test_batch_deduplicate_insert_then_commit():
    s = _settings()
    consumer, store = FakeConsumer(_messages(s)), FakeStore()
    sink = Sink(s, store, consumer=consumer)
    sink.poll(timeout=0)
    assert consumer.commits == [] and store.inserts == []  # batched, under the row and time bounds
    assert sink.flush()
    rollups = {r["client_id"]: r["version"] for r in store.tables["usage_rollup"]}
    assert rollups == {"acme": 3, "beta": 4}
    assert len(store.tables["usage_sampled"]) == 1 and len(store.tables["anomalies"]) == 1
    assert consumer.commits == [7]  # one commit, after every row was stored
    c = sink.counters
    assert (
        c.messages,
        c.batch_duplicates,
        c.inserted_rollups,
        c.inserted_sampled,
        c.inserted_anomalies,
        c.batches,
        c.commits_skipped,
    ) == (7, 3, 2, 1, 1, 1, 0)


def test_refused_rows_are_isolated_and_the_rest_is_stored():
    s = _settings()
    consumer = FakeConsumer([FakeMessage(s.topic_rollups, _rollup(f"c{i}", i + 1), b"k", 0, i) for i in range(9)])
    store = FakeStore(
        refuse=lambda table, row: "out of range" if table == "usage_rollup" and row["requests"] in (3, 7) else None
    )
    sink = Sink(s, store, consumer=consumer)
    sink.poll(timeout=0)
    assert sink.flush()
    assert sorted(r["requests"] for r in store.tables["usage_rollup"]) == [1, 2, 4, 5, 6, 8, 9]
    rejected = store.tables["rejected_rows"]
    assert [r["table"] for r in rejected] == ["usage_rollup"] * 2 and all(
        "out of range" in r["reason"] for r in rejected
    )
    assert sink.counters.rejected_rows == 2 and consumer.commits == [9]


def test_a_store_that_is_down_is_retried_and_nothing_is_committed_before_it_stores():
    s = _settings()
    consumer, store = FakeConsumer(_messages(s)), FakeStore(down=2)
    sink = Sink(s, store, consumer=consumer)
    sink.poll(timeout=0)
    assert sink.flush()  # retried with backoff until the store answers
    assert sink.counters.insert_errors == 2 and consumer.commits == [7] and len(store.tables["usage_rollup"]) == 2


def test_a_stopping_sink_gives_up_on_a_down_store_without_committing():
    s = _settings()
    consumer, store = FakeConsumer(_messages(s)), FakeStore(down=10**6)
    sink = Sink(s, store, consumer=consumer)
    sink.poll(timeout=0)
    stop = threading.Event()
    stop.set()
    assert not sink.flush(stop=stop)
    assert consumer.commits == [] and store.inserts == [] and sink.batch.messages == 7  # kept, read again later


def test_an_undecodable_record_goes_to_the_dead_letter_topic_and_the_rest_is_stored():
    s = _settings()
    dlq = FakeProducer({})
    consumer = FakeConsumer(
        [
            FakeMessage(s.topic_rollups, b"\x00garbage", b"k", 3, 41),
            FakeMessage(s.topic_rollups, _rollup("acme", 1), b"k", 3, 42),
        ]
    )
    sink = Sink(s, FakeStore(), consumer=consumer, dlq_producer=dlq)
    sink.poll(timeout=0)
    assert sink.flush()
    ((topic, value, key, headers),) = dlq.produced
    reasons = dict(headers)
    assert (topic, value, key) == (s.topic_dlq, b"\x00garbage", b"k")
    assert reasons["reason"].startswith(b"sink undecodable") and reasons["source_offset"] == b"41"
    assert sink.counters.undecodable == 1 and sink.counters.inserted_rollups == 1


@pytest.mark.parametrize("rows", [1, 3])
def test_the_row_bound_flushes_by_itself(rows):
    s = _settings(sink_batch_rows=rows)
    consumer = FakeConsumer([FakeMessage(s.topic_rollups, _rollup(f"c{i}", 1), b"k", 0, i) for i in range(3)])
    sink = Sink(s, FakeStore(), consumer=consumer)
    while consumer.queue:
        sink.poll(timeout=0)
    assert consumer.commits == list(range(rows, 4, rows))
