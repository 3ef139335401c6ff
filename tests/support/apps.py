"""Helpers for tests and benchmarks: cached tiny models, an app on a real uvicorn
server in a thread, and reading events back from Kafka. Real components only."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tokenaudit.schemas import EVENT, decode


def cached_model(arch: str, cache_dir: Path) -> Path:
    """A tiny ``arch`` model built once per version of the builder's source (idempotent build)."""
    from tokenaudit.inference import model_init
    from tokenaudit.inference.model_init import build_default_model

    digest = hashlib.sha256(Path(model_init.__file__).read_bytes()).hexdigest()[:10]
    path = Path(cache_dir) / "test-models" / f"{arch}-{digest}"
    build_default_model(path, arch=arch)
    return path


class ThreadedServer:
    """uvicorn serving ``app`` on a free port in a background thread (lifespan included)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        from tokenaudit.infra.procutil import free_port

        self.port = port or free_port(host)
        self.base_url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=self.port, lifespan="on", log_level="warning", log_config=None)
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"app at {self.base_url} not ready after {timeout}s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def read_messages(bootstrap: str, topic: str, expect: int, timeout: float = 60.0, settle: float = 1.0) -> list[Any]:
    """Every message on ``topic`` (confluent-kafka ``Message``: key, value, headers, partition,
    timestamp): reads until ``expect`` arrived and nothing more came for ``settle`` seconds (so
    extra messages would be seen), or until ``timeout``."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"t-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    quiet_since = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                if len(got) >= expect:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since >= settle:
                        break
                continue
            quiet_since = None
            got.append(msg)
    finally:
        consumer.close()
    return got


def read_events(
    bootstrap: str, topic: str, expect: int, timeout: float = 60.0, settle: float = 1.0
) -> list[tuple[bytes, bytes]]:
    """All (key, raw value) pairs on ``topic``, as :func:`read_messages` reads them."""
    return [(m.key(), m.value()) for m in read_messages(bootstrap, topic, expect, timeout, settle)]


def decode_events(pairs: list[tuple[bytes, bytes]]) -> list[dict]:
    return [decode(value, EVENT) for _, value in pairs]


@contextmanager
def served_app(tmp: Path, bootstrap: str, model: Path, client: str, department: str, **overrides: Any):
    """The inference app on a real server, keyed (one key for ``client``), publishing to a fresh
    one-partition topic of its own. The server carries ``app``, ``key`` and ``topic``."""
    from tokenaudit.inference.app import create_app
    from tokenaudit.infra.kafka_admin import ensure_topics
    from tokenaudit.infra.keys import add_key
    from tokenaudit.settings import load_settings

    keys_file = tmp / "keys.toml"
    key = add_key(keys_file, client, department)
    topic = f"test-{uuid.uuid4().hex[:12]}"
    ensure_topics(bootstrap, {topic: 1})
    settings = dict(xla=False, batch_max_size=8, batch_max_wait_ms=30, kafka_partitions=1) | overrides
    s = load_settings(
        data_dir=tmp / "data",
        kafka_bootstrap=bootstrap,
        topic_usage=topic,
        model=str(model),
        api_keys_file=keys_file,
        **settings,
    )
    app = create_app(s)
    with ThreadedServer(app) as server:
        server.wait_ready()
        server.app, server.key, server.topic = app, key, topic
        yield server


def events_of(server: Any, bootstrap: str, ids: list[str], timeout: float = 60.0) -> dict[str, dict]:
    """The event of each request id on the server's topic, awaited until all are there; one each."""
    want, got, deadline = set(ids), {}, time.monotonic() + timeout
    while not want <= set(got) and time.monotonic() < deadline:
        pairs = read_events(bootstrap, server.topic, expect=len(want), timeout=10, settle=0.3)
        events = [e for e in decode_events(pairs) if e["request_id"] in want]
        assert len(events) == len({e["request_id"] for e in events}), "one event per request"
        got = {e["request_id"]: e for e in events}
    assert want <= set(got), f"missing events: {want - set(got)}"
    return got
