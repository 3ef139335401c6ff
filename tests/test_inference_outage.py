"""The publisher and its spool under real faults: a broker frozen (SIGSTOP) and stopped under
load, a full filesystem (a small tmpfs as the spool), a second app on the same spool, the app
SIGKILLed with events spooled and again during a replay, a torn spool tail and a flipped byte.

A broker of this module's own (frozen, stopped and restarted here), the app as a real
`tokenaudit serve` process with the tiny T5 model. Every request's event is checked by
request_id: on the topic (every copy with the same event_id) or counted as dropped in
/metrics, never neither. Scenarios share an app where the story stays clear (an app start
costs seconds)."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import string
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from tests.support.apps import cached_model, decode_events, read_events
from tokenaudit.inference.audit import AuditContext
from tokenaudit.inference.spool import Spool
from tokenaudit.inference.spool_format import SpoolRecord, parse_segment
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import EVENT, decode, encode
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.broker, pytest.mark.model, pytest.mark.chaos]

TOPIC = "token-usage"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    s = load_settings()
    b = KafkaBroker(
        BrokerConfig(
            home=tmp_path_factory.mktemp("kafka-outage"),
            cache_dir=s.cache_dir,
            version=s.kafka_version,
            port=free_port(),
            controller_port=free_port(),
            heap="384m",
        )
    )
    b.start()
    ensure_topics(b.bootstrap, {TOPIC: 2})
    yield b
    b.stop()


@pytest.fixture(scope="module")
def model():
    return cached_model("t5", load_settings().cache_dir)


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap_apps():
    """A failing test must not leave its app processes running (they hold ports and spools)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


class App:
    """`tokenaudit serve` in a subprocess with its own data dir (spool) and port."""

    def __init__(self, data_dir: Path, bootstrap: str, model, topic: str = TOPIC, **env: str):
        self.port = free_port()
        self.readyz_seen: list[tuple[int, str | None]] = []
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TOKENAUDIT_DATA_DIR": str(data_dir),
            "TOKENAUDIT_KAFKA_BOOTSTRAP": bootstrap,
            "TOKENAUDIT_MODEL": str(model),
            "TOKENAUDIT_XLA": "false",
            "TOKENAUDIT_HTTP_PORT": str(self.port),
            "TOKENAUDIT_PRODUCER_MESSAGE_TIMEOUT_MS": "3000",
            "TOKENAUDIT_SPOOL_RETRY_SECONDS": "0.5",
            "TOKENAUDIT_BATCH_MAX_WAIT_MS": "2",
            "TOKENAUDIT_TOPIC_USAGE": topic,
            **env,
        }
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenaudit.cli", "serve"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        _started.append(self.proc)

    def ready(self) -> tuple[int, str | None]:
        r = httpx.get(self.url + "/readyz", timeout=5)
        return r.status_code, r.json().get("reason")

    def wait_ready(self, timeout=120.0) -> App:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"app exited: {self.proc.returncode}\n{self.log_text()[-3000:]}"
            try:
                self.readyz_seen.append(self.ready())
                if self.readyz_seen[-1][0] == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("app not ready")

    def wait_serving(self, timeout=120.0) -> App:
        """Up and answering, model perhaps still loading: enough for cheap requests and for the
        publisher (it starts before the model loads), and seconds sooner on a busy machine."""

        def serving():
            assert self.proc.poll() is None, f"app exited: {self.proc.returncode}\n{self.log_text()[-3000:]}"
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _await(serving, timeout, "app serving")
        return self

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=5).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def metric(self, name: str) -> float:
        return self.metrics()[name]

    def wait_metric(self, name, predicate, timeout=60.0) -> float:
        deadline = time.monotonic() + timeout
        while not predicate(value := self.metric(name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} = {value} never satisfied the condition")
            time.sleep(0.2)
        return value

    def generate(self, client: httpx.Client, i: int) -> str:
        """A request that runs the model."""
        r = client.post(self.url + "/v1/generate", json={"prompt": f"event {i}", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def models(self, client: httpx.Client) -> str:
        """A cheap audited request (no model run): enough of them fill a small disk quickly."""
        r = client.get(self.url + "/v1/models")
        assert r.status_code == 200, r.text
        return r.headers["x-request-id"]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM) -> bool:
        """Signal the app; True when it shut down gracefully (uvicorn re-raises SIGTERM after a
        clean shutdown, so the exit status alone says little; the log says the rest)."""
        self.proc.send_signal(sig)
        self.proc.wait(60)
        self.log.close()
        return self.proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log_text()


def _await(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not met within {timeout}s")


class Load:
    """Requests from background threads until stopped (model runs and cheap ones); every answer
    must be a 200; the request ids are kept."""

    def __init__(self, app: App):
        self.app = app
        self.ids: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(cheap,)) for cheap in (False, True)]

    def _run(self, cheap: bool) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                try:
                    self.ids.append(self.app.models(client) if cheap else self.app.generate(client, i))
                except BaseException as exc:
                    self.errors.append(exc)
                i += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


@contextlib.contextmanager
def frozen(broker: KafkaBroker):
    pid = broker.pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _events_by_request(bootstrap: str, topic: str, expect: int) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = collections.defaultdict(list)
    for e in decode_events(read_events(bootstrap, topic, expect=expect, timeout=90)):
        by_id[e["request_id"]].append(e)
    return by_id


def _assert_on_topic_or_counted(by_id: dict[str, list[dict]], ids: list[str], dropped: int) -> None:
    """Every request's event is on the topic (each copy with one event_id) or counted as dropped."""
    assert len(set(ids)) == len(ids)
    assert set(by_id) <= set(ids), "no event on the topic that no request made"
    missing = set(ids) - set(by_id)
    assert len(missing) == dropped, f"{len(missing)} events missing, {dropped} counted as dropped"
    for rid, copies in by_id.items():
        assert len({c["event_id"] for c in copies}) == 1, f"copies of {rid} differ in event_id"
    event_ids = [copies[0]["event_id"] for copies in by_id.values()]
    assert len(set(event_ids)) == len(event_ids), "two requests share an event_id"


def test_frozen_and_stopped_broker_full_disk_and_a_rival_app_lose_no_event_uncounted(
    broker, model, tmp_path, small_disk
):
    spool_dir = small_disk(tmp_path / "spool", "256k")
    app = App(tmp_path / "a", broker.bootstrap, model, TOKENAUDIT_SPOOL_DIR=str(spool_dir)).wait_ready()
    assert (503, "model is loading") in app.readyz_seen, "/readyz says 503 until the model is loaded"
    rival = App(tmp_path / "b", broker.bootstrap, model, TOKENAUDIT_SPOOL_DIR=str(spool_dir))
    with Load(app) as load:
        app.wait_metric("tokenaudit_events_produced_total", lambda v: v >= 5)
        # 1. the broker freezes: deliveries time out (the broker may still write them later)
        with frozen(broker):
            app.wait_metric("tokenaudit_events_failed_total", lambda v: v >= 1, timeout=30)
            app.wait_metric("tokenaudit_events_spooled_total", lambda v: v >= 5)
            assert app.metric("tokenaudit_producer_spooling") == 1
        app.wait_metric("tokenaudit_spool_bytes", lambda v: v == 0)
        # meanwhile a second app on the same spool directory was refused, naming the holder
        assert rival.proc.wait(120) == 3, "a refused start is a failure a supervisor sees"
        assert f"spool directory {spool_dir} is in use by another process (pid {app.proc.pid})" in rival.log_text()
        # 2. the broker stops; the spool's small disk fills up: events are counted as dropped,
        # every request still succeeds and /readyz says why the instance should get no traffic
        broker.stop()
        app.wait_metric("tokenaudit_spool_write_failures_total", lambda v: v >= 10)
        _status, reason = _await(lambda: (r := app.ready())[0] == 503 and r, 30, "readyz 503")
        assert "event spool unwritable" in reason and ("disk full" in reason or "No space" in reason)
        broker.start()
        app.wait_metric("tokenaudit_spool_bytes", lambda v: v == 0, timeout=90)
        _await(lambda: app.ready()[0] == 200, 30, "readyz 200 after the spool drained")
    assert not load.errors, load.errors[:3]
    app.wait_metric("tokenaudit_spool_bytes", lambda v: v == 0)
    app.wait_metric("tokenaudit_producer_queue_depth", lambda v: v == 0)
    m = app.metrics()
    assert m["tokenaudit_events_dropped_total"] == m["tokenaudit_spool_write_failures_total"] > 0
    assert m["tokenaudit_events_replayed_total"] > 0 and m["tokenaudit_spool_quarantined_total"] == 0
    assert app.stop()
    by_id = _events_by_request(
        broker.bootstrap, TOPIC, expect=len(load.ids) - int(m["tokenaudit_events_dropped_total"])
    )
    _assert_on_topic_or_counted(by_id, load.ids, int(m["tokenaudit_events_dropped_total"]))


LIMIT = 32 << 10  # max.message.bytes of the second test's topic: a replay batch fits, the oversized event not


def _raise_topic_limit(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    change = ConfigResource(
        "topic",
        topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", str(1 << 20), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for fut in admin.incremental_alter_configs([change]).values():
        fut.result(30)


def test_sigkill_torn_tail_flipped_byte_and_sigkill_during_replay_lose_no_event_uncounted(broker, model, tmp_path):
    topic = "token-usage-faults"
    ensure_topics(broker.bootstrap, {topic: 2}, configs={topic: {"max.message.bytes": str(LIMIT)}})
    data = tmp_path / "data"
    spool_dir = data / "spool"
    broker.stop()
    first = App(data, broker.bootstrap, model, topic).wait_serving()
    with httpx.Client(timeout=30) as client:
        ids = [first.models(client) for _ in range(30)]
    first.wait_metric("tokenaudit_events_spooled_total", lambda v: v == len(ids))
    assert not first.stop(signal.SIGKILL) and first.proc.returncode == -signal.SIGKILL

    # SIGKILL loses nothing written: whole records, and the spool's lock died with the process
    [segment] = spool_dir.glob("*.seg")
    raw = segment.read_bytes()
    records = list(parse_segment(raw))
    assert all(isinstance(r, SpoolRecord) for r in records) and len(records) == len(ids)
    # another client's event, left spooled, larger than the topic accepts (its own partition)
    assert zlib.crc32(b"big-1") % 2 != zlib.crc32(records[0].key) % 2
    ctx = AuditContext.new()
    ctx.client_id = "big-1"
    big = ctx.to_event("GET", "/nowhere", 404)  # paths are capped at 256 characters: grow another field
    big["error_type"] = "".join(random.Random(3).choices(string.ascii_letters, k=3 * LIMIT))
    leftover = Spool(spool_dir, 1 << 20)
    leftover.append(b"big-1", encode(EVENT, big))
    leftover.close()
    # a crash mid-write tore the last record; a bit flipped in the tenth
    flipped, torn = records[9], records[-1]
    damaged = bytearray(raw)
    damaged[flipped.end - 1] ^= 0x01
    segment.write_bytes(bytes(damaged[: torn.end - 20]))
    lost = {decode(r.value, EVENT)["request_id"] for r in (flipped, torn)}

    broker.start()
    second = App(data, broker.bootstrap, model, topic).wait_serving()
    # everything readable is delivered; the refused event is retried, round after round
    second.wait_metric("tokenaudit_events_replayed_total", lambda v: v == len(ids) - 2)
    second.wait_metric("tokenaudit_events_replay_failed_total", lambda v: v >= 2)
    m = second.metrics()
    assert (m["tokenaudit_spool_torn_tails_total"], m["tokenaudit_spool_quarantined_total"]) == (1, 1)
    assert m["tokenaudit_events_dropped_total"] == 2 and m["tokenaudit_spool_bytes"] > 0
    quarantine = b"".join(p.read_bytes() for p in (spool_dir / "quarantine").iterdir())
    assert all(rid.encode() in quarantine for rid in lost), "the lost records' bytes are kept"
    # the stuck segment is the last one: new events go straight to Kafka meanwhile
    assert m["tokenaudit_producer_spooling"] == 0
    with httpx.Client(timeout=30) as client:
        later = [second.models(client) for _ in range(5)]
    second.wait_metric("tokenaudit_events_produced_total", lambda v: v == len(later))
    assert not second.stop(signal.SIGKILL)  # in the middle of the replay

    _raise_topic_limit(broker.bootstrap, topic)
    third = App(data, broker.bootstrap, model, topic).wait_serving()
    third.wait_metric("tokenaudit_spool_bytes", lambda v: v == 0)
    m = third.metrics()
    assert m["tokenaudit_events_replayed_total"] == 1 and m["tokenaudit_events_dropped_total"] == 0
    assert third.stop()
    expected = [*ids, *later, big["request_id"]]
    by_id = _events_by_request(broker.bootstrap, topic, expect=len(expected) - len(lost))
    _assert_on_topic_or_counted(by_id, expected, dropped=len(lost))
    assert set(expected) - set(by_id) == lost
    assert all(len(copies) == 1 for copies in by_id.values()), "no record Kafka confirmed was sent again"
    assert not list(spool_dir.glob("*.seg")) and len(list((spool_dir / "quarantine").iterdir())) == 2
