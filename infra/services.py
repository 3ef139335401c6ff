"""Background services for `tokenaudit up` / `down`: start each part, wait until it is ready,
keep pid files and logs under the data directory, stop gracefully in reverse order.

Written here rather than with a process supervisor (supervisord, systemd) because `up` must
work on a bare machine with nothing but this package installed; the unit files in
infra/deploy/ are the production path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenaudit.errors import ServiceError
from tokenaudit.infra import procutil
from tokenaudit.infra.kafka_cluster import ClusterConfig, KafkaCluster
from tokenaudit.infra.registry_server import LocalRegistry, RegistryConfig


@dataclass
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    ports: list[tuple[str, int]] = field(default_factory=list)
    timeout: float = 120.0


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class Supervisor:
    """Starts and stops the pipeline's processes; Kafka is started through its own launcher.

    ``brokers``: the size of the local Kafka cluster to start when none exists yet (an
    existing one keeps its size; asking for another is an error from the launcher)."""

    def __init__(self, settings, echo: Callable[[str], None] = print, brokers: int | None = None):
        self.settings = settings
        self.echo = echo
        self.run_dir: Path = settings.run_dir
        self.log_dir: Path = settings.log_dir
        self.kafka = KafkaCluster(ClusterConfig.from_settings(settings, brokers=brokers))
        self.registry = LocalRegistry(RegistryConfig.from_settings(settings))

    # --- the pipeline's parts ------------------------------------------------------------------
    def services(self) -> list[Service]:
        """The processes of the pipeline, in start order (stopped in reverse).

        The usage API is composed with the sink for the embedded store: one process owns a
        chDB directory, so the writer is also the reader (``sink --api``). With a ClickHouse
        server they are two processes (``sink --no-api``, its own /healthz and /metrics on
        TOKENAUDIT_SINK_PORT, and ``api``), so either can be restarted or scaled alone."""
        s = self.settings
        cli = [sys.executable, "-m", "tokenaudit.cli"]
        api = f"http://{s.usage_api_host}:{s.usage_api_port}"
        app = f"http://{s.http_host}:{s.http_port}"
        api_port = [(s.usage_api_host, s.usage_api_port)]
        if s.embedded_clickhouse:
            readers = [Service("sink", cli + ["sink", "--api"], lambda: http_ok(f"{api}/healthz"), ports=api_port)]
        else:
            sink = f"http://{s.usage_api_host}:{s.sink_port}"
            readers = [
                Service(
                    "sink",
                    cli + ["sink", "--no-api"],
                    lambda: http_ok(f"{sink}/healthz"),
                    ports=[(s.usage_api_host, s.sink_port)],
                ),
                Service("api", cli + ["api"], lambda: http_ok(f"{api}/healthz"), ports=api_port),
            ]
        return [
            *readers,
            # faust's web server answers once the worker has started; events wait in Kafka meanwhile
            Service(
                "worker",
                cli + ["worker"],
                lambda: http_ok(f"http://127.0.0.1:{s.worker_web_port}/metrics"),
                ports=[("127.0.0.1", s.worker_web_port)],
                timeout=120,
            ),
            Service(
                "inference",
                cli + ["serve"],
                lambda: http_ok(f"{app}/readyz"),
                ports=[(s.http_host, s.http_port)],
                timeout=600,
            ),
        ]

    def endpoints(self) -> dict[str, str]:
        s = self.settings
        return {
            "kafka": self.kafka.bootstrap if self._local_kafka() else s.kafka_bootstrap,
            "inference": f"http://{s.http_host}:{s.http_port}",
            "usage_api": f"http://{s.usage_api_host}:{s.usage_api_port}",
            "schema_registry": s.schema_registry_url or self.registry.url,
            "clickhouse": s.effective_clickhouse_dsn,
            "logs": str(self.log_dir),
        }

    def _local_registry(self) -> bool:
        """True unless TOKENAUDIT_SCHEMA_REGISTRY_URL names an external registry (left alone)."""
        return not self.settings.schema_registry_url

    def _local_kafka(self) -> bool:
        """True when the settings' bootstrap names nodes of the local cluster (then `up`
        starts it and `down` stops it); any other bootstrap is an external cluster."""
        named = {a.strip() for a in self.settings.kafka_bootstrap.split(",") if a.strip()}
        return bool(named) and named <= set(self.kafka.addresses())

    # --- up / down ----------------------------------------------------------------------------
    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        return procutil.read_pid(self.pid_file(name))

    def up(self) -> dict[str, str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started: list[str] = []
        try:
            if self._local_kafka():
                t0 = time.monotonic()
                nodes = self.kafka.start()
                where = f"at {self.kafka.bootstrap}{' (SASL)' if self.kafka.sasl else ''}"
                if nodes:
                    started.append("kafka")
                    which = "" if self.kafka.size == 1 else f" broker(s) {', '.join(map(str, nodes))}"
                    self.echo(f"kafka      started{which} ({time.monotonic() - t0:.1f}s) {where}")
                else:
                    self.echo(f"kafka      already running {where}")
            if self._local_registry():
                t0 = time.monotonic()
                if self.registry.start():
                    started.append("registry")
                    self.echo(f"registry   started ({time.monotonic() - t0:.1f}s) at {self.registry.url}")
                else:
                    self.echo(f"registry   already running at {self.registry.url}")
            self._prepare()
            for svc in self.services():
                if self.pid(svc.name) is not None:
                    self.echo(f"{svc.name:<10} already running (pid {self.pid(svc.name)})")
                    continue
                self._start(svc)
                started.append(svc.name)
        except Exception:
            for name in reversed(started):
                self._stop_one(name)
            raise
        return self.endpoints()

    def _prepare(self) -> None:
        """Topics and schema, before any consumer or the store owner starts."""
        from tokenaudit.infra.topics import ensure_declared

        s = self.settings
        ensured = ensure_declared(s)
        if ensured.created or ensured.corrected:
            self.echo(
                f"topics     created {len(ensured.created)}, corrected {len(ensured.corrected)} "
                f"(replication {ensured.replication.factor}, min.insync.replicas {ensured.replication.min_insync})"
            )
        if s.embedded_clickhouse and self.pid("sink") is not None:
            self.echo("clickhouse store owned by the running sink (it migrated at start)")
        else:
            self._migrate()
        from tokenaudit.infra.keys import admin_key_path, ensure_admin_key

        ensure_admin_key(s)  # the CLI's key for the usage API (embedded mode)
        self.echo(f"admin key  {admin_key_path(s)}")

    def _migrate(self) -> None:
        # In embedded mode only one process may open the store, so migrate in a short-lived child.
        proc = subprocess.run(
            [sys.executable, "-m", "tokenaudit.cli", "db", "migrate"],
            check=False,
            capture_output=True,
            text=True,
            env=self._env(),
        )
        if proc.returncode != 0:
            raise ServiceError(f"db migrate failed: {(proc.stderr or proc.stdout).strip()}")
        self.echo(f"clickhouse {proc.stdout.strip()}")

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("TOKENAUDIT_DATA_DIR", str(self.settings.data_dir))
        if self._local_registry():  # the services write the Confluent wire format through it
            env["TOKENAUDIT_SCHEMA_REGISTRY_URL"] = self.registry.url
        env.update(extra or {})
        return env

    def _start(self, svc: Service) -> None:
        for host, port in svc.ports:
            if procutil.port_in_use(host, port):
                raise ServiceError(f"{svc.name}: port {port} on {host} is already in use by another process")
        log_path = self.log_dir / f"{svc.name}.log"
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {svc.name}\n".encode())
            log.flush()
            start_offset = log.tell()
            proc = subprocess.Popen(
                svc.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self._env(),
            )
        self.pid_file(svc.name).write_text(str(proc.pid))
        deadline = time.monotonic() + svc.timeout
        next_note = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if svc.ready():
                self.echo(f"{svc.name:<10} ready ({time.monotonic() - t0:.1f}s, pid {proc.pid})")
                return
            if time.monotonic() >= next_note:  # long steps (model build, XLA compile) show progress
                self.echo(f"{svc.name:<10} starting... {time.monotonic() - t0:.0f}s ({_last_line(log_path)})")
                next_note += 15
            time.sleep(0.5)
        died = proc.poll() is not None
        procutil.terminate(proc.pid, timeout=10)
        self.pid_file(svc.name).unlink(missing_ok=True)
        tail = _tail_since(log_path, start_offset)
        why = f"exited with code {proc.returncode}" if died else f"not ready after {svc.timeout:.0f}s"
        raise ServiceError(f"{svc.name} failed to start ({why}); last lines of {log_path}:\n{tail}")

    def down(self) -> list[str]:
        stopped = []
        for svc in reversed(self.services()):
            if self._stop_one(svc.name):
                stopped.append(svc.name)
        if self._local_registry() and self.registry.stop():
            stopped.append("registry")
        if self._local_kafka() and self.kafka.stop():
            stopped.append("kafka")
        return stopped

    def _stop_one(self, name: str) -> bool:
        if name == "kafka":
            return self.kafka.stop() > 0
        if name == "registry":
            return self.registry.stop()
        pid = self.pid(name)
        if pid is None:
            self.pid_file(name).unlink(missing_ok=True)
            return False
        graceful = procutil.terminate(pid, timeout=60)
        self.pid_file(name).unlink(missing_ok=True)
        self.echo(f"{name:<10} stopped{'' if graceful else ' (killed after timeout)'}")
        return True

    def status(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if not self._local_kafka():
            out["kafka"] = f"external {self.settings.kafka_bootstrap}"
        for node in self.kafka.status() if self._local_kafka() else []:
            name = "kafka" if self.kafka.size == 1 else f"kafka-{node.node_id}"
            out[name] = node.state if node.pid is None else f"{node.state} pid={node.pid} at {node.address}"
        out["registry"] = (
            self.registry.status() if self._local_registry() else f"external {self.settings.schema_registry_url}"
        )
        for svc in self.services():
            pid = self.pid(svc.name)
            out[svc.name] = "down" if pid is None else (f"ready pid={pid}" if svc.ready() else f"starting pid={pid}")
        return out


def _last_line(path: Path) -> str:
    lines = [ln for ln in procutil.tail(path, 8).splitlines() if ln.strip() and "GET /" not in ln]
    return lines[-1].strip()[:100] if lines else "no output yet"


def _tail_since(path: Path, offset: int, lines: int = 25) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
