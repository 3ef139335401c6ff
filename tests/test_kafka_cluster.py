"""A 3-broker SASL/SCRAM cluster that loses its busiest broker under load, end to end.

`tokenaudit kafka start --brokers 3 --sasl`, then the pipeline over SASL: `tokenaudit up
--brokers 3` (sink, a worker, an inference app; the brokers already run) plus a second
inference app and a second worker. Under steady load from three API keys the broker that
leads the most partitions is SIGKILLed; while it is down, clients without credentials and
with a wrong password are refused with clear errors; about 20 s later `kafka start` brings
back exactly that broker. Every answered request is then in ClickHouse exactly once
(`verify` exits 0) and `usage` equals the clients' own totals.

Marked ``cluster`` (three JVMs, two apps and two workers on a shared box): the fast lane
skips it with ``-m "not cluster"``; CI runs it.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

from tests.support.waiting import wait_for
from tokenaudit.infra import kafka_clients
from tokenaudit.infra.keys import add_key
from tokenaudit.infra.procutil import free_port, pid_alive, port_in_use
from tokenaudit.settings import get_settings, load_settings

pytestmark = [pytest.mark.cluster, pytest.mark.broker, pytest.mark.model, pytest.mark.chaos, pytest.mark.timeout(480)]

CLI = [sys.executable, "-m", "tokenaudit.cli"]
CLIENTS = {"acme-web": "sales", "acme-etl": "data", "globex": "research"}


def _free_range(n: int, avoid: set[int] = frozenset()) -> int:
    """A base port whose next n ports are free (and not in ``avoid``)."""
    for _ in range(200):
        base = free_port()
        ports = range(base, base + n)
        if base + n < 65000 and not set(ports) & avoid and not any(port_in_use("127.0.0.1", p) for p in ports):
            return base
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def model():
    from tests.support.apps import cached_model

    return cached_model("t5", load_settings().cache_dir)


@pytest.fixture
def cluster_env(tmp_path, model, schema_registry_url, monkeypatch):
    kafka = _free_range(3)
    controller = _free_range(3, set(range(kafka, kafka + 3)))
    env = {
        "TOKENAUDIT_DATA_DIR": str(tmp_path / "data"),
        "TOKENAUDIT_KAFKA_PORT": str(kafka),
        "TOKENAUDIT_KAFKA_CONTROLLER_PORT": str(controller),
        "TOKENAUDIT_KAFKA_HEAP": "256m",
        "TOKENAUDIT_SCHEMA_REGISTRY_URL": schema_registry_url,  # the session's: `up` leaves it alone
        "TOKENAUDIT_KAFKA_PARTITIONS": "3",
        "TOKENAUDIT_KAFKA_START_TIMEOUT": "120",
        "TOKENAUDIT_MODEL": str(model),
        "TOKENAUDIT_XLA": "false",
        "TOKENAUDIT_HTTP_PORT": str(free_port()),
        "TOKENAUDIT_USAGE_API_PORT": str(free_port()),
        "TOKENAUDIT_WORKER_WEB_PORT": str(free_port()),
        "TOKENAUDIT_WINDOW_SECONDS": "2",
        "TOKENAUDIT_GRACE_SECONDS": "1",
        "TOKENAUDIT_IDLE_TIMEOUT_SECONDS": "2",
        "TOKENAUDIT_SINK_BATCH_SECONDS": "0.5",
        "TOKENAUDIT_WORKER_SESSION_TIMEOUT": "8",
        # failover takes the controller's session timeout (~9 s) plus an election: let the
        # producer ride it out rather than spool
        "TOKENAUDIT_PRODUCER_MESSAGE_TIMEOUT_MS": "45000",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    subprocess.run(CLI + ["down"], capture_output=True, text=True, timeout=240)
    subprocess.run(CLI + ["kafka", "stop"], capture_output=True, text=True, timeout=120)
    get_settings.cache_clear()


def cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        CLI + list(args), capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check:
        assert proc.returncode == 0, f"tokenaudit {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


class Extra:
    """The second inference app and the second worker, beside the ones `up` starts."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []
        self.app_port, self.worker_port = free_port(), free_port()

    def start(self) -> None:
        base = dict(os.environ)
        app_env = {
            **base,
            "TOKENAUDIT_HTTP_PORT": str(self.app_port),
            "TOKENAUDIT_SPOOL_DIR": str(self.tmp / "spool-2"),
            "TOKENAUDIT_INSTANCE": "app-2",
        }
        worker_env = {**base, "TOKENAUDIT_WORKER_WEB_PORT": str(self.worker_port)}
        for name, argv, env in (
            ("app-2", CLI + ["serve"], app_env),
            ("worker-2", [sys.executable, "-m", "tokenaudit.streams.app"], worker_env),
        ):
            log = open(self.tmp / f"{name}.log", "wb")
            self.procs.append(
                subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        for url in (f"http://127.0.0.1:{self.app_port}/readyz", f"http://127.0.0.1:{self.worker_port}/metrics"):
            while True:
                assert all(p.poll() is None for p in self.procs), self.logs()
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{url} not ready\n{self.logs()}"
                time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in self.tmp.glob("*-2.log"))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


class Load:
    """Steady requests from three keys to both apps; the clients' own totals of what was answered."""

    def __init__(self, urls: list[str], keys: dict[str, str], threads: int = 3):
        self.urls, self.keys, self.threads = urls, keys, threads
        self.expected: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, n: int) -> None:
        clients = list(self.keys)
        i = n
        with httpx.Client(timeout=60) as http:
            while not self.stop_event.is_set():
                client = clients[i % len(clients)]
                words = " ".join(f"w{(i * 7 + j) % 13}" for j in range(3 + i % 9))
                try:
                    r = http.post(
                        f"{self.urls[i % len(self.urls)]}/v1/generate",
                        json={"prompt": words, "max_new_tokens": 2 + i % 4},
                        headers={"Authorization": f"Bearer {self.keys[client]}"},
                    )
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                    continue
                usage = r.json()["usage"]
                with self.lock:
                    e = self.expected[client]
                    e["requests"] += 1
                    e["input_tokens"] += usage["input_tokens"]
                    e["output_tokens"] += usage["output_tokens"]
                i += self.threads
                time.sleep(0.05)

    def start(self) -> Load:
        for t in self.workers:
            t.start()
        return self

    def requests(self) -> int:
        with self.lock:
            return sum(e["requests"] for e in self.expected.values())

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.workers:
            t.join(90)


def leaders(admin: AdminClient) -> Counter:
    """Partitions led per broker id, over every topic (internal ones included)."""
    md = admin.list_topics(timeout=15)
    return Counter(p.leader for t in md.topics.values() for p in t.partitions.values() if p.leader >= 0)


def usage_by_client() -> dict[str, dict]:
    rows = json.loads(cli("usage", "--since", "1h", "--by", "client", "--format", "json").stdout)
    return {r["client_id"]: r for r in rows}


def test_sasl_cluster_loses_its_busiest_broker_and_every_answered_request_is_stored_once(
    cluster_env, tmp_path, request
):
    data = Path(cluster_env["TOKENAUDIT_DATA_DIR"])
    t0 = time.monotonic()
    started = cli("kafka", "start", "--brokers", "3", "--sasl")
    assert "3 brokers (SASL/SCRAM-SHA-512); started broker(s) 1, 2, 3" in started.stdout
    credentials = data / "kafka" / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    settings = load_settings()
    admin = AdminClient({**kafka_clients.admin_config(settings), "log_level": 0})
    assert kafka_clients.security(settings).describe() == "SASL_PLAINTEXT SCRAM-SHA-512 as user 'tokenaudit'"

    registry = data / "api_keys.toml"
    keys = {client: add_key(registry, client, dept) for client, dept in CLIENTS.items()}
    extra = Extra(tmp_path)
    request.addfinalizer(extra.stop)  # stopped whatever fails below (a failed run once left its worker running)
    extra.start()  # its TensorFlow import overlaps with `up`
    up = cli("up", "--brokers", "3")
    assert "kafka      already running at" in up.stdout and "(SASL)" in up.stdout, up.stdout
    extra.wait_ready()
    startup = time.monotonic() - t0

    # every topic as declared, replicated 3 ways with min.insync.replicas 2 (faust's changelog too)
    topics = [
        settings.topic_usage,
        settings.topic_rollups,
        settings.topic_sampled,
        settings.topic_anomalies,
        settings.topic_dlq,
        f"{settings.worker_id}-state-changelog",
    ]
    md = admin.list_topics(timeout=15).topics
    described = {
        res.name: fut.result(15)
        for res, fut in admin.describe_configs([ConfigResource(ResourceType.TOPIC, t) for t in topics]).items()
    }
    for name, conf in described.items():
        assert {len(p.replicas) for p in md[name].partitions.values()} == {3}, name
        assert conf["min.insync.replicas"].value == "2", name
    compacted = {n for n, c in described.items() if c["cleanup.policy"].value == "compact"}
    assert compacted == {settings.topic_rollups, topics[-1]}, "the rollups topic and the changelog"
    assert {len(p.replicas) for p in md["__consumer_offsets"].partitions.values()} == {3}

    urls = [f"http://127.0.0.1:{settings.http_port}", f"http://127.0.0.1:{extra.app_port}"]
    load = Load(urls, keys).start()
    try:
        wait_for(lambda: load.requests() >= 60, 60, "load to get going")
        led = leaders(admin)
        victim = led.most_common(1)[0][0]
        pid_file = data / "kafka" / f"broker-{victim}" / "kafka.pid"
        pid = int(pid_file.read_text())
        others = {n: int((data / "kafka" / f"broker-{n}" / "kafka.pid").read_text()) for n in (1, 2, 3) if n != victim}
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        before_kill = load.requests()
        wait_for(lambda: not pid_alive(pid), 10, "the broker to die")

        status = cli("kafka", "status", "--format", "json", check=False)
        assert status.returncode == 3, status.stdout
        assert {r["broker"]: r["state"] for r in json.loads(status.stdout)} == {
            n: "down" if n == victim else "running" for n in (1, 2, 3)
        }

        # while it is down: a client without credentials and one with a wrong password are refused
        bootstrap = kafka_clients.bootstrap_servers(settings)
        with pytest.raises(kafka_clients.KafkaAccessError, match=r"cannot reach Kafka at .* \(PLAINTEXT\)"):
            kafka_clients.check_access({"bootstrap.servers": bootstrap}, timeout=4)
        failed = []
        anon = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 4000, "log_level": 0})
        anon.produce(settings.topic_usage, b"not allowed", on_delivery=lambda err, msg: failed.append(err))
        anon.flush(10)
        del anon
        assert failed and failed[0] is not None, "an unauthenticated producer must not get through"
        t = time.monotonic()
        wrong = cli("verify", "--since", "1h", check=False, env={"TOKENAUDIT_KAFKA_SASL_PASSWORD": "wrong"})
        assert wrong.returncode == 1 and time.monotonic() - t < 30, "a wrong password fails fast"
        assert "refused this client (SASL_PLAINTEXT SCRAM-SHA-512 as user 'tokenaudit')" in wrong.stderr
        assert "Authentication failed" in wrong.stderr and "wrong" not in wrong.stderr

        time.sleep(max(0.0, 20 - (time.monotonic() - killed_at)))  # the outage the issue asks for: ~20 s
        during = load.requests() - before_kill
        restarted = cli("kafka", "start")
        assert f"started broker(s) {victim};" in restarted.stdout, restarted.stdout
        assert {n: int((data / "kafka" / f"broker-{n}" / "kafka.pid").read_text()) for n in others} == others, (
            "running brokers are left alone"
        )
        wait_for(lambda: load.requests() >= before_kill + during + 40, 60, "load after the restart")
    finally:
        load.stop()
    assert not load.failures, load.failures[:5]
    assert during > 0, "requests kept being answered while a broker was down"
    expected = {c: dict(e) for c, e in load.expected.items()}
    total = sum(e["requests"] for e in expected.values())

    def matches():
        got = usage_by_client()
        return (
            all(
                c in got
                and (got[c]["requests"], got[c]["input_tokens"], got[c]["output_tokens"])
                == (e["requests"], e["input_tokens"], e["output_tokens"])
                for c, e in expected.items()
            )
            and got
        )

    try:
        got = wait_for(matches, 120, "usage to equal the clients' totals", interval=2)
    except AssertionError:
        raise AssertionError(f"usage {usage_by_client()} != expected {expected}\n{extra.logs()}") from None
    assert set(got) == set(expected)

    def verified():
        # once the last request's window is settled, verify covers every event, finds each once
        # in ClickHouse, and has nothing pending; until then it checks less (never drift)
        proc = cli("verify", "--since", "1h", "--format", "json", check=False)
        assert proc.returncode in (0, 1), proc.stderr
        out = json.loads(proc.stdout)
        assert out["drift"] == [], out["drift"]
        return out if out["topic"]["distinct_events"] == total and not out["pending"] and proc.returncode == 0 else None

    report = wait_for(verified, 60, "verify to cover every request with nothing pending", interval=2)
    assert report["ok"] and report["buckets"] >= len(expected)
    assert {c: (r["requests"], r["input_tokens"], r["output_tokens"]) for c, r in usage_by_client().items()} == {
        c: (e["requests"], e["input_tokens"], e["output_tokens"]) for c, e in expected.items()
    }
    extra.stop()
    del admin  # its connections would complain once the brokers stop
    down = cli("down")
    assert "kafka" in down.stdout
    assert cli("kafka", "status", check=False).stdout.strip() == "kafka is down"
    print(
        f"startup {startup:.0f}s, {total} requests, {during} answered during the outage, "
        f"killed broker {victim} (led {led[victim]} of {sum(led.values())} partitions)"
    )
