"""Launcher for a real local Apache Kafka 4.x: one node, or a cluster of N (KRaft).

Every node is a combined broker+controller process; a cluster of N has an N-voter
controller quorum (static ``controller.quorum.voters``), node i (from 1) listening for
clients on ``port + i - 1`` and for its controller on ``controller_port + i - 1``.
Used by `tokenaudit kafka start|stop|status [--brokers N] [--sasl]`, by `tokenaudit up`,
and by the test suite's session fixture (one node on free ports in a temp dir).

Storage is formatted on a node's first start and kept across restarts; `start` launches
only the nodes that are not running and returns once every node answers metadata and is
listed in it (a node is listed once it has caught up and been unfenced).

The cluster's shape (number of nodes, SASL or not, cluster id) is recorded in
``<home>/cluster.json`` when it is first formatted, so later starts, stops and every client
of this data directory agree on it; a request for another shape is refused instead of
silently starting a different cluster over the old data.

``--sasl``: the client listener is SASL_PLAINTEXT with SCRAM-SHA-512 only. Two SCRAM users
are created at format time (``kafka-storage format --add-scram``): ``broker`` for
inter-broker traffic and ``tokenaudit`` for the project's clients; their random passwords
are kept in ``<home>/credentials.json`` (mode 0600), where
:mod:`tokenaudit.infra.kafka_clients` finds them when the settings name the local cluster.
The controller listener stays PLAINTEXT on the loopback address: KRaft cannot check SCRAM
there (the credentials live in the metadata that the controllers serve).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from tokenaudit.errors import KafkaLaunchError  # noqa: F401 (raised here, declared there)
from tokenaudit.infra import kafka_install, procutil

LAYOUT_FILE = "cluster.json"
CREDENTIALS_FILE = "credentials.json"
SCRAM_MECHANISM = "SCRAM-SHA-512"
CLIENT_USER = "tokenaudit"
BROKER_USER = "broker"


@dataclass(frozen=True)
class ScramUser:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Layout:
    """The shape of a local cluster, fixed when its storage is first formatted."""

    brokers: int
    sasl: bool
    cluster_id: str


def read_layout(home: Path) -> Layout | None:
    """The recorded shape of the local Kafka in ``home``, or None if none was formatted.

    A single broker formatted before layouts were recorded (storage in ``home/storage``)
    reads as one node without SASL."""
    try:
        raw = json.loads((home / LAYOUT_FILE).read_text())
        return Layout(int(raw["brokers"]), bool(raw["sasl"]), str(raw["cluster_id"]))
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        raise KafkaLaunchError(f"{home / LAYOUT_FILE} is unreadable ({exc}); restore or remove it") from None
    meta = home / "storage" / "meta.properties"
    if meta.is_file():
        found = re.search(r"^cluster\.id=(\S+)", meta.read_text(), re.M)
        return Layout(1, False, found.group(1) if found else "")
    return None


def read_credentials(home: Path) -> dict[str, ScramUser] | None:
    """The SCRAM users of a local --sasl cluster ({"client": ..., "broker": ...}), or None."""
    try:
        raw = json.loads((home / CREDENTIALS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KafkaLaunchError(f"{home / CREDENTIALS_FILE} is unreadable ({exc})") from None
    return {role: ScramUser(u["username"], u["password"]) for role, u in raw["users"].items()}


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it holds passwords), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class BrokerConfig:
    home: Path                 # data dir of this node: storage, config, pid, logs
    cache_dir: Path            # where the jars are cached
    version: str = "4.4.0"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9192
    heap: str = "512m"
    partitions: int = 4
    start_timeout: float = 60.0
    node_id: int = 1
    quorum: str = ""           # controller.quorum.voters; "" = this node alone
    cluster_size: int = 1      # nodes in the cluster: replication of internal topics
    cluster_id: str = ""       # "" = a random one at format time
    sasl_broker: ScramUser | None = None        # set: SASL/SCRAM client listener, this inter-broker user
    scram_users: tuple[ScramUser, ...] = ()     # created at format time
    client_security: tuple[tuple[str, str], ...] = ()  # librdkafka settings the launcher's probes use

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
        return proc

    def abort(self, proc: subprocess.Popen) -> None:
        """Stop a node that did not become ready and raise with the tail of its log."""
        procutil.terminate(proc.pid, timeout=5)
        self.pid_file.unlink(missing_ok=True)
        raise KafkaLaunchError(
            f"Kafka node {self.node_id} did not become ready on {self.bootstrap} within "
            f"{self.config.start_timeout:.0f}s; log {self.log_dir / 'kafka.log'}:\n"
            + procutil.tail(self.log_dir / "kafka.log", 15) + "\n" + procutil.tail(self.log_dir / "stdout.log", 5)
        )

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
            props.update({
                "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
                f"listener.name.sasl_plaintext.{SCRAM_MECHANISM.lower()}.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required "
                    f'username="{c.sasl_broker.username}" password="{c.sasl_broker.password}";',
            })
        _write_private(self.properties, "".join(f"{k}={v}\n" for k, v in props.items()))

    def _format(self, java: str, classpath: str) -> None:
        cluster_id = self.config.cluster_id or random_cluster_id()
        scram = [arg for user in self.config.scram_users
                 for arg in ("--add-scram", f"{SCRAM_MECHANISM}=[name={user.username},password={user.password}]")]
        proc = subprocess.run(
            [java, "-Xmx256m", f"-Dlog4j2.configurationFile={self.config.home / 'log4j2.yaml'}",
             f"-Dkafka.logs.dir={self.log_dir}", "-cp", classpath, "kafka.tools.StorageTool",
             "format", "-t", cluster_id, "-c", str(self.properties), *scram],
            capture_output=True, text=True,
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


# --- a local cluster of N nodes ----------------------------------------------------------------
@dataclass(frozen=True)
class ClusterConfig:
    home: Path                  # <data_dir>/kafka: the layout, credentials, one folder per node
    cache_dir: Path
    version: str = "4.4.0"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 9192
    heap: str = "512m"
    partitions: int = 4
    start_timeout: float = 60.0
    brokers: int | None = None  # None: as recorded in the layout, else 1
    sasl: bool | None = None    # None: as recorded in the layout, else False

    @classmethod
    def from_settings(cls, settings, brokers: int | None = None, sasl: bool | None = None) -> "ClusterConfig":
        return cls(home=settings.data_dir / "kafka", cache_dir=settings.cache_dir, version=settings.kafka_version,
                   port=settings.kafka_port, controller_port=settings.kafka_controller_port,
                   heap=settings.kafka_heap, partitions=settings.kafka_partitions,
                   start_timeout=settings.kafka_start_timeout, brokers=brokers, sasl=sasl)


@dataclass(frozen=True)
class NodeStatus:
    node_id: int
    address: str
    controller: str
    state: str          # running | starting | down
    pid: int | None


def check_port_ranges(port: int, controller_port: int, brokers: int) -> None:
    """Refuse client and controller port ranges that overlap or leave the port space."""
    clients = range(port, port + brokers)
    controllers = range(controller_port, controller_port + brokers)
    if max(clients[-1], controllers[-1]) > 65535:
        raise KafkaLaunchError(f"{brokers} brokers need ports up to {max(clients[-1], controllers[-1])}, above 65535: "
                               "lower TOKENAUDIT_KAFKA_PORT / TOKENAUDIT_KAFKA_CONTROLLER_PORT")
    if set(clients) & set(controllers):
        raise KafkaLaunchError(
            f"for {brokers} broker(s) the client ports {_span(clients)} (TOKENAUDIT_KAFKA_PORT={port}) and the "
            f"controller ports {_span(controllers)} (TOKENAUDIT_KAFKA_CONTROLLER_PORT={controller_port}) overlap: "
            f"set TOKENAUDIT_KAFKA_CONTROLLER_PORT to {clients[-1] + 1} or more, or below {port - brokers + 1}")


def _node_home(home: Path, size: int, node_id: int) -> Path:
    return home if size == 1 else home / f"broker-{node_id}"


def _formatted(home: Path, layout: Layout) -> bool:
    return any((_node_home(home, layout.brokers, i) / "storage" / "meta.properties").exists()
               for i in range(1, layout.brokers + 1))


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
                    f"it and move {self.home} away (its topics are not migrated)")
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
        from tokenaudit.infra.kafka_clients import local_cluster_security

        return local_cluster_security(self.credentials()).librdkafka()

    def nodes(self) -> list[KafkaBroker]:
        c = self.config
        users = self.credentials() if self.sasl and self.recorded else None
        if self.sasl and self.recorded and users is None:
            raise KafkaLaunchError(f"{self.home / CREDENTIALS_FILE} is missing, but the local Kafka in {self.home} "
                                   "was created with SASL: restore it, or move the folder away and start afresh")
        quorum = ",".join(f"{i + 1}@{c.host}:{c.controller_port + i}" for i in range(self.size))
        security = tuple(sorted(self.client_security().items())) if users else ()
        return [KafkaBroker(BrokerConfig(
            home=_node_home(self.home, self.size, i + 1),
            cache_dir=c.cache_dir, version=c.version, host=c.host, port=c.port + i,
            controller_port=c.controller_port + i, heap=c.heap, partitions=c.partitions,
            start_timeout=c.start_timeout, node_id=i + 1, quorum=quorum, cluster_size=self.size,
            cluster_id=self.layout.cluster_id, sasl_broker=users["broker"] if users else None,
            scram_users=tuple(users.values()) if users else (), client_security=security,
        )) for i in range(self.size)]

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
                raise KafkaLaunchError(f"Kafka node {node.node_id} (pid {node.pid()}) runs but does not answer on "
                                       f"{node.bootstrap}; see {node.log_dir / 'kafka.log'}")
            node.abort(proc)
        return [node.node_id for node, _ in launched]

    def _record(self) -> None:
        """Write the layout (and, for SASL, fresh credentials) before the first format."""
        if self.recorded:
            return
        self.home.mkdir(parents=True, exist_ok=True)
        self.layout = Layout(self.layout.brokers, self.layout.sasl, random_cluster_id())
        if self.layout.sasl:
            users = {"broker": {"username": BROKER_USER, "password": secrets.token_urlsafe(24)},
                     "client": {"username": CLIENT_USER, "password": secrets.token_urlsafe(24)}}
            _write_private(self.home / CREDENTIALS_FILE,
                           json.dumps({"mechanism": SCRAM_MECHANISM, "users": users}, indent=2) + "\n")
        (self.home / LAYOUT_FILE).write_text(json.dumps(
            {"brokers": self.layout.brokers, "sasl": self.layout.sasl, "cluster_id": self.layout.cluster_id},
            indent=2) + "\n")
        self.recorded = True

    def stop(self, timeout: float = 30.0) -> int:
        """Stop every running node (SIGTERM to all at once: a node stopped alone while the
        others wait would lose the controller quorum under the last ones). Returns how many."""
        running = [(node, node.pid()) for node in self.nodes()]
        running = [(node, pid) for node, pid in running if pid is not None]
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
            out.append(NodeStatus(node.node_id, node.bootstrap, f"{node.config.host}:{node.config.controller_port}",
                                  state, pid))
        return out

    def node(self, node_id: int) -> KafkaBroker:
        return self.nodes()[node_id - 1]


def broker_answers(bootstrap: str, timeout: float = 2.0, security: dict[str, str] | None = None,
                   node_id: int | None = None) -> bool:
    """True when the broker returns cluster metadata that lists brokers (and ``node_id``,
    if given: a node is listed only once it has caught up and been unfenced).

    ``security``: librdkafka settings from :mod:`tokenaudit.infra.kafka_clients`."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**(security or {}), "bootstrap.servers": bootstrap,
                         "socket.connection.setup.timeout.ms": 1000, "log_level": 0, "logger": _quiet_logger()})
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


def random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, url-safe base64 without padding (what `random-uuid` prints)."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _small_machine() -> bool:
    return (os.cpu_count() or 1) <= 2
