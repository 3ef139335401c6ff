"""Launcher for one real local Apache Kafka 4.x node (KRaft, a combined broker+controller
process): a whole single-node cluster, or one node of a cluster of N
(:mod:`tokenaudit.infra.kafka_cluster`, which `tokenaudit kafka start|stop|status`, `up` and
the test suite's session fixture use).

Storage is formatted on a node's first start and kept across restarts; a node is ready once
it answers metadata and is listed in it (a node is listed once it has caught up and been
unfenced).

``--sasl``: the client listener is SASL_PLAINTEXT with SCRAM-SHA-512 only, with the SCRAM users
created at format time (``kafka-storage format --add-scram``); the controller listener stays
PLAINTEXT on the loopback address: KRaft cannot check SCRAM there (the credentials live in the
metadata that the controllers serve).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenaudit.errors import KafkaLaunchError
from tokenaudit.infra import kafka_install, procutil
from tokenaudit.infra.kafka_layout import SCRAM_MECHANISM, ScramUser, random_cluster_id, write_private


@dataclass(frozen=True)
class BrokerConfig:
    home: Path  # data dir of this node: storage, config, pid, logs
    cache_dir: Path  # where the jars are cached
    version: str = "4.4.0"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9192
    heap: str = "512m"
    partitions: int = 4
    start_timeout: float = 60.0
    node_id: int = 1
    quorum: str = ""  # controller.quorum.voters; "" = this node alone
    cluster_size: int = 1  # nodes in the cluster: replication of internal topics
    cluster_id: str = ""  # "" = a random one at format time
    sasl_broker: ScramUser | None = None  # set: SASL/SCRAM client listener, this inter-broker user
    scram_users: tuple[ScramUser, ...] = ()  # created at format time
    client_security: tuple[tuple[str, str], ...] = ()  # librdkafka settings the launcher's probes use

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_settings(cls, settings) -> BrokerConfig:
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
    out = subprocess.run([java, "-version"], check=False, capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    if not match or int(match.group(1)) < 17:
        raise KafkaLaunchError(f"Kafka 4.x needs Java 17+, but {java} reports: {out.splitlines()[0] if out else '?'}")
    return java


class KafkaBroker:
    """One broker+controller process (a whole single-node cluster, or one node of N)."""

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

    @property
    def node_id(self) -> int:
        return self.config.node_id

    def pid(self) -> int | None:
        return procutil.read_pid(self.pid_file)

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_ready(self, timeout: float = 2.0) -> bool:
        return broker_answers(self.bootstrap, timeout, dict(self.config.client_security), self.node_id)

    def start(self) -> bool:
        """Start and wait for metadata. Returns False if it was already running (no-op)."""
        proc = self.launch()
        if proc is None:
            if not self.wait_ready():
                raise KafkaLaunchError(f"broker pid {self.pid()} runs but does not answer on {self.bootstrap}")
            return False
        if not self.wait_ready(proc):
            self.abort(proc)
        return True

    def launch(self) -> subprocess.Popen | None:
        """Spawn the node without waiting for it (None if it runs already): a node of a
        cluster cannot become ready before a majority of the controller quorum is up."""
        if self.is_running():
            return None
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
            java,
            f"-Xmx{self.config.heap}",
            f"-Xms{self.config.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:TieredStopAtLevel=1" if _small_machine() else "-XX:+UseStringDeduplication",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.log_dir}",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(self.properties),
        ]
        return procutil.spawn_detached(cmd, self.log_dir / "stdout.log", self.pid_file, self.config.home)

    def abort(self, proc: subprocess.Popen) -> None:
        """Stop a node that did not become ready and raise with the tail of its log."""
        procutil.terminate(proc.pid, timeout=5)
        self.pid_file.unlink(missing_ok=True)
        raise KafkaLaunchError(
            f"Kafka node {self.node_id} did not become ready on {self.bootstrap} within "
            f"{self.config.start_timeout:.0f}s; log {self.log_dir / 'kafka.log'}:\n"
            + procutil.tail(self.log_dir / "kafka.log", 15)
            + "\n"
            + procutil.tail(self.log_dir / "stdout.log", 5)
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Graceful stop (SIGTERM, controlled shutdown). Returns False if it was not running."""
        return procutil.stop_recorded(self.pid_file, timeout)

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return "down"
        return f"running pid={pid} bootstrap={self.bootstrap}" if self.is_ready() else f"starting pid={pid}"

    # --- internals ---------------------------------------------------------------------------
    def _write_properties(self) -> None:
        c = self.config
        replicas = str(min(3, c.cluster_size))
        min_isr = "2" if c.cluster_size >= 3 else "1"
        client = "SASL_PLAINTEXT" if c.sasl_broker else "PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(c.node_id),
            "controller.quorum.voters": c.quorum or f"{c.node_id}@{c.host}:{c.controller_port}",
            "listeners": f"{client}://{c.host}:{c.port},CONTROLLER://{c.host}:{c.controller_port}",
            "advertised.listeners": f"{client}://{c.host}:{c.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": client,
            "listener.security.protocol.map": f"{client}:{client},CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.storage),
            "num.partitions": str(c.partitions),
            # Topics created by anything but the project's declaration (auto-creation) get the
            # same replication rule as tokenaudit.infra.topics: min(3, nodes), min ISR 2 from 3.
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "unclean.leader.election.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 << 20),
        }
        if c.sasl_broker:
            props.update(
                {
                    "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                    "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
                    f"listener.name.sasl_plaintext.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required "
                    f'username="{c.sasl_broker.username}" password="{c.sasl_broker.password}";',
                }
            )
        write_private(self.properties, "".join(f"{k}={v}\n" for k, v in props.items()))

    def _format(self, java: str, classpath: str) -> None:
        cluster_id = self.config.cluster_id or random_cluster_id()
        scram = [
            arg
            for user in self.config.scram_users
            for arg in ("--add-scram", f"{SCRAM_MECHANISM}=[name={user.username},password={user.password}]")
        ]
        proc = subprocess.run(
            [
                java,
                "-Xmx256m",
                f"-Dlog4j2.configurationFile={self.config.home / 'log4j2.yaml'}",
                f"-Dkafka.logs.dir={self.log_dir}",
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(self.properties),
                *scram,
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()[-500:]
            for user in self.config.scram_users:  # never echo a password
                detail = detail.replace(user.password, "***")
            raise KafkaLaunchError(f"formatting Kafka storage failed: {detail}")

    def wait_ready(self, proc: subprocess.Popen | None = None, deadline: float | None = None) -> bool:
        deadline = deadline or time.monotonic() + self.config.start_timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            if self.is_ready(timeout=1.0):
                return True
            time.sleep(0.3)
        return False


def broker_answers(
    bootstrap: str, timeout: float = 2.0, security: dict[str, str] | None = None, node_id: int | None = None
) -> bool:
    """True when the broker returns cluster metadata that lists brokers (and ``node_id``,
    if given: a node is listed only once it has caught up and been unfenced).

    ``security``: librdkafka settings from :mod:`tokenaudit.infra.kafka_clients`."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        {
            **(security or {}),
            "bootstrap.servers": bootstrap,
            "socket.connection.setup.timeout.ms": 1000,
            "log_level": 0,
            "logger": _quiet_logger(),
        }
    )
    try:
        md = admin.list_topics(timeout=timeout)
        return bool(md.brokers) and (node_id is None or node_id in md.brokers)
    except Exception:  # any KafkaException means "not ready yet"
        return False


def _quiet_logger():
    import logging

    logger = logging.getLogger("tokenaudit.kafka.probe")
    logger.setLevel(logging.CRITICAL)
    return logger


def _small_machine() -> bool:
    return (os.cpu_count() or 1) <= 2
