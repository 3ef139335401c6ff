"""The sink under faults, for real: rows ClickHouse refuses are isolated into rejected_rows while
their neighbours are stored; a store that is down (a full disk under the embedded store) is
retried with backoff, and SIGTERM during the outage stops a real `tokenaudit sink` within
seconds with nothing committed that was not stored, which the next start then stores."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.support.sink_process import metric, sink_env, sink_settings, start_sink
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.store import Store
from tokenaudit.schemas import ROLLUP, encode
from tokenaudit.sinks.sink import Sink

pytestmark = pytest.mark.timeout(180)
WS = int(time.time() * 1000) // 60_000 * 60_000


def rollup(client: str, requests: int, ws: int = WS) -> dict:
    return {
        "client_id": client,
        "department": "eng",
        "api_key_id": "",
        "model": "m",
        "window_start": ws,
        "window_end": ws + 60_000,
        "requests": requests,
        "errors": 0,
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "latency_ms_sum": 2.0,
        "latency_ms_max": 2.0,
        "max_input_tokens": 10,
        "truncated": 0,
        "version": max(requests, 0),
        "delta_id": None,
        "applied_offset": 100,
        "event_ids": "",
    }


def _produce(bootstrap: str, topic: str, records: list[dict]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for r in records:
        producer.produce(topic, key=r["client_id"].encode(), value=encode(ROLLUP, r))
    producer.flush(10)


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [
            tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        ]
    finally:
        consumer.close()


def test_refused_rows_land_in_rejected_rows_and_their_neighbours_are_stored(kafka_bootstrap, ch_client, ch_database):
    tag = f"r{uuid.uuid4().hex[:8]}"
    s = sink_settings(kafka_bootstrap, tag, sink_batch_rows=1000, sink_batch_seconds=0.5)
    ensure_topics(kafka_bootstrap, {s.topic_rollups: 1, s.topic_sampled: 1, s.topic_anomalies: 1, s.topic_dlq: 1})
    store = Store(ch_client, ch_database)
    store.migrate()
    # A constraint added for the purpose: ClickHouse itself refuses the row (server-side).
    store.command("ALTER TABLE {db}.usage_rollup ADD CONSTRAINT sane_requests CHECK requests < 1000000")
    records = [rollup(f"c{i:02d}", i + 1) for i in range(40)]
    records[7] = rollup("c07", 5_000_000)  # violates the constraint
    records[29] = rollup("c29", -3)  # a negative count: out of range for UInt64
    _produce(kafka_bootstrap, s.topic_rollups, records)
    sink = Sink(s, store, group_id=f"{tag}-sink")
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while sink.counters.batches < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(30)
    stored = {
        r["client_id"]: r["requests"] for r in store.query("SELECT client_id, requests FROM {db}.usage_rollup FINAL")
    }
    assert stored == {r["client_id"]: r["requests"] for i, r in enumerate(records) if i not in (7, 29)}
    rejected = store.query("SELECT table, reason, record FROM {db}.rejected_rows FINAL ORDER BY record")
    assert [(r["table"], json.loads(r["record"])["client_id"]) for r in rejected] == [
        ("usage_rollup", "c07"),
        ("usage_rollup", "c29"),
    ]
    by_client = {json.loads(r["record"])["client_id"]: r["reason"] for r in rejected}
    assert "VIOLATED_CONSTRAINT" in by_client["c07"] and "sane_requests" in by_client["c07"]
    assert by_client["c29"].startswith("column requests cannot hold -3") and "out of range" in by_client["c29"]
    assert json.loads(rejected[1]["record"])["requests"] == -3  # the raw record, as it came
    assert sink.counters.rejected_rows == 2 and sink.counters.inserted_rollups == 38
    # committed after storing: a fresh consumer of the group starts after the 40 records
    assert _committed(kafka_bootstrap, f"{tag}-sink", s.topic_rollups, 1) == [40]


@pytest.mark.chaos  # the store's disk fills up (a tmpfs)
def test_sigterm_during_a_store_outage_exits_promptly_and_commits_nothing_unstored(kafka_bootstrap, tmp_path):
    tag = f"o{uuid.uuid4().hex[:8]}"
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], check=True)
    try:
        port = free_port()
        env = sink_env(
            kafka_bootstrap,
            str(tmp_path / "data"),
            tag,
            port,
            TOKENAUDIT_CLICKHOUSE_DSN=f"chdb://{disk / 'ch'}",
            TOKENAUDIT_SINK_BATCH_SECONDS="0.3",
            TOKENAUDIT_SINK_SHUTDOWN_SECONDS="2",
        )
        s = sink_settings(kafka_bootstrap, tag)
        ensure_topics(kafka_bootstrap, {s.topic_rollups: 2, s.topic_sampled: 1, s.topic_anomalies: 1, s.topic_dlq: 1})
        proc = start_sink(env, port)
        try:
            with open(disk / "filler", "wb") as f:  # the store's disk is full from here on
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                except OSError:
                    pass
            _produce(kafka_bootstrap, s.topic_rollups, [rollup(f"c{i}", i + 1) for i in range(30)])
            deadline = time.monotonic() + 30
            while (metric(port, "tokenaudit_sink_insert_errors_total") or 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.3)  # consumed, insert failing, retried with backoff
            assert (metric(port, "tokenaudit_sink_insert_errors_total") or 0) >= 2
            assert metric(port, "tokenaudit_sink_messages_total") == 30
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, proc.stdout.read().decode()
            assert time.monotonic() - started < 10  # backoff sleeps end at once; the last try <= 2 s
        finally:
            if proc.poll() is None:
                proc.kill()
        log = proc.stdout.read().decode()
        assert "not stored" in log and "not committed" in log, log
        assert all(o < 0 for o in _committed(kafka_bootstrap, f"{tag}-sink", s.topic_rollups, 2))  # nothing
        (disk / "filler").unlink()  # the disk has room again: the next start stores every row
        proc = start_sink(env, port)
        try:
            deadline = time.monotonic() + 30
            while (
                metric(port, 'tokenaudit_sink_inserted_rows_total{table="usage_rollup"}') or 0
            ) < 30 and time.monotonic() < deadline:
                time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert sum(_committed(kafka_bootstrap, f"{tag}-sink", s.topic_rollups, 2)) == 30
        script = (
            "import json; from tokenaudit.infra.store import Store; from tokenaudit.settings import get_settings;"
            "st=Store.from_settings(get_settings(), migrate_schema=False);"
            "print(json.dumps(st.query('SELECT count() AS n, sum(requests) AS r FROM {db}.usage_rollup FINAL')[0]))"
        )
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == {"n": 30, "r": sum(range(1, 31))}, out.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(disk, ignore_errors=True)
