"""The worker's budget spend and alerts on the session broker: events of a budgeted client and of
a department spread over two partitions go in; spend records come out on the spend topic with
the right sums and offsets (the previous period's spend apart, the current one from zero); the
50/80/100% budget anomalies appear exactly once each, also across a worker restart within the
period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.support import synth
from tokenaudit.infra.budget_view import BudgetView
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import ANOMALY, BUDGET, EVENT, decode, encode
from tokenaudit.schemas.budgets import budget, budget_anomaly_id, budget_key, period_bounds
from tokenaudit.settings import load_settings
from tokenaudit.streams.app import ensure_worker_topics

pytestmark = [pytest.mark.timeout(240)]

PARTS = 4


def _period_seconds(now: float) -> int:
    """A period length whose current period has at least 5 minutes left (the test stays in it)."""
    return next(size for size in range(900, 3600) if size - now % size > 300)


def _env(bootstrap: str, tag: str, data_dir: Path, period: int) -> dict[str, str]:
    return {
        "TOKENAUDIT_KAFKA_BOOTSTRAP": bootstrap,
        "TOKENAUDIT_KAFKA_PARTITIONS": str(PARTS),
        **{f"TOKENAUDIT_TOPIC_{role.upper()}": f"{tag}-{role}" for role in _ROLES},
        "TOKENAUDIT_WORKER_ID": f"{tag}-worker",
        "TOKENAUDIT_WINDOW_SECONDS": "2",
        "TOKENAUDIT_GRACE_SECONDS": "1",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "1",
        "TOKENAUDIT_WORKER_SESSION_TIMEOUT": "6",
        "TOKENAUDIT_BUDGET_PERIOD_SECONDS": str(period),
        "TOKENAUDIT_SPEND_PUBLISH_SECONDS": "0.3",
        "TOKENAUDIT_DATA_DIR": str(data_dir),
    }


_ROLES = ("usage", "rollups", "sampled", "anomalies", "dlq", "budgets", "spend")


def _two_clients_on_two_partitions() -> tuple[str, str]:
    names = [f"bud-{i}" for i in range(50)]
    first = names[0]
    second = next(n for n in names if zlib.crc32(n.encode()) % PARTS != zlib.crc32(first.encode()) % PARTS)
    return first, second


class Budgeted:
    def __init__(self, bootstrap: str, tmp: Path) -> None:
        self.tag = f"b{uuid.uuid4().hex[:8]}"
        self.bootstrap, self.tmp = bootstrap, tmp
        self.period = _period_seconds(time.time())
        self.env = _env(bootstrap, self.tag, tmp / "data", self.period)
        self.settings = load_settings(**{k[len("TOKENAUDIT_") :].lower(): v for k, v in self.env.items()})
        ensure_worker_topics(self.settings)
        self.producer = Producer({"bootstrap.servers": bootstrap})
        self.view = BudgetView(self.settings, poll_seconds=0.1).start()
        self.proc: subprocess.Popen | None = None
        self.n = 0
        self.offsets: dict[int, int] = {}

    def start_worker(self) -> None:
        log = open(self.tmp / "worker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenaudit.streams.app"],
            env=dict(os.environ, **self.env, TOKENAUDIT_WORKER_WEB_PORT=str(free_port())),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_worker(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def set_budget(self, scope: str, scope_id: str, limit: int) -> None:
        record = budget(scope, scope_id, "tokens", limit, "day", True, int(time.time() * 1000))
        self.producer.produce(
            self.settings.topic_budgets, key=budget_key(scope, scope_id), value=encode(BUDGET, record)
        )
        self.producer.flush(10)

    def send(self, client: str, ts: int, count: int, dept: str = "bud-research") -> None:
        """``count`` events of 80 input + 20 output tokens, on the client's partition."""
        p = zlib.crc32(client.encode()) % PARTS

        def delivered(err, msg) -> None:
            assert err is None, err
            self.offsets[p] = max(self.offsets.get(p, -1), msg.offset())

        for _ in range(count):
            self.n += 1
            ev = synth.event(
                f"{self.tag}-{self.n}", ts + self.n, client, input_tokens=80, output_tokens=20, department=dept
            )
            value = encode(EVENT, ev)
            self.producer.produce(
                self.settings.topic_usage, key=client.encode(), value=value, partition=p, on_delivery=delivered
            )
        assert self.producer.flush(10) == 0

    def wait_spent(self, scope: str, scope_id: str, now_ms: int, tokens: int, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.view.spent(scope, scope_id, "day", now_ms)
            if got.tokens == tokens:
                return got
            assert self.proc is None or self.proc.poll() is None, self.log()
            time.sleep(0.2)
        raise AssertionError(f"{scope} {scope_id}: spent {got}, expected {tokens} tokens\n{self.log()}")

    def anomalies(self) -> list[dict]:
        topic = self.settings.topic_anomalies
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.tag}-read"})
        out: list[dict] = []
        for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high == low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            got = 0
            while got < high - low:
                msg = consumer.poll(1.0)
                if msg is not None and not msg.error():
                    got += 1
                    out.append(decode(msg.value(), ANOMALY))
        consumer.close()
        return [a for a in out if a["rule"] == "budget"]

    def wait_anomalies(self, expected: set[str], timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        got: list[dict] = []
        while time.monotonic() < deadline:
            got = self.anomalies()
            if {a["anomaly_id"] for a in got} >= expected:
                return got
            time.sleep(0.3)
        raise AssertionError(f"budget anomalies {got}, expected ids {expected}\n{self.log()}")

    def log(self) -> str:
        path = self.tmp / "worker.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        self.stop_worker()
        self.view.close()


@pytest.fixture
def budgeted(kafka_bootstrap, tmp_path):
    b = Budgeted(kafka_bootstrap, tmp_path)
    yield b
    b.close()


def test_spend_and_budget_alerts_exactly_once_across_a_restart(budgeted):
    b = budgeted
    alice, bob = _two_clients_on_two_partitions()
    b.set_budget("client", alice, 1000)
    b.set_budget("department", "bud-research", 2000)
    now = int(time.time() * 1000)
    start, end = period_bounds(now, "day", b.period)
    before = start - 1000 * b.period  # an event time in the previous period
    b.start_worker()

    # the previous period: 1000 tokens of alice, counted in that period only (no alert now)
    b.send(alice, before, 10)
    previous = b.wait_spent("client", alice, before, 1000)
    assert previous.period_start == start - b.period * 1000 and previous.events == 10

    # this period starts from zero: alice 600 (60%), bob 500; the department 1100 (55%)
    b.send(alice, start, 6)
    b.send(bob, start, 5)
    spent = b.wait_spent("client", alice, now, 600)
    pa, pb = (zlib.crc32(c.encode()) % PARTS for c in (alice, bob))
    assert (spent.period_start, spent.period_end, spent.events) == (start, end, 6)
    assert dict(spent.offsets)[pa] == b.offsets[pa]  # everything of the partition up to its last offset
    dept = b.wait_spent("department", "bud-research", now, 1100)
    assert dict(dept.offsets) == {pa: b.offsets[pa], pb: b.offsets[pb]}  # summed over both partitions
    first = {
        budget_anomaly_id("client", alice, start, 0.5),
        budget_anomaly_id("department", "bud-research", start, 0.5),
    }
    b.wait_anomalies(first)

    # a restart within the period: nothing raised again; then alice 1100 (110%), the department 1600 (80%)
    b.stop_worker()
    b.start_worker()
    b.send(alice, start + 10_000, 5)
    b.wait_spent("client", alice, now, 1100)
    b.wait_spent("department", "bud-research", now, 1600)
    expected = first | {
        budget_anomaly_id("client", alice, start, 0.8),
        budget_anomaly_id("client", alice, start, 1.0),
        budget_anomaly_id("department", "bud-research", start, 0.8),
    }
    # each exactly once: the worker awaits the delivery of each tick's alerts before the next
    # tick, so a level raised again after the restart would be on the topic before the new ones
    got = b.wait_anomalies(expected)
    assert Counter(a["anomaly_id"] for a in got) == dict.fromkeys(expected, 1), b.log()
    by_id = {a["anomaly_id"]: a for a in got}
    dept_full = by_id[budget_anomaly_id("department", "bud-research", start, 0.8)]
    window_start = int(dept_full["window_start"].timestamp() * 1000)  # decoded as timestamp-millis
    assert (dept_full["client_id"], dept_full["department"], window_start) == ("", "bud-research", start)
    assert (dept_full["observed"], dept_full["threshold"]) == (1600.0, 1600.0)
    alice_full = by_id[budget_anomaly_id("client", alice, start, 1.0)]
    assert (alice_full["client_id"], alice_full["observed"], alice_full["threshold"]) == (alice, 1100.0, 1000.0)
    assert alice_full["severity"] == "critical"
