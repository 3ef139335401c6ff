"""Shared fixtures: a real Kafka broker on free ports and an embedded ClickHouse store.

The broker is started once per test session with the project's own launcher (so the
launcher is exercised by every run); ``TOKENAUDIT_TEST_BOOTSTRAP`` points the suite at an
external broker instead. chDB allows one store per process, so the session shares one
store and each test isolates itself in its own database.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tokenaudit.infra.kafka_broker import BrokerConfig, KafkaBroker
from tokenaudit.infra.procutil import free_port
from tokenaudit.settings import load_settings

# a fixture implies what the test needs: the lanes (pyproject's markers) follow from it
NEEDS = {
    "kafka_broker": "broker",
    "kafka_bootstrap": "broker",
    "schema_registry": "broker",  # the marker of "needs external services"
    "schema_registry_url": "broker",
    "chdb_dsn": "store",
    "ch_client": "store",
    "ch_database": "store",
    "small_disk": "chaos",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in {NEEDS[f] for f in getattr(item, "fixturenames", ()) if f in NEEDS}:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> KafkaBroker | None:
    """The session's own broker, or None when an external one is configured."""
    if os.environ.get("TOKENAUDIT_TEST_BOOTSTRAP"):
        yield None
        return
    settings = load_settings()
    home = tmp_path_factory.mktemp("kafka")
    broker = KafkaBroker(
        BrokerConfig(
            home=home,
            cache_dir=settings.cache_dir,
            version=settings.kafka_version,
            port=free_port(),
            controller_port=free_port(),
            heap="512m",
        )
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
    return os.environ.get("TOKENAUDIT_TEST_BOOTSTRAP") or kafka_broker.bootstrap


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory):
    """The session's own schema registry (Apicurio, started with the project's launcher and
    fetched on first use), or None when ``TOKENAUDIT_TEST_SCHEMA_REGISTRY_URL`` names one."""
    if os.environ.get("TOKENAUDIT_TEST_SCHEMA_REGISTRY_URL"):
        yield None
        return
    from tokenaudit.infra.registry_server import LocalRegistry, RegistryConfig

    settings = load_settings()
    registry = LocalRegistry(
        RegistryConfig(
            home=tmp_path_factory.mktemp("registry"),
            cache_dir=settings.cache_dir,
            version=settings.registry_version,
            port=free_port(),
            management_port=free_port(),
        )
    )
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def schema_registry_url(schema_registry) -> str:
    return os.environ.get("TOKENAUDIT_TEST_SCHEMA_REGISTRY_URL") or schema_registry.url


@pytest.fixture
def topic_name() -> str:
    """A fresh topic name per test, so tests never see each other's messages."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory) -> str:
    return f"chdb://{tmp_path_factory.mktemp('clickhouse')}"


@pytest.fixture(scope="session")
def ch_client(chdb_dsn):
    from tokenaudit.infra.clickhouse import connect

    return connect(chdb_dsn)


@pytest.fixture
def ch_database(ch_client) -> str:
    """A fresh database name per test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    ch_client.command(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch) -> Path:
    """An isolated TOKENAUDIT_DATA_DIR for tests that read settings from the environment."""
    from tokenaudit.settings import get_settings

    monkeypatch.setenv("TOKENAUDIT_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


@pytest.fixture
def small_disk():
    """Mounts a real small filesystem: ``small_disk(path, "64k")`` (a tmpfs; root only, as CI
    runs), so a full disk is a real ENOSPC without filling the machine's. Unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.fail(
                f"cannot mount a tmpfs here (the full-disk tests need root, as CI has): {done.stderr.decode().strip()}"
            )
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=True)
