"""Loss-free publishing: the broker goes away under load, and the app is SIGKILLed with
events spooled. A broker of this module's own (stopped and restarted here), the app as a
real `tokenaudit serve` process, every event checked by request_id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.procutil import free_port
from tokenaudit.inference.testing import cached_model, decode_events, read_events
from tokenaudit.settings import load_settings

TOPIC = "token-usage"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    s = load_settings()
    b = KafkaBroker(BrokerConfig(home=tmp_path_factory.mktemp("kafka-outage"), cache_dir=s.cache_dir,
                                 version=s.kafka_version, port=free_port(), controller_port=free_port(), heap="384m"))
    b.start()
    ensure_topics(b.bootstrap, {TOPIC: 2})
    yield b
    b.stop()


class App:
    """`tokenaudit serve` in a subprocess with its own data dir (spool) and port."""

    def __init__(self, data_dir, bootstrap, model):
        self.port = free_port()
        self.readyz_seen: list[tuple[int, str | None]] = []
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TOKENAUDIT_DATA_DIR": str(data_dir), "TOKENAUDIT_KAFKA_BOOTSTRAP": bootstrap,
                    "TOKENAUDIT_MODEL": str(model), "TOKENAUDIT_XLA": "false", "TOKENAUDIT_HTTP_PORT": str(self.port),
                    "TOKENAUDIT_PRODUCER_MESSAGE_TIMEOUT_MS": "3000", "TOKENAUDIT_SPOOL_RETRY_SECONDS": "0.5",
                    "TOKENAUDIT_BATCH_MAX_WAIT_MS": "2", "TOKENAUDIT_TOPIC_USAGE": TOPIC}
        self.log = open(data_dir.parent / f"serve-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenaudit.infra.cli", "serve"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"app exited: {self.proc.returncode}"
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                self.readyz_seen.append((r.status_code, r.json().get("reason")))
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("app not ready")

    def metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=5).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}[name]

    def wait_metric(self, name, predicate, timeout=60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.metric(name)
            if predicate(value):
                return value
            time.sleep(0.3)
        raise TimeoutError(f"{name} = {self.metric(name)} never satisfied the condition")

    def generate(self, client, i) -> str:
        r = client.post(self.url + "/v1/generate", json={"prompt": f"event {i}", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def stop(self, sig=signal.SIGTERM) -> bool:
        """Signal the app; True when it shut down gracefully (uvicorn re-raises SIGTERM after a
        clean shutdown, so the exit status alone says little; the log says the rest)."""
        self.proc.send_signal(sig)
        self.proc.wait(60)
        self.log.close()
        log = open(self.log.name, "rb").read()
        return self.proc.returncode in (0, -signal.SIGTERM) and b"Application shutdown complete" in log


def _request_ids_on_topic(bootstrap, expect, timeout=90):
    return [e["request_id"] for e in decode_events(read_events(bootstrap, TOPIC, expect=expect, timeout=timeout))]


@pytest.fixture(scope="module")
def model():
    return cached_model("t5", load_settings().cache_dir)


def test_broker_stopped_mid_load_every_request_succeeds_and_every_event_arrives(broker, model, tmp_path):
    app = App(tmp_path / "data", broker.bootstrap, model).wait_ready()
    assert (503, "model is loading") in app.readyz_seen, "/readyz says 503 until the model is loaded"
    ids: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                try:
                    ids.append(app.generate(client, i))
                except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(exc)
                i += 1
                time.sleep(0.02)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1.5)
        before_outage = len(ids)
        broker.stop()
        app.wait_metric("tokenaudit_events_spooled_total", lambda v: v >= 5, timeout=60)
        assert app.metric("tokenaudit_producer_spooling") == 1
        during = len(ids)
        broker.start()
        time.sleep(1.5)
    finally:
        stop.set()
        worker.join(60)
    assert not errors, errors[:3]
    assert before_outage > 0 and during > before_outage and len(ids) > during
    app.wait_metric("tokenaudit_producer_spooling", lambda v: v == 0, timeout=60)
    replayed = app.metric("tokenaudit_events_replayed_total")
    assert replayed >= app.metric("tokenaudit_events_spooled_total") > 0
    assert app.metric("tokenaudit_events_dropped_total") == 0
    assert app.stop()
    seen = _request_ids_on_topic(broker.bootstrap, expect=len(ids))
    assert set(ids) <= set(seen), f"{len(set(ids) - set(seen))} events lost"
    assert not list((tmp_path / "data" / "spool").glob("*.spool")), "the spool is empty after replay"


def test_sigkill_with_events_spooled_then_restart_delivers_them(broker, model, tmp_path):
    data = tmp_path / "data"
    app = App(data, broker.bootstrap, model).wait_ready()
    broker.stop()
    with httpx.Client(timeout=30) as client:
        ids = [app.generate(client, i) for i in range(12)]
    app.wait_metric("tokenaudit_events_spooled_total", lambda v: v == len(ids), timeout=60)
    assert not app.stop(signal.SIGKILL) and app.proc.returncode == -signal.SIGKILL
    assert list((data / "spool").glob("*.spool")), "spooled events are on disk"
    broker.start()
    restarted = App(data, broker.bootstrap, model).wait_ready()
    restarted.wait_metric("tokenaudit_events_replayed_total", lambda v: v >= len(ids), timeout=60)
    assert restarted.stop()
    seen = _request_ids_on_topic(broker.bootstrap, expect=len(ids))
    assert set(ids) <= set(seen), f"{len(set(ids) - set(seen))} events lost"
