"""In-memory stand-ins for a Kafka consumer, a Kafka producer and the ClickHouse store, for
unit tests of the logic around them (the sink's flush protocol, the publisher's spooling
decision). Only the few calls that logic makes, with confluent-kafka's signatures.

Never used in an integration test: those run against a real broker and a real chDB (see
conftest.py); these exist so the decisions in between get fast tests without either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeMessage:
    """A consumed record, as confluent_kafka.Message answers for it."""

    topic_: str
    value_: bytes | None
    key_: bytes | None = None
    partition_: int = 0
    offset_: int = 0
    error_: Any = None

    def topic(self) -> str:
        return self.topic_

    def value(self) -> bytes | None:
        return self.value_

    def key(self) -> bytes | None:
        return self.key_

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def error(self) -> Any:
        return self.error_


class FakeConsumer:
    """Hands out queued messages; records commits (what a commit covered: every message handed
    out before it)."""

    def __init__(self, messages: Sequence[FakeMessage] = ()):
        self.queue: list[FakeMessage] = list(messages)
        self.handed_out = 0
        self.commits: list[int] = []  # handed_out at each commit
        self.subscribed: list[str] = []
        self.closed = False

    def subscribe(self, topics: list[str], on_revoke: Callable | None = None) -> None:
        self.subscribed = list(topics)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        out, self.queue = self.queue[:num_messages], self.queue[num_messages:]
        self.handed_out += len(out)
        return out

    def commit(self, asynchronous: bool = True, message: Any = None) -> None:
        self.commits.append(self.handed_out)

    def close(self) -> None:
        self.closed = True


class StoreDown(ConnectionError):
    """What a store that cannot be reached raises (not a data error: the batch is retried)."""


@dataclass
class FakeStore:
    """Tables as lists of row dicts. ``refuse(row) -> reason | None`` makes a row a data error
    (as ClickHouse refuses a value out of range); ``down`` makes every call fail as a store
    that cannot be reached."""

    tables: dict[str, list[dict]] = field(default_factory=dict)
    refuse: Callable[[str, dict], str | None] = lambda table, row: None
    down: int = 0  # how many calls still fail
    inserts: list[tuple[str, int]] = field(default_factory=list)  # (table, rows) per successful insert
    database: str = "fake"

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> int:
        if self.down:
            self.down -= 1
            raise StoreDown("store unreachable")
        dicts = [dict(zip(columns, row)) for row in rows]
        for row in dicts:
            reason = self.refuse(table, row)
            if reason is not None:
                raise ValueError(reason)  # a value the client cannot encode for its column
        self.tables.setdefault(table, []).extend(dicts)
        self.inserts.append((table, len(dicts)))
        return len(dicts)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Only the sink's late-delta lookup: every stored version of the rows it names."""
        if self.down:
            self.down -= 1
            raise StoreDown("store unreachable")
        keys = {tuple(k) for k in (parameters or {}).get("keys", [])}
        return [
            dict(r, ws_ms=r["window_start"])
            for r in self.tables.get("usage_rollup", [])
            if (r["client_id"], r["department"], r["api_key_id"], r["model"], r["window_start"]) in keys
        ]


class FakeProducer:
    """confluent_kafka.Producer's calls as the publisher makes them. ``refuse``: produce raises
    BufferError (the local queue is full); ``up``: whether metadata requests answer;
    ``fail_deliveries``: delivery reports of the next produced records carry an error."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.refuse = False
        self.up = True
        self.fail_deliveries = 0
        self.probes = 0  # metadata requests (the publisher's "is the broker back?")
        self.produced: list[tuple[str, bytes, bytes | None, Any]] = []
        self._pending: list[tuple[Callable | None, Any, FakeProducer._Msg]] = []

    class _Msg:
        def __init__(self, key, value, offset: int = -1, headers: Any = None):
            self._key, self._value, self._offset, self._headers = key, value, offset, headers

        def headers(self) -> Any:
            return list(self._headers) if self._headers is not None else None

        def key(self):
            return self._key

        def value(self):
            return self._value

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return self._offset  # its place among what this producer put on the topic (-1: failed)

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        partition: int = -1,
        callback: Callable | None = None,
        on_delivery: Callable | None = None,
        timestamp: int = 0,
        headers: Any = None,
    ) -> None:
        """confluent-kafka's parameters in its order (the publisher passes them by position)."""
        on_delivery = callback or on_delivery
        if self.refuse:
            raise BufferError("Local: Queue full")
        report = on_delivery or self.config.get("on_delivery")
        if self.fail_deliveries:
            self.fail_deliveries -= 1
            self._pending.append(
                (report, FakeKafkaError("Local: Message timed out"), self._Msg(key, value, -1, headers))
            )
            return
        self.produced.append((topic, value, key, headers))
        if report is not None and not self.config.get("delivery.report.only.error"):
            self._pending.append((report, None, self._Msg(key, value, len(self.produced) - 1, headers)))

    def poll(self, timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for report, err, msg in pending:
            if report is not None:
                report(err, msg)
        return len(pending)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        pass

    def list_topics(self, topic: str | None = None, timeout: float = -1):
        self.probes += 1
        if not self.up:
            from confluent_kafka import KafkaException

            raise KafkaException("Local: Broker transport failure")
        return type("Metadata", (), {"brokers": {1: object()}, "topics": {}})()

    def __len__(self) -> int:
        return len(self._pending)


class FakeKafkaError:
    """A delivery report's error, as confluent_kafka.KafkaError answers for it."""

    def __init__(self, text: str, code: int = -192, fatal: bool = False):
        self.text, self.code_, self.fatal_ = text, code, fatal

    def str(self) -> str:
        return self.text

    def code(self) -> int:
        return self.code_

    def fatal(self) -> bool:
        return self.fatal_


def fake_publisher(tmp_path: Any) -> tuple[Any, list[FakeProducer]]:
    """An EventPublisher over in-memory producers (the direct one, then any replay or reported
    one it makes), with fast retries: for the publisher's logic, not Kafka's."""
    from tokenaudit.inference.publisher import EventPublisher

    made: list[FakeProducer] = []

    def factory(config: dict) -> FakeProducer:
        made.append(FakeProducer(config))
        return made[-1]

    pub = EventPublisher(
        "fake:9092",
        "usage",
        tmp_path / "spool",
        retry_seconds=0.05,
        message_timeout_ms=1000,
        producer_factory=factory,  # type: ignore[arg-type]
    )
    return pub, made
