"""The faust-streaming worker: ``token-usage`` processed in whole fetched batches.

State lives in a faust Table (in-memory store, changelog topic
``<worker_id>-state-changelog``) that faust restores on start and on every rebalance,
before the partition's events are fetched again (checked against Kafka 4.4 with aiokafka
0.14: restore from the changelog works). We do *not* use faust's windowed tables or
``on_window_close`` (wall-clock expiry, no firing after restore) nor its exactly-once mode.

How the Table is used, and why: events arrive in batches (one fetch, delivered by
:mod:`tokenaudit.streams.batch_consumer`, acked only after the batch was handled), so
faust's ``table[key] = value`` would write every key's changelog record to the partition of the *last* event of the batch, not the key's own.
The processor therefore mutates the Table's store in place and, once per batch, sends one
changelog record per changed key with the key's source partition
(``Table.send_changelog``). faust flushes the producer (changelog and outputs) before it
commits source offsets, so state on disk is never behind a committed offset; it may be
ahead of it after a SIGKILL, which the per-key offsets inside each value absorb. Measured
on this stack: a plain ``table[k] += 1`` counter over-counted (501 of 500) across one
restart, which is why the offsets live in the values.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import sys
import time
from typing import Any

import faust
from faust.types import TP

from tokenaudit.infra import kafka_clients, topics
from tokenaudit.schemas import ANOMALY, ROLLUP, SAMPLED, encode
from tokenaudit.schemas.compiled import compile_encoder
from tokenaudit.streams.batch_consumer import BatchTransport
from tokenaudit.streams.batch_producer import PartitionedRecords, send_records
from tokenaudit.streams.processor import Outputs, Processor
from tokenaudit.streams.state import State

log = logging.getLogger("tokenaudit.worker")

STATE_TABLE = "state"
# Keys exactly as json.dumps writes them (ASCII-escaped): compaction compares key bytes, so
# they must not change between versions. Values: the json module's C encoder, set up once.
# (orjson writes values ~6x faster, but measured on bench_stream_memory it raised the worker's
# RSS by 100-300 MB after a burst of 100k window closes, and made it keep growing.)
_json_key = json.encoder.encode_basestring_ascii  # == json.dumps(str)
# The C encoder JSONEncoder(separators=(",", ":")).encode builds on every call, made once
# (~1 us less per changelog record; same output, tested). No circular-reference check:
# state values are flat lists of scalars.
_json_chunks = json.encoder.c_make_encoder(
    None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)


def _json_value(value: Any) -> str:
    return "".join(_json_chunks(value, 0))


def _json_bytes_python(value: Any) -> bytes:
    return (_json_key(value) if value.__class__ is str else _json_value(value)).encode()


# The same bytes from C (streams/_fastjson.pyx, ~4x faster on state lists) when it is built.
try:
    from tokenaudit.streams import _fastjson
except ImportError:  # not built (no C compiler): the stdlib encoder above
    _fastjson = None
if _fastjson is not None and getattr(_fastjson, "ABI_VERSION", None) == 1:  # a stale build is not used
    _json_bytes = functools.partial(_fastjson.dumps_compact, fallback=_json_bytes_python)
else:
    _json_bytes = _json_bytes_python


class TableState(State):
    """:class:`State` over a faust Table's in-memory store, durable through its changelog.

    Writes are collected per flush and produced by :func:`send_all` straight through the
    aiokafka producer (faust's ``send_soon`` buffer sends one message per await, a few
    thousand per second: too slow for a changelog record per changed key per batch)."""

    def __init__(self, table: faust.Table) -> None:
        super().__init__()
        self.table = table
        self._data: dict | None = None
        self.pending: list[tuple[int, bytes, bytes | None]] = []

    @property  # type: ignore[override]
    def data(self) -> dict:
        # The memory store keeps one dict for its lifetime (cleared and updated in place,
        # never replaced): hold it instead of two property lookups per state access.
        d = self._data
        if d is None:
            d = self._data = self.table.data.data
        return d

    @data.setter
    def data(self, value) -> None:  # State.__init__ assigns; the store owns the dict
        pass

    @property  # type: ignore[override]
    def key_partition(self) -> dict:
        return self.table.data._key_partition

    @key_partition.setter
    def key_partition(self, value) -> None:
        pass

    def _write(self, partition: int, key: str, value: Any) -> None:
        # JSON, as faust's json codec reads it back during recovery.
        self.pending.append((partition, _json_key(key).encode(), None if value is None else _json_bytes(value)))


class WorkerApp(faust.App):
    """faust.App whose consumer delivers the source topic in whole batches (batch_consumer)."""

    def _new_transport(self):
        return BatchTransport(self.conf.broker_consumer, self)


def broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in bootstrap.split(","))


def topic_partitions(bootstrap: str, topic: str, timeout: float = 30.0, config: dict | None = None) -> int:
    from confluent_kafka.admin import AdminClient

    md = AdminClient(config or {"bootstrap.servers": bootstrap}).list_topics(topic=topic, timeout=timeout)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise RuntimeError(f"topic {topic!r} is missing on {bootstrap}")
    return len(meta.partitions)


def ensure_worker_topics(settings) -> int:
    """Create the topics the worker reads and writes; returns the source partition count."""
    from tokenaudit.infra.topics import ensure_declared

    # every topic as declared in infra/topics.py (rollups compacted); the source's actual partitions
    return ensure_declared(settings).partitions[settings.topic_usage]


def create_app(settings, partitions: int) -> faust.App:
    datadir = settings.data_dir / "worker" / settings.worker_id
    datadir.mkdir(parents=True, exist_ok=True)
    replication = topics.replication(settings)  # faust's changelog and leader topics: the declared rule
    app = WorkerApp(
        settings.worker_id,
        broker=broker_url(kafka_clients.bootstrap_servers(settings)),
        **kafka_clients.faust_options(settings),  # security, acks=all
        topic_replication_factor=replication.factor,
        store="memory://",
        datadir=str(datadir),
        web_enabled=True,
        web_host="127.0.0.1",
        web_port=settings.worker_web_port,
        web_in_thread=False,
        topic_partitions=partitions,
        table_standby_replicas=0,
        broker_commit_interval=settings.worker_commit_seconds,
        broker_session_timeout=settings.worker_session_timeout,
        broker_heartbeat_interval=settings.worker_session_timeout / 5,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=settings.worker_batch_size,
        # Measured on bench_stream_throughput: with faust's 1 MiB per partition the worker spent
        # ~45% of its time waiting for the next fetch (23k events/s); 4 MiB: 2x less waiting.
        consumer_max_fetch_size=settings.worker_fetch_bytes,
        producer_linger_ms=5,
        producer_max_batch_size=1 << 20,
        logging_config=None,
    )
    raw = dict(key_serializer="raw", value_serializer="raw")
    source = app.topic(settings.topic_usage, partitions=partitions, **raw)
    for name in (settings.topic_rollups, settings.topic_sampled, settings.topic_anomalies, settings.topic_dlq):
        app.topic(name, **raw)  # declared (created if missing); written through the producer below
    table = app.Table(STATE_TABLE, default=None, partitions=partitions,  # keys and values: JSON
                      extra_topic_configs=replication.topic_configs())

    def committed(partition: int) -> int | None:
        # faust's record of what it committed (next offset to read) for the source partition;
        # windows are retired only once their last change and emission are below it.
        try:
            return app.consumer._committed_offset.get(TP(settings.topic_usage, partition))
        except Exception:
            return None

    processor = Processor(settings, TableState(table), committed=committed)
    app.tokenaudit_processor = processor  # for tests and the metrics page

    changelog = table.changelog_topic.get_topic_name()
    state: TableState = processor.state  # type: ignore[assignment]

    def fatal_if_failed(fut) -> None:
        # A record the producer gave up on must not be followed by an offset commit: stop
        # hard, without committing; the restart replays from the last commit.
        if not fut.cancelled() and fut.exception() is not None:
            log.critical("produce failed, exiting without commit: %r", fut.exception())
            os._exit(70)

    partition_counts: dict[str, tuple[int, float]] = {}

    def partitions_of(topic: str) -> int:
        return partition_counts[topic][0]

    async def refresh_partition_counts(producer, topics) -> None:
        now = time.monotonic()
        for topic in topics:
            known = partition_counts.get(topic)
            if known is None or now - known[1] > 60.0:
                await producer.client._wait_on_metadata(topic)
                partition_counts[topic] = (len(producer.client.cluster.partitions_for_topic(topic)), now)

    outgoing = PartitionedRecords(partitions_of)
    encode_rollup, encode_sampled, encode_anomaly = (compile_encoder(name, memo_large=True)
                                                     or functools.partial(encode, name)
                                                     for name in (ROLLUP, SAMPLED, ANOMALY))
    send_lock = asyncio.Lock()
    output_topics = (settings.topic_rollups, settings.topic_sampled, settings.topic_anomalies, settings.topic_dlq)

    async def send_all(out: Outputs) -> None:
        """Changelog records, then outputs, handed to the aiokafka producer as one record
        batch per partition (batch_producer); faust flushes it before every offset commit."""
        async with send_lock:  # one batch's records reach the accumulator before the next's
            await _send_all(out)

    async def _send_all(out: Outputs) -> None:
        producer = app.producer._ensure_producer()
        await refresh_partition_counts(producer, output_topics)
        pending, state.pending = state.pending, []
        add, add_keyed = outgoing.add, outgoing.add_keyed
        for partition, key, value in pending:
            add(changelog, partition, key, value)
        # Outputs keyed by client go to the partition number their client's events arrive on
        # (the source is keyed by client_id): every record of one key lands in one partition,
        # as compaction and per-key order need, without hashing each key (murmur2 in pure
        # Python cost ~4 us a record). Unknown client (a delta before any state): murmur2.
        client_partition = processor.client_partition
        for topic, records, encoder in ((settings.topic_rollups, out.rollups, encode_rollup),
                                        (settings.topic_sampled, out.sampled, encode_sampled),
                                        (settings.topic_anomalies, out.anomalies, encode_anomaly)):
            if not records:
                continue
            n = partitions_of(topic)
            rollups = topic == settings.topic_rollups
            for r in records:
                client = r["client_id"]
                key = (f"{client}\x1f{r['department']}\x1f{r['api_key_id']}\x1f{r['model']}\x1f{r['window_start']}".encode()
                       if rollups else client.encode())
                value = encoder(r)
                p = client_partition(client)
                if p is None:
                    add_keyed(topic, key, value, cache=not rollups)
                else:
                    add(topic, p % n, key, value)
        for key, value, reason, p, offset in out.dlq:
            headers = [("reason", reason.encode()), ("source_topic", settings.topic_usage.encode()),
                       ("source_partition", str(p).encode()), ("source_offset", str(offset).encode())]
            if key is None:
                add(settings.topic_dlq, p % partitions_of(settings.topic_dlq), key, value, headers)
            else:
                add_keyed(settings.topic_dlq, key, value, headers)
        by_tp = outgoing.by_tp
        outgoing.clear()
        if by_tp:
            await send_records(producer, by_tp, lambda fut: fut.add_done_callback(fatal_if_failed))

    @app.task
    async def quiet_logs() -> None:
        # aiokafka logs a debug record per produced message; at our rates that alone costs
        # ~10% of the worker's CPU when a handler enables DEBUG.
        for name in ("aiokafka", "aiokafka.producer", "aiokafka.consumer"):
            logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))

    async def handle_batch(batch) -> None:
        """One fetched batch of source records (all partitions): process, close windows,
        hand changelog and outputs to the producer. Acked by the consumer afterwards."""
        out = Outputs()
        for tp, records in batch:
            processor.process_records(tp.partition, records, out)
        processor.end_batch(out)
        await send_all(out)

    # The source topic is subscribed through the conductor like an agent's would be, but
    # its records reach handle_batch in whole fetched batches (see batch_consumer).
    app.topics.add(source)
    app.consumer.batch_topic = settings.topic_usage
    app.consumer.batch_handler = handle_batch
    app.consumer.fetch_timeout = settings.worker_batch_seconds

    @app.timer(max(0.2, min(1.0, settings.idle_timeout_seconds / 2)))
    async def idle_sweep():
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            return  # windows restored half-way must not be indexed (or emitted) yet
        out = Outputs()
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_usage}
        processor.idle_sweep(out, owned)
        if out.rollups or out.anomalies or state.pending:
            await send_all(out)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_, revoked, **kwargs) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == settings.topic_usage}
        if parts:
            # Only the derived indexes: faust itself drops the store's keys of partitions
            # that are not re-assigned (and does not re-read those that are).
            processor.drop_partitions(parts, drop_state=False)

    def owned_source_partitions() -> list:
        return [tp for tp in app.consumer.assignment() if tp.topic == settings.topic_usage]

    def consumer_lag(tps) -> int:
        """Records behind the high watermark, summed over the owned source partitions."""
        lag = 0
        consumer = app.consumer
        for tp in tps:
            try:
                high = consumer.highwater(tp)
                read = consumer._read_offset.get(tp)  # faust's own bookkeeping (see batch_consumer)
                position = read + 1 if read is not None else (consumer._committed_offset.get(tp) or 0)
            except Exception:
                continue
            if high is not None:
                lag += max(high - position, 0)
        return lag

    @app.page("/metrics")
    async def metrics(web, request):
        c = processor.counters
        lines = [f"tokenaudit_worker_{name}_total {value}" for name, value in vars(c).items()]
        tps = owned_source_partitions()
        # copies dropped, ever, on the owned partitions: from their meta records (survives restarts)
        lines.append(f"tokenaudit_worker_duplicates_total {processor.duplicates({tp.partition for tp in tps})}")
        lines.append(f"tokenaudit_worker_consumer_lag {consumer_lag(tps)}")
        lines.append(f"tokenaudit_worker_state_keys {len(processor.state.data)}")
        # live Python objects' blocks: flat while RSS creeps means allocator fragmentation, not a leak
        lines.append(f"tokenaudit_worker_python_allocated_blocks {sys.getallocatedblocks()}")
        return web.text("\n".join(lines) + "\n", content_type="text/plain")

    return app


def run_worker(settings, loglevel: str = "warning") -> None:
    """Run the worker in the foreground until SIGTERM/SIGINT (graceful: flush, commit, leave)."""
    from faust.worker import Worker

    partitions = ensure_worker_topics(settings)
    app = create_app(settings, partitions)
    # The worker keeps millions of long-lived, acyclic objects (window state: lists of scalars)
    # and allocates a dict per event; with the default thresholds the cyclic GC kept walking
    # them. Rarer collections measured 26-28k -> 28.5-30.3k events/s on the backfill shape of
    # bench_stream_throughput, with the live Python blocks still flat on bench_stream_memory
    # (young cycles from asyncio/faust are still collected by the first two generations).
    gc.set_threshold(50_000, 20, 1000)
    Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()


def main() -> None:
    from tokenaudit.settings import get_settings

    run_worker(get_settings())


if __name__ == "__main__":  # pragma: no cover
    main()
