"""The local Kafka of one data directory: a cluster of N broker+controller nodes (KRaft),
started and stopped together.

A cluster of N has an N-voter controller quorum (static ``controller.quorum.voters``), node i
(from 1) listening for clients on ``port + i - 1`` and for its controller on
``controller_port + i - 1``. Used by `tokenaudit kafka start|stop|status [--brokers N]
[--sasl]` and by `tokenaudit up`. `start` launches only the nodes that are not running and
returns once every node answers metadata and is listed in it.

The cluster's shape (number of nodes, SASL or not, cluster id) is recorded in
``<home>/cluster.json`` when it is first formatted (:mod:`tokenaudit.infra.kafka_layout`), so
later starts, stops and every client of this data directory agree on it; a request for
another shape is refused instead of silently starting a different cluster over the old data.

``--sasl``: two SCRAM users are created at format time: ``broker`` for inter-broker traffic
and ``tokenaudit`` for the project's clients; their random passwords are kept in
``<home>/credentials.json`` (mode 0600), where :mod:`tokenaudit.infra.kafka_clients` finds them
when the settings name the local cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tokenaudit.errors import KafkaLaunchError
from tokenaudit.infra import procutil
from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.kafka_clients import local_cluster_security
from tokenaudit.infra.kafka_layout import (
    BROKER_USER,
    CLIENT_USER,
    CREDENTIALS_FILE,
    LAYOUT_FILE,
    SCRAM_MECHANISM,
    Layout,
    ScramUser,
    random_cluster_id,
    read_credentials,
    read_layout,
    write_private,
)


@dataclass(frozen=True)
class ClusterConfig:
    home: Path  # <data_dir>/kafka: the layout, credentials, one folder per node
    cache_dir: Path
    version: str = "4.4.0"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9192
    heap: str = "512m"
    partitions: int = 4
    start_timeout: float = 60.0
    brokers: int | None = None  # None: as recorded in the layout, else 1
    sasl: bool | None = None  # None: as recorded in the layout, else False

    @classmethod
    def from_settings(cls, settings, brokers: int | None = None, sasl: bool | None = None) -> ClusterConfig:
        return cls(
            home=settings.data_dir / "kafka",
            cache_dir=settings.cache_dir,
            version=settings.kafka_version,
            port=settings.kafka_port,
            controller_port=settings.kafka_controller_port,
            heap=settings.kafka_heap,
            partitions=settings.kafka_partitions,
            start_timeout=settings.kafka_start_timeout,
            brokers=brokers,
            sasl=sasl,
        )


@dataclass(frozen=True)
class NodeStatus:
    node_id: int
    address: str
    controller: str
    state: str  # running | starting | down
    pid: int | None


def check_port_ranges(port: int, controller_port: int, brokers: int) -> None:
    """Refuse client and controller port ranges that overlap or leave the port space."""
    clients = range(port, port + brokers)
    controllers = range(controller_port, controller_port + brokers)
    if max(clients[-1], controllers[-1]) > 65535:
        raise KafkaLaunchError(
            f"{brokers} brokers need ports up to {max(clients[-1], controllers[-1])}, above 65535: "
            "lower TOKENAUDIT_KAFKA_PORT / TOKENAUDIT_KAFKA_CONTROLLER_PORT"
        )
    if set(clients) & set(controllers):
        raise KafkaLaunchError(
            f"for {brokers} broker(s) the client ports {_span(clients)} (TOKENAUDIT_KAFKA_PORT={port}) and the "
            f"controller ports {_span(controllers)} (TOKENAUDIT_KAFKA_CONTROLLER_PORT={controller_port}) overlap: "
            f"set TOKENAUDIT_KAFKA_CONTROLLER_PORT to {clients[-1] + 1} or more, or below {port - brokers + 1}"
        )


def _node_home(home: Path, size: int, node_id: int) -> Path:
    return home if size == 1 else home / f"broker-{node_id}"


def _formatted(home: Path, layout: Layout) -> bool:
    return any(
        (_node_home(home, layout.brokers, i) / "storage" / "meta.properties").exists()
        for i in range(1, layout.brokers + 1)
    )


def _shape(brokers: int, sasl: bool) -> str:
    return f"{brokers} broker{'s' if brokers != 1 else ''}{' with SASL' if sasl else ''}"


def _span(ports: range) -> str:
    return str(ports[0]) if len(ports) == 1 else f"{ports[0]}-{ports[-1]}"


class KafkaCluster:
    """The local Kafka of one data directory: N nodes, started and stopped together."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.home = config.home
        recorded = read_layout(self.home)
        if recorded is not None and not _formatted(self.home, recorded):
            recorded = None  # recorded by a start that failed before any storage was formatted
        if recorded is not None:
            asked = (config.brokers or recorded.brokers, recorded.sasl if config.sasl is None else config.sasl)
            if asked != (recorded.brokers, recorded.sasl):
                raise KafkaLaunchError(
                    f"the local Kafka in {self.home} was created as {_shape(recorded.brokers, recorded.sasl)}; it "
                    f"cannot become {_shape(*asked)} in place: start it as it is (omit --brokers/--sasl), or stop "
                    f"it and move {self.home} away (its topics are not migrated)"
                )
        self.layout = recorded or Layout(config.brokers or 1, bool(config.sasl), "")
        self.recorded = recorded is not None
        check_port_ranges(config.port, config.controller_port, self.layout.brokers)

    # --- shape ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.layout.brokers

    @property
    def sasl(self) -> bool:
        return self.layout.sasl

    def addresses(self) -> list[str]:
        return [f"{self.config.host}:{self.config.port + i}" for i in range(self.size)]

    @property
    def bootstrap(self) -> str:
        return ",".join(self.addresses())

    def credentials(self) -> dict[str, ScramUser] | None:
        return read_credentials(self.home) if self.sasl else None

    def client_security(self) -> dict[str, str]:
        """librdkafka settings for a client of this cluster (the launcher's own probes)."""
        return local_cluster_security(self.credentials()).librdkafka()

    def nodes(self) -> list[KafkaBroker]:
        c = self.config
        users = self.credentials() if self.sasl and self.recorded else None
        if self.sasl and self.recorded and users is None:
            raise KafkaLaunchError(
                f"{self.home / CREDENTIALS_FILE} is missing, but the local Kafka in {self.home} "
                "was created with SASL: restore it, or move the folder away and start afresh"
            )
        quorum = ",".join(f"{i + 1}@{c.host}:{c.controller_port + i}" for i in range(self.size))
        security = tuple(sorted(self.client_security().items())) if users else ()
        return [
            KafkaBroker(
                BrokerConfig(
                    home=_node_home(self.home, self.size, i + 1),
                    cache_dir=c.cache_dir,
                    version=c.version,
                    host=c.host,
                    port=c.port + i,
                    controller_port=c.controller_port + i,
                    heap=c.heap,
                    partitions=c.partitions,
                    start_timeout=c.start_timeout,
                    node_id=i + 1,
                    quorum=quorum,
                    cluster_size=self.size,
                    cluster_id=self.layout.cluster_id,
                    sasl_broker=users["broker"] if users else None,
                    scram_users=tuple(users.values()) if users else (),
                    client_security=security,
                )
            )
            for i in range(self.size)
        ]

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> list[int]:
        """Start the nodes that are not running and wait until every node is ready.
        Returns the ids of the nodes this call started (empty: all were running)."""
        self._record()
        nodes = self.nodes()
        launched: list[tuple[KafkaBroker, subprocess.Popen]] = []
        try:
            for node in nodes:
                proc = node.launch()
                if proc is not None:
                    launched.append((node, proc))
        except Exception:
            for node, proc in launched:
                procutil.terminate(proc.pid, timeout=5)
                node.pid_file.unlink(missing_ok=True)
            raise
        deadline = time.monotonic() + self.config.start_timeout
        for node in nodes:
            proc = next((p for n, p in launched if n is node), None)
            if node.wait_ready(proc, deadline):
                continue
            for other, other_proc in launched:  # a half-started cluster is worse than none
                if other is not node:
                    procutil.terminate(other_proc.pid, timeout=5)
                    other.pid_file.unlink(missing_ok=True)
            if proc is None:
                raise KafkaLaunchError(
                    f"Kafka node {node.node_id} (pid {node.pid()}) runs but does not answer on "
                    f"{node.bootstrap}; see {node.log_dir / 'kafka.log'}"
                )
            node.abort(proc)
        return [node.node_id for node, _ in launched]

    def _record(self) -> None:
        """Write the layout (and, for SASL, fresh credentials) before the first format."""
        if self.recorded:
            return
        self.home.mkdir(parents=True, exist_ok=True)
        self.layout = Layout(self.layout.brokers, self.layout.sasl, random_cluster_id())
        if self.layout.sasl:
            users = {
                "broker": {"username": BROKER_USER, "password": secrets.token_urlsafe(24)},
                "client": {"username": CLIENT_USER, "password": secrets.token_urlsafe(24)},
            }
            write_private(
                self.home / CREDENTIALS_FILE,
                json.dumps({"mechanism": SCRAM_MECHANISM, "users": users}, indent=2) + "\n",
            )
        (self.home / LAYOUT_FILE).write_text(
            json.dumps(
                {"brokers": self.layout.brokers, "sasl": self.layout.sasl, "cluster_id": self.layout.cluster_id},
                indent=2,
            )
            + "\n"
        )
        self.recorded = True

    def stop(self, timeout: float = 30.0) -> int:
        """Stop every running node (SIGTERM to all at once: a node stopped alone while the
        others wait would lose the controller quorum under the last ones). Returns how many."""
        running = [(node, pid) for node in self.nodes() if (pid := node.pid()) is not None]
        for _, pid in running:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for node, pid in running:
            # waits for the SIGTERM above (a second one changes nothing), SIGKILL at the deadline
            procutil.terminate(pid, timeout=max(0.0, deadline - time.monotonic()))
            node.pid_file.unlink(missing_ok=True)
        return len(running)

    def status(self) -> list[NodeStatus]:
        out = []
        for node in self.nodes():
            pid = node.pid()
            state = "down" if pid is None else ("running" if node.is_ready() else "starting")
            out.append(
                NodeStatus(
                    node.node_id, node.bootstrap, f"{node.config.host}:{node.config.controller_port}", state, pid
                )
            )
        return out

    def node(self, node_id: int) -> KafkaBroker:
        return self.nodes()[node_id - 1]
