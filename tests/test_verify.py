"""`tokenaudit verify`: the reconciliation logic on real encoded events (no broker), the
admin route over a real chDB store, and a planted gap found for real: the pipeline (worker
and sink processes on the session broker) stores batch A, the sink is stopped, batch B is
produced; verify exits 1 naming B's client and hour, and 0 again once the sink caught up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from starlette.testclient import TestClient

from tests.support import synth
from tests.support.usage_seed import ROLLUP_COLUMNS
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.procutil import free_port
from tokenaudit.infra.store import Store
from tokenaudit.reports.usage_api import create_app
from tokenaudit.reports.verify import HOUR_MS, TopicScan, _EventCounter, reconcile, store_totals
from tokenaudit.schemas import EVENT, encode
from tokenaudit.settings import load_settings

CLI = [sys.executable, "-m", "tokenaudit.cli"]
H10 = int(datetime(2025, 6, 15, 10, tzinfo=UTC).timestamp() * 1000)  # an hour long settled


def _scan(events, window_ms: int, arrived: int = 0, arrived_before: int = 1 << 62) -> TopicScan:
    scan = TopicScan()
    counter = _EventCounter(scan, window_ms, 0, 1 << 62, arrived_before)
    for e in events:
        counter.add(encode(EVENT, e), arrived)
    return scan


def test_events_are_bucketed_by_window_start_and_counted_once():
    # 7 s windows do not divide the hour: the window [09:59:58, 10:00:05) starts in hour 9,
    # so its events count there even though some happened after 10:00, as in the rollups
    window_ms = 7000
    ws = (H10 // window_ms) * window_ms
    assert ws < H10 < ws + window_ms
    nxt = ws + window_ms
    events = [synth.event("a", ws, "c1"), synth.event("b", nxt - 1, "c1"), synth.event("c", nxt, "c1")]
    events.append(dict(events[1]))  # a second copy (a spool replay): the same derived id
    events.append({**synth.event("d", nxt + 10, "c1"), "event_id": "0190c9d6-2f5e-7000-8000-000000000001"})
    events.append({**synth.event("d2", nxt + 20, "c1"), "event_id": "0190c9d6-2f5e-7000-8000-000000000001"})
    events.append({**synth.event("bad", H10, "c1"), "latency_ms": -1.0})  # invalid: dead-lettered
    scan = _scan(events, window_ms)
    assert scan.totals == {("c1", "t5-tiny", H10 - HOUR_MS): [2, 40, 20, 60], ("c1", "t5-tiny", H10): [2, 40, 20, 60]}
    assert (scan.records, scan.duplicates, scan.invalid, scan.undecodable) == (7, 2, 1, 0)
    counter = _EventCounter(scan, window_ms, 0, 1 << 62, 0)
    counter.add(b"not avro", 0)
    counter.add(None, 0)
    assert scan.undecodable == 2


def test_reconcile_reports_each_kind_of_difference_and_leaves_pending_out():
    hour = H10
    scan = _scan(
        [
            synth.event("a", hour + 1, "ok"),
            synth.event("b", hour + 2, "short"),
            synth.event("c", hour + 3, "lost"),
            synth.event("d", hour + 4, "late"),
        ],
        60_000,
        arrived=5,
        arrived_before=10,
    )
    scan.pending.clear()
    scan.pending.add(("late", "t5-tiny", hour))
    row = {
        "model": "t5-tiny",
        "hour_ms": hour,
        "requests": 1,
        "input_tokens": 20,
        "output_tokens": 10,
        "total_tokens": 30,
        "events": None,
    }
    store = [
        {**row, "client_id": "ok"},
        {**row, "client_id": "short", "output_tokens": 9, "total_tokens": 29},
        {**row, "client_id": "ghost"},
    ]
    compared, drift, pending, ledger = reconcile(scan, store, hour)
    assert (compared, ledger) == (4, False)
    assert pending == [{"client_id": "late", "model": "t5-tiny", "hour": "2025-06-15T10:00:00Z"}]
    assert {d["client_id"]: d["what"] for d in drift} == {
        "short": "differs: output_tokens, total_tokens",
        "lost": "missing in ClickHouse",
        "ghost": "in ClickHouse, not on the topic",
    }
    # a range that starts inside an hour compares that partial hour too
    assert reconcile(scan, store, hour + 1)[0] == 4
    assert reconcile(scan, store, hour + HOUR_MS)[0] == 0
    # with the ledger, its distinct event count is compared too
    _, drift, _, ledger = reconcile(scan, [{**r, "events": 0} for r in store], hour)
    assert ledger and {d["client_id"] for d in drift} == {"ok", "short", "lost", "ghost"}


def test_admin_route_gives_store_totals_to_admin_keys_only(ch_client, ch_database, tmp_path):
    store = Store(ch_client, ch_database)
    store.migrate()
    cols = ROLLUP_COLUMNS
    ws = datetime(2025, 6, 15, 10, 59, 30, tzinfo=UTC)
    row = ["c1", "d", "m", ws, ws, 2, 0, 10, 5, 15, 1.0, 1.0, 5, 0, 2]
    earlier = ws.replace(minute=58)
    store.insert("usage_rollup", [row, [*row[:3], earlier, earlier, *row[5:]]], cols)  # two windows of hour 10
    store.insert("usage_rollup", [[*row[:5], 9, 0, 99, 99, 198, 1.0, 1.0, 5, 0, 1]], cols)  # superseded version
    registry = tmp_path / "keys.toml"
    admin, client = add_key(registry, "ops", "", role="admin"), add_key(registry, "c1", "d")
    api = TestClient(create_app(store, load_settings(data_dir=tmp_path, api_keys_file=registry)))
    url = "/v1/admin/verify"
    bounds = {"since_ms": str(H10), "until_ms": str(H10 + HOUR_MS)}
    assert api.get(url, params=bounds).status_code == 401
    assert api.get(url, params=bounds, headers={"Authorization": f"Bearer {client}"}).status_code == 403
    auth = {"Authorization": f"Bearer {admin}"}
    for bad in (
        {"since_ms": "1h", "until_ms": "2"},
        {"since_ms": "5"},
        {**bounds, "x": "1"},
        {"since_ms": str(H10 + 1), "until_ms": str(H10)},
    ):
        r = api.get(url, params=bad, headers=auth)
        assert r.status_code == 400 and "error" in r.json(), bad
    rows = api.get(url, params=bounds, headers=auth).json()["rows"]
    assert rows == [
        {
            "client_id": "c1",
            "model": "m",
            "hour_ms": H10,
            "requests": 4,
            "input_tokens": 20,
            "output_tokens": 10,
            "total_tokens": 30,
            "events": 0,  # the ledger exists (migration 0012) and holds none of these events
        }
    ]
    assert rows == store_totals(store, H10, H10 + HOUR_MS, 60_000)
    # TOKENAUDIT_LEDGER=off: the table exists unfed, so its (empty) count is not compared
    assert [r["events"] for r in store_totals(store, H10, H10 + HOUR_MS, 60_000, ledger=False)] == [None]
    # usage reports say up to when they are settled
    assert api.get("/v1/usage", params={"since": "1h"}, headers=auth).json()["settled_until"].endswith("Z")


# --- the planted gap, for real --------------------------------------------------------------------
def _env(bootstrap: str, data: Path) -> dict[str, str]:
    tag = f"vg{uuid.uuid4().hex[:8]}"
    return {
        **os.environ,
        "TOKENAUDIT_DATA_DIR": str(data),
        "TOKENAUDIT_KAFKA_BOOTSTRAP": bootstrap,
        "TOKENAUDIT_TOPIC_USAGE": f"{tag}-usage",
        "TOKENAUDIT_TOPIC_ROLLUPS": f"{tag}-rollups",
        "TOKENAUDIT_TOPIC_SAMPLED": f"{tag}-sampled",
        "TOKENAUDIT_TOPIC_ANOMALIES": f"{tag}-anomalies",
        "TOKENAUDIT_TOPIC_DLQ": f"{tag}-dlq",
        "TOKENAUDIT_WORKER_ID": f"{tag}-worker",
        "TOKENAUDIT_SINK_GROUP_ID": f"{tag}-sink",
        "TOKENAUDIT_KAFKA_PARTITIONS": "2",
        "TOKENAUDIT_WINDOW_SECONDS": "2",
        "TOKENAUDIT_GRACE_SECONDS": "1",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "1",
        "TOKENAUDIT_SINK_BATCH_SECONDS": "0.5",
        "TOKENAUDIT_USAGE_API_PORT": str(free_port()),
        "TOKENAUDIT_WORKER_WEB_PORT": str(free_port()),
        "TOKENAUDIT_SAMPLE_WARMUP": "1000000",
    }


class Procs:
    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.procs = env, logs, {}

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    def wait_http(self, name: str, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.procs[name].poll() is None, f"{name} exited:\n{self.tail(name)}"
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{name} not ready:\n{self.tail(name)}")

    def tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def verify(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        CLI + ["verify", "--since", "2025-06-15T09:00", "--until", "2025-06-15T13:00", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_verify(env, rc: int, timeout: float, *args) -> subprocess.CompletedProcess:
    """Run verify until it exits with ``rc`` with nothing pending (the pipeline gets there by
    itself, or the test fails)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = verify(env, *args)
        if (
            proc.returncode == rc and "pending" not in proc.stdout.replace('"pending": []', "")
        ) or time.monotonic() > deadline:
            return proc
        time.sleep(1.0)


def test_planted_gap_is_found_then_closed(kafka_bootstrap, tmp_path):
    env = _env(kafka_bootstrap, tmp_path / "data")
    settings = load_settings(
        **{
            k[len("TOKENAUDIT_") :].lower(): v
            for k, v in env.items()
            if k.startswith("TOKENAUDIT_") and k != "TOKENAUDIT_CONFIG"
        }
    )
    from tokenaudit.infra.keys import ensure_admin_key
    from tokenaudit.infra.topics import ensure_declared

    ensure_declared(settings)
    ensure_admin_key(settings)  # the CLI's key for the sink's admin route
    procs = Procs(env, tmp_path)
    api = f"http://127.0.0.1:{settings.usage_api_port}"
    try:
        procs.start("sink", CLI + ["sink"])
        procs.start("worker", [sys.executable, "-m", "tokenaudit.streams.app"])
        batch_a = synth.mixed_stream(3000, clients=20, models=2, start_ms=H10, span_ms=240_000, seed=3, late_share=0)
        synth.produce(kafka_bootstrap, settings.topic_usage, batch_a)
        procs.wait_http("sink", f"{api}/healthz")
        procs.wait_http("worker", f"http://127.0.0.1:{settings.worker_web_port}/metrics")
        ok = wait_verify(env, 0, 120)  # through the sink's admin route
        assert ok.returncode == 0, ok.stdout + ok.stderr + procs.tail("worker") + procs.tail("sink")
        assert "OK: ClickHouse holds every event on the topic, each once\n" in ok.stdout
        assert "3,000 distinct events" in ok.stdout and "checked window starts 2025-06-15T09:00:00Z" in ok.stdout

        procs.stop("sink")
        gap = [synth.event(f"gap-{i}", H10 + HOUR_MS + 1000 * i, "gap-client", "model-1") for i in range(40)]
        synth.produce(kafka_bootstrap, settings.topic_usage, gap)
        found = wait_verify(env, 1, 60, "--format", "json")  # the store opened directly: the sink is gone
        assert found.returncode == 1, found.stdout + found.stderr
        report = json.loads(found.stdout)
        assert not report["ok"] and report["checked_until"] == "2025-06-15T13:00:00Z"
        assert report["drift"] == [
            {
                "client_id": "gap-client",
                "model": "model-1",
                "hour": "2025-06-15T11:00:00Z",
                "what": "missing in ClickHouse",
                "topic": {"requests": 40, "input_tokens": 800, "output_tokens": 400, "total_tokens": 1200},
                "clickhouse": {"requests": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
            }
        ]
        table = verify(env)
        assert table.returncode == 1 and "gap-client" in table.stdout and "2025-06-15T11:00:00Z" in table.stdout
        assert "DRIFT in 1 bucket(s)" in table.stdout

        procs.start("sink", CLI + ["sink"])
        procs.wait_http("sink", f"{api}/healthz")
        closed = wait_verify(env, 0, 90)
        assert closed.returncode == 0, closed.stdout + closed.stderr
    finally:
        procs.close()


def test_a_range_the_topic_no_longer_retains_is_said_and_not_checked(kafka_bootstrap, topic_name, tmp_path):
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from tokenaudit.infra.kafka_admin import ensure_topics
    from tokenaudit.reports.verify import run_verify, scan_topic

    settings = load_settings(data_dir=tmp_path, kafka_bootstrap=kafka_bootstrap, topic_usage=topic_name)
    ensure_topics(kafka_bootstrap, {topic_name: 1})
    synth.produce(kafka_bootstrap, topic_name, [synth.event(f"r{i}", H10 + i, "c1") for i in range(10)])
    whole = scan_topic(settings, H10, H10 + HOUR_MS, arrived_before_ms=0)
    assert whole.retained_from_ms is None and whole.totals[("c1", "t5-tiny", H10)][0] == 10
    # retention deletes the oldest records (as time- or size-based retention does)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.delete_records([TopicPartition(topic_name, 0, 4)]).values():
        fut.result(10)
    cut = scan_topic(settings, H10, H10 + HOUR_MS, arrived_before_ms=0)
    assert cut.records == 6 and cut.retained_from_ms is not None and cut.retained_from_ms > H10
    # the records left were produced just now: nothing of 2025 can be checked, and it says so
    report = run_verify(settings, "2025-06-15T10:00", "2025-06-15T11:00")
    assert report.ok and report.buckets == 0 and report.drift == []
    assert any("no longer retains the start of the range" in note for note in report.notes)
