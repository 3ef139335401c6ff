"""Launcher for a real single-node Apache Kafka 4.x broker (KRaft broker+controller).

Used by `tokenaudit kafka start|stop|status`, by `tokenaudit up`, and by the test suite's
session fixture (on free ports in a temp dir). Storage is formatted on first start and kept
across restarts; `start` returns only once the broker answers metadata requests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenaudit.infra import kafka_install, procutil


class KafkaLaunchError(RuntimeError):
    """The broker could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class BrokerConfig:
    home: Path                 # data dir of this broker: storage, config, pid, logs
    cache_dir: Path            # where the jars are cached
    version: str = "4.4.0"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9093
    heap: str = "512m"
    partitions: int = 4
    start_timeout: float = 60.0

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_settings(cls, settings) -> "BrokerConfig":
        return cls(
            home=settings.data_dir / "kafka",
            cache_dir=settings.cache_dir,
            version=settings.kafka_version,
            port=settings.kafka_port,
            controller_port=settings.kafka_controller_port,
            heap=settings.kafka_heap,
            partitions=settings.kafka_partitions,
            start_timeout=settings.kafka_start_timeout,
        )


def find_java() -> str:
    """Path of a Java >= 17 runtime (JAVA_HOME first), or a one-line error."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise KafkaLaunchError(
            "Java 17+ not found: install a JRE (apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    if not match or int(match.group(1)) < 17:
        raise KafkaLaunchError(f"Kafka 4.x needs Java 17+, but {java} reports: {out.splitlines()[0] if out else '?'}")
    return java


class KafkaBroker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.storage = config.home / "storage"
        self.pid_file = config.home / "kafka.pid"
        self.log_dir = config.home / "logs"
        self.properties = config.home / "server.properties"

    # --- public API -------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return self.config.bootstrap

    def pid(self) -> int | None:
        return procutil.read_pid(self.pid_file)

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_ready(self, timeout: float = 2.0) -> bool:
        return broker_answers(self.bootstrap, timeout)

    def start(self) -> bool:
        """Start and wait for metadata. Returns False if it was already running (no-op)."""
        if self.is_running():
            if not self._wait_ready():
                raise KafkaLaunchError(f"broker pid {self.pid()} runs but does not answer on {self.bootstrap}")
            return False
        java = find_java()
        for port in (self.config.port, self.config.controller_port):
            if procutil.port_in_use(self.config.host, port):
                raise KafkaLaunchError(
                    f"port {port} on {self.config.host} is already in use by another process: stop it or "
                    "choose other ports (TOKENAUDIT_KAFKA_PORT / TOKENAUDIT_KAFKA_CONTROLLER_PORT)"
                )
        libs = kafka_install.install(self.config.cache_dir, self.config.version)
        self.config.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_properties()
        log4j = self.config.home / "log4j2.yaml"
        log4j.write_text(resources.files("tokenaudit.infra").joinpath("kafka/log4j2.yaml").read_text())
        classpath = f"{libs}/*"
        if not (self.storage / "meta.properties").exists():
            self._format(java, classpath)
        cmd = [
            java, f"-Xmx{self.config.heap}", f"-Xms{self.config.heap}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
            "-XX:TieredStopAtLevel=1" if _small_machine() else "-XX:+UseStringDeduplication",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.log_dir}",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp", classpath, "kafka.Kafka", str(self.properties),
        ]
        out = open(self.log_dir / "stdout.log", "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.config.home)
        out.close()
        self.pid_file.write_text(str(proc.pid))
        if not self._wait_ready(proc):
            procutil.terminate(proc.pid, timeout=5)
            self.pid_file.unlink(missing_ok=True)
            raise KafkaLaunchError(
                f"Kafka did not become ready on {self.bootstrap} within {self.config.start_timeout:.0f}s; "
                f"log {self.log_dir / 'kafka.log'}:\n" + procutil.tail(self.log_dir / "kafka.log", 15)
                + "\n" + procutil.tail(self.log_dir / "stdout.log", 5)
            )
        return True

    def stop(self, timeout: float = 30.0) -> bool:
        """Graceful stop (SIGTERM, controlled shutdown). Returns False if it was not running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        procutil.terminate(pid, timeout=timeout)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return "down"
        return f"running pid={pid} bootstrap={self.bootstrap}" if self.is_ready() else f"starting pid={pid}"

    # --- internals ---------------------------------------------------------------------------
    def _write_properties(self) -> None:
        c = self.config
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{c.host}:{c.controller_port}",
            "listeners": f"PLAINTEXT://{c.host}:{c.port},CONTROLLER://{c.host}:{c.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{c.host}:{c.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.storage),
            "num.partitions": str(c.partitions),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 << 20),
        }
        self.properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _format(self, java: str, classpath: str) -> None:
        cluster_id = _random_cluster_id()
        proc = subprocess.run(
            [java, "-Xmx256m", f"-Dlog4j2.configurationFile={self.config.home / 'log4j2.yaml'}",
             f"-Dkafka.logs.dir={self.log_dir}", "-cp", classpath, "kafka.tools.StorageTool",
             "format", "-t", cluster_id, "-c", str(self.properties)],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise KafkaLaunchError(f"formatting Kafka storage failed: {(proc.stderr or proc.stdout).strip()[-500:]}")

    def _wait_ready(self, proc: subprocess.Popen | None = None) -> bool:
        deadline = time.monotonic() + self.config.start_timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            if broker_answers(self.bootstrap, timeout=1.0):
                return True
            time.sleep(0.3)
        return False


def broker_answers(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the broker returns cluster metadata (brokers listed)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000,
                         "log_level": 0, "logger": _quiet_logger()})
    try:
        md = admin.list_topics(timeout=timeout)
        return bool(md.brokers)
    except Exception:  # any KafkaException means "not ready yet"
        return False


def _quiet_logger():
    import logging

    logger = logging.getLogger("tokenaudit.kafka.probe")
    logger.setLevel(logging.CRITICAL)
    return logger


def _random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, url-safe base64 without padding (what `random-uuid` prints)."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _small_machine() -> bool:
    return (os.cpu_count() or 1) <= 2
