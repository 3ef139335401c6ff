"""`anomalies --follow` against a real Kafka broker, and the webhook forwarder against a
local HTTP endpoint that is down for a while: nothing is lost, offsets commit after delivery."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer, TopicPartition

from tokenaudit.cli import main
from tokenaudit.infra.kafka_admin import ensure_topics
from tokenaudit.infra.procutil import free_port
from tokenaudit.reports.anomaly_follow import follow
from tokenaudit.reports.webhook import WebhookError, WebhookForwarder, WebhookRejected, anomaly_json
from tokenaudit.schemas import ANOMALY, encode
from tokenaudit.settings import get_settings


def planted(i: int = 0) -> dict:
    return {
        "anomaly_id": f"spike:acme:{uuid.uuid4().hex[:8]}",
        "ts": datetime(2026, 11, 28, 12, 0, i, 250000, tzinfo=UTC),
        "client_id": "acme-batch",
        "department": "research",
        "model": "t5-tiny",
        "rule": "spike",
        "severity": "critical",
        "observed": 91234.0,
        "threshold": 12000.0,
        "window_start": datetime(2026, 11, 28, 11, 59, tzinfo=UTC),
        "request_id": None,
        "message": "tokens 7.6x the client's baseline",
    }


def produce(bootstrap: str, topic: str, values: list[bytes], key: bytes = b"acme-batch") -> None:
    ensure_topics(bootstrap, {topic: 1})
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for value in values:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(20) == 0


def committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return consumer.committed([TopicPartition(topic, 0)], timeout=20)[0].offset
    finally:
        consumer.close()


def test_cli_follow_prints_a_planted_anomaly(kafka_bootstrap, topic_name, data_dir, monkeypatch):
    anomaly = planted()
    # an undecodable message first: reported and skipped, not fatal
    produce(kafka_bootstrap, topic_name, [b"not avro", encode(ANOMALY, anomaly)])
    group = f"g-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TOKENAUDIT_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("TOKENAUDIT_TOPIC_ANOMALIES", topic_name)
    get_settings.cache_clear()
    result = CliRunner().invoke(
        main,
        ["anomalies", "--follow", "--from-beginning", "--group", group, "--max-messages", "1", "--format", "json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in lines] == [anomaly_json(anomaly)]
    assert "skipping undecodable message" in result.output
    assert committed(kafka_bootstrap, group, topic_name) == 2


class Hook(BaseHTTPRequestHandler):
    received: ClassVar[list] = []  # shared by the handler instances of one server
    statuses: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.received.append((self.headers["Idempotency-Key"], json.loads(body)))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


def serve_hook(port: int, statuses=()) -> ThreadingHTTPServer:
    handler = type("H", (Hook,), {"received": [], "statuses": list(statuses)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_webhook_delivers_after_the_endpoint_was_down(kafka_bootstrap, topic_name):
    anomaly = planted(1)
    produce(kafka_bootstrap, topic_name, [encode(ANOMALY, anomaly)])
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    group = f"g-{uuid.uuid4().hex[:8]}"

    # 1. the endpoint is down and this forwarder gives up: the offset is not committed
    quick = WebhookForwarder(url, timeout=1, backoff_max=0.3, give_up_after=1.5)
    with pytest.raises(WebhookError, match="gave up"):
        follow(kafka_bootstrap, topic_name, group, quick.deliver, from_beginning=True, max_messages=1)
    assert committed(kafka_bootstrap, group, topic_name) < 0  # nothing committed for the group

    # 2. a new forwarder in the same group retries while the endpoint is still down...
    failures = []
    patient = WebhookForwarder(url, timeout=1, backoff_max=0.3, on_retry=lambda n, why: failures.append(why))
    done = {}
    thread = threading.Thread(
        target=lambda: done.update(
            n=follow(kafka_bootstrap, topic_name, group, patient.deliver, from_beginning=True, max_messages=1)
        )
    )
    thread.start()
    deadline = time.monotonic() + 60
    while len(failures) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(failures) >= 3 and thread.is_alive()
    # ... and delivers once it comes up (first answer a 503, which is retried too)
    server = serve_hook(port, statuses=[503])
    try:
        thread.join(60)
        assert not thread.is_alive() and done["n"] == 1
        assert server.RequestHandlerClass.received == [(anomaly["anomaly_id"], anomaly_json(anomaly))]
    finally:
        server.shutdown()
        server.server_close()
    assert committed(kafka_bootstrap, group, topic_name) == 1


def test_webhook_rejection_is_not_retried():
    port = free_port()
    server = serve_hook(port, statuses=[422])
    try:
        with pytest.raises(WebhookRejected, match="HTTP 422"):
            WebhookForwarder(f"http://127.0.0.1:{port}/").deliver(planted())
        assert WebhookForwarder(f"http://127.0.0.1:{port}/").deliver(planted()) == 1
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(WebhookError, match="expected an http"):
        WebhookForwarder("ftp://example/x")
