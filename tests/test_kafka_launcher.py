"""The project's own broker launcher against a real Kafka process."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from confluent_kafka import Consumer, Producer

from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker, KafkaLaunchError
from tokenaudit.infra.kafka_install import KafkaInstallError, install
from tokenaudit.infra.procutil import free_port, pid_alive
from tokenaudit.settings import load_settings


def _broker(home) -> KafkaBroker:
    s = load_settings()
    return KafkaBroker(
        BrokerConfig(
            home=home,
            cache_dir=s.cache_dir,
            version=s.kafka_version,
            port=free_port(),
            controller_port=free_port(),
            heap="384m",
        )
    )


@pytest.mark.broker  # starts its own
def test_lifecycle_idempotent_start_and_data_kept_across_restart(tmp_path):
    broker = _broker(tmp_path / "k")
    assert broker.status() == "down"
    assert broker.start() is True
    pid = broker.pid()
    try:
        assert broker.status().startswith("running")
        assert broker.start() is False, "a second start must be a no-op"
        assert broker.pid() == pid

        producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
        producer.produce("kept", key=b"k", value=b"survives-restart")
        assert producer.flush(15) == 0

        assert broker.stop() is True
        assert not pid_alive(pid)
        assert broker.status() == "down"
        assert broker.stop() is False

        assert broker.start() is True
        consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "g", "auto.offset.reset": "earliest"})
        consumer.subscribe(["kept"])
        values = []
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                values.append(msg.value())
                break
        consumer.close()
        assert values == [b"survives-restart"]
    finally:
        broker.stop()


@pytest.mark.broker  # starts its own
def test_start_on_busy_port_fails_clearly(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        s = load_settings()
        broker = KafkaBroker(
            BrokerConfig(
                home=tmp_path / "k",
                cache_dir=s.cache_dir,
                version=s.kafka_version,
                port=busy,
                controller_port=free_port(),
            )
        )
        with pytest.raises(KafkaLaunchError, match=f"port {busy} .* already in use"):
            broker.start()
        assert broker.pid() is None


def test_missing_java_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-such-jdk"))
    with pytest.raises(KafkaLaunchError, match="Java 17\\+ not found"):
        _broker(tmp_path / "k").start()


def test_failed_download_fails_clearly(tmp_path):
    with pytest.raises(KafkaInstallError, match=r"could not fetch Apache Kafka 0\.0\.404"):
        install(tmp_path / "cache", "0.0.404")
    assert not (tmp_path / "cache" / "kafka-0.0.404" / "COMPLETE").exists()


def test_cli_status_when_down(tmp_path):
    env = {
        "TOKENAUDIT_DATA_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "TOKENAUDIT_KAFKA_PORT": str(free_port()),
        "TOKENAUDIT_KAFKA_CONTROLLER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tokenaudit.cli", "kafka", "status"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 3
    assert "kafka is down" in proc.stdout
