"""Every use of faust's and aiokafka's private internals, in one module.

faust-streaming and aiokafka are pinned to exact versions in pyproject.toml because of what is
here: the worker hands whole fetched batches to its handler (a faust Consumer subclass that
replaces ``_drain_messages``), keeps faust's commit bookkeeping in step for them, reads
faust's committed and read offsets, writes its Table's store in place and sends through the
aiokafka producer in record batches. Each of those needs an attribute with a leading
underscore. They are listed in :data:`PRIVATE_API`; :func:`check_private_api` looks each of
them up (the worker does at start, tests/test_faust_compat.py in the suite), so an upgrade
that removes or renames one fails loudly, naming it, instead of misbehaving at run time.
Nothing outside this module touches a private faust or aiokafka name.

The batch consumer, and why: faust's per-event path (a Message and an Event per record, a
``wait_first`` with two tasks per record in the fetcher, a queue hop into the stream,
per-event sensors and acks) cost more CPU than our whole processing (profiled on
bench_stream_throughput: the event loop machinery alone ran ~5 asyncio callbacks per
record). Everything else stays faust: the same consumer thread, subscription, partition
assignment, Table changelog recovery (changelog records still take faust's per-message
path), rebalance flow and the commit machinery. The only change is how the batch topic's
records are delivered and acked:

* records of the batch topic from one ``getmany`` (at most ``broker_max_poll_records``)
  go to ``handler(batch)`` as ``[(tp, [aiokafka ConsumerRecord, ...]), ...]``;
* they are acked (faust's ``_acked`` bookkeeping, the same data ``ack()`` writes) only
  after the handler returned, i.e. after its outputs and changelog records were handed to
  the producer, which faust flushes before it commits; a batch that overlapped a
  rebalance is not acked at all (its records are read again: replays are idempotent);
* while the handler runs, a placeholder sits in the consumer's unacked set, so a
  rebalance's ``wait_empty`` waits for the batch (as it waits for stream events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import ServiceT
from mode.utils.futures import notify

from tokenaudit.errors import IncompatibleDependency

if TYPE_CHECKING:
    from tokenaudit.streams.processor import Processor

#: (what, attribute, why): every private faust/aiokafka name this module uses. ``what`` is where
#: :func:`check_private_api` looks it up: ``consumer`` (an instance of faust's aiokafka
#: Consumer), ``store`` (a Table's memory store), ``producer`` (faust's aiokafka Producer),
#: ``client`` (aiokafka's AIOKafkaClient class), ``app`` (faust.App), ``fetcher`` (faust's Fetcher).
PRIVATE_API: tuple[tuple[str, str, str], ...] = (
    ("consumer", "_drain_messages", "replaced: whole fetched batches to one handler"),
    ("consumer", "_wait_next_records", "one fetch (getmany) with the consumer thread"),
    ("consumer", "_stopped", "the consumer's stop flag in the drain loop"),
    ("consumer", "_read_offset", "offsets handed out (skip re-read records; consumer lag)"),
    ("consumer", "_buffered_partitions", "partitions with buffered records, as faust's own loop checks"),
    ("consumer", "_add_gap", "offset gaps the commit may pass over"),
    ("consumer", "_unacked_messages", "a batch in flight holds back a rebalance's wait_empty"),
    ("consumer", "_waiting_for_ack", "wakes wait_empty once a batch is acked"),
    ("consumer", "_committed_offset", "what faust committed: windows retire below it; lag"),
    ("consumer", "_acked", "acked offsets, the commit's input (bulk ack of a batch)"),
    ("consumer", "_acked_index", "acked offsets as a set (no double ack)"),
    ("consumer", "_to_message", "faust's per-message path for other topics (changelog recovery)"),
    ("consumer", "_commit_every", "faust's per-message commit cadence on that path"),
    ("consumer", "_n_acked", "faust's per-message commit counter on that path"),
    ("fetcher", "_stopped", "the fetcher's stop flag in the drain loop"),
    ("app", "_new_transport", "replaced: the transport that makes our consumer"),
    ("store", "_key_partition", "each state key's source partition (changelog records per key)"),
    ("producer", "_ensure_producer", "the aiokafka producer under faust's, for record batches"),
    ("client", "_wait_on_metadata", "partition counts of the output topics"),
)


def committed_offset(consumer: faust_aiokafka.Consumer, tp: TP) -> int | None:
    """faust's record of what it committed (the next offset to read) for ``tp``."""
    return consumer._committed_offset.get(tp)


def read_offset(consumer: faust_aiokafka.Consumer, tp: TP) -> int | None:
    """The last offset faust (or the batch consumer) handed out for ``tp``."""
    return consumer._read_offset.get(tp)


def key_partitions(table: faust.Table[str, Any]) -> dict[str, int]:
    """The Table's store's key -> source partition map (faust keeps it for changelog records)."""
    # faust types Table.data as its StoreT interface, which does not declare the private map
    key_partition: dict[str, int] = table.data._key_partition  # type: ignore[attr-defined]
    return key_partition


def store_dict(table: faust.Table[str, Any]) -> dict[str, Any]:
    """The Table's memory store's dict: one object for the store's lifetime (cleared and
    updated in place, never replaced). Public attribute, kept here beside its twin above."""
    data = table.data.data
    if not isinstance(data, dict):  # typed as a MutableMapping; the memory store's is a dict
        raise IncompatibleDependency(f"faust's memory store holds a {type(data).__name__}, not a dict")
    return data


def aiokafka_producer(app: faust.App) -> AIOKafkaProducer:
    """The aiokafka producer under faust's producer (started with the app)."""
    # faust types app.producer as its ProducerT interface, which does not declare the private method
    producer: AIOKafkaProducer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    return producer


async def partitions_for(producer: AIOKafkaProducer, topic: str) -> int:
    """The partition count of ``topic``, from the producer's metadata (refreshed for it)."""
    await producer.client._wait_on_metadata(topic)
    return len(producer.client.cluster.partitions_for_topic(topic))


def check_private_api(app: faust.App | None = None) -> None:
    """Look up every name in :data:`PRIVATE_API`; :class:`IncompatibleDependency` naming the
    missing ones (and the versions pinned) if an upgrade removed or renamed any. Builds no
    connection: the objects are only constructed."""
    from aiokafka.client import AIOKafkaClient

    app = app or faust.App(
        "tokenaudit-compat-check", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False
    )
    consumer = app.consumer
    owners = {
        "consumer": consumer,
        "app": faust.App,
        "client": AIOKafkaClient,
        "producer": app.producer,
        "store": app.Table("tokenaudit-compat-check", default=None).data,
        "fetcher": faust.transport.consumer.Fetcher(app),
    }
    missing = [f"{what}.{name} ({why})" for what, name, why in PRIVATE_API if not hasattr(owners[what], name)]
    if missing:
        raise IncompatibleDependency(
            f"the installed faust-streaming {_version('faust-streaming')} / aiokafka {_version('aiokafka')} lack "
            f"internals the worker relies on: {'; '.join(missing)}. Install the versions pinned in "
            "pyproject.toml, or port streams/faust_compat.py to the new ones"
        )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(not installed)"


class WorkerApp(faust.App):
    """faust.App whose consumer delivers the source topic in whole batches (BatchConsumer)."""

    #: the worker's processor (tests and the metrics page read it)
    tokenaudit_processor: Processor | None = None

    def _new_transport(self) -> BatchTransport:
        return BatchTransport(self.conf.broker_consumer, self)


BatchHandler = Callable[[list[tuple[TP, list[ConsumerRecord[bytes, bytes]]]]], Awaitable[None]]


class _InFlight:
    """Stands for a batch in the consumer's unacked set (``wait_empty`` reads ``acked``)."""

    __slots__ = ("__weakref__", "acked", "refcount")

    def __init__(self) -> None:
        self.acked = False
        self.refcount = 1


class BatchConsumer(faust_aiokafka.Consumer):
    batch_topic: str | None = None
    batch_handler: BatchHandler | None = None
    fetch_timeout: float = 1.0  # longest wait of one fetch when no records are buffered

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover - exercised end to end
        if self.batch_topic is None or self.batch_handler is None:
            return await super()._drain_messages(fetcher)
        consumer_should_stop = self._stopped.is_set
        # faust passes its Fetcher, typed as the ServiceT interface, which does not declare _stopped
        fetcher_should_stop = fetcher._stopped.is_set  # type: ignore[attr-defined]
        prefetch: asyncio.Future[tuple[Any, Any, int]] | None = None
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                if prefetch is None:
                    records, active, generation = await self._next_records()
                else:
                    records, active, generation = await prefetch
                    prefetch = None
                await self.sleep(0)
                if records is None or self.should_stop:
                    continue
                if not self.flow_active:
                    try:
                        await self.perform_seek()  # as faust's getmany does
                    except Exception as exc:
                        self.log.warning("exception performing seek when flow not active %s", exc)
                    continue
                if records:
                    # Fetch the next batch while this one is handled: the fetch round trip and
                    # the record unpacking in the consumer thread overlap with processing
                    # (without it the worker sat waiting for fetches ~30% of the time).
                    prefetch = asyncio.ensure_future(self._next_records())
                await self._deliver(records, active, generation)
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)
            if prefetch is not None:
                prefetch.cancel()
                await asyncio.gather(prefetch, return_exceptions=True)

    async def _next_records(self) -> tuple[Any, Any, int]:
        """One fetch, with the consumer generation it came back in (as faust's own loop reads
        it: after the fetch returned)."""
        records, active = await self._wait_next_records(self.fetch_timeout)
        return records, active, self.app.consumer_generation_id

    async def _deliver(
        self, records: Mapping[TP, list[ConsumerRecord[bytes, bytes]]], active: set[TP] | None, generation: int
    ) -> None:
        app = self.app
        if app.consumer_generation_id != generation:
            return  # fetched before a rebalance that has happened since: read again after its seek
        topic = self.batch_topic
        read_offset = self._read_offset
        acks_for = app.topics.acks_enabled_for
        batch: list[tuple[TP, list[ConsumerRecord[bytes, bytes]]]] = []
        for tp, recs in records.items():
            if not (active is None or tp in active or tp in self._buffered_partitions):
                continue
            app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            r_offset = read_offset[tp]
            if r_offset is not None and recs and recs[0].offset < r_offset:
                recs = [r for r in recs if r.offset >= r_offset]
            if not recs:
                continue
            if tp.topic != topic:
                await self._deliver_one_by_one(tp, recs, generation)
                continue
            if acks_for(tp.topic):
                await self._add_gaps(tp, r_offset, recs)
            batch.append((tp, recs))
        if not batch:
            return
        handler = self.batch_handler
        if handler is None:  # _drain_messages delivers batches only with a handler set
            raise RuntimeError("a batch to deliver and no batch handler")
        # A stand-in for the batch among faust's unacked Messages: wait_empty only reads .acked
        marker: Any = _InFlight()
        self._unacked_messages.add(marker)
        try:
            await handler(batch)
        finally:
            marker.acked = True
            self._unacked_messages.discard(marker)
            notify(self._waiting_for_ack)
        if not self.flow_active or app.consumer_generation_id != generation:
            return  # a rebalance overlapped the batch: leave it unacked, it is read again
        now = monotonic()
        for tp, recs in batch:
            self._ack_all(tp, recs)
            read_offset[tp] = recs[-1].offset
            app.monitor.stream_inbound_time[tp] = now
        # No commit here every ``broker_commit_every`` acks, as faust's per-message loop does:
        # faust's timer commits every ``broker_commit_interval`` without stopping this loop,
        # while a commit awaited here (producer flush + offset commit) stalled fetching and
        # processing for ~6% of the time (bench_stream_throughput).

    async def _add_gaps(self, tp: TP, r_offset: int | None, recs: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Offsets missing from the fetched run (transaction markers, compaction) are gaps
        the commit may pass over, as faust's per-message loop records them."""
        prev = r_offset
        if prev is not None and recs[-1].offset - prev == len(recs):
            return  # contiguous after the last read offset: the common case
        for r in recs:
            if prev and r.offset - prev > 1:
                await self._add_gap(tp, prev + 1, r.offset)
            prev = r.offset

    def _ack_all(self, tp: TP, recs: list[ConsumerRecord[bytes, bytes]]) -> None:
        """What ``Consumer.ack`` records for each message, for a whole run at once."""
        committed = self._committed_offset[tp]
        offsets = [r.offset for r in recs]
        if committed is not None and offsets[0] < committed:
            offsets = [o for o in offsets if o >= committed]
        index = self._acked_index[tp]
        if index:
            offsets = [o for o in offsets if o not in index]
        if not offsets:
            return
        index.update(offsets)
        self._acked[tp].extend(offsets)
        notify(self._waiting_for_ack)

    async def _deliver_one_by_one(self, tp: TP, recs: list[ConsumerRecord[bytes, bytes]], generation: int) -> None:
        """faust's own path (Table changelogs during recovery, any other topic)."""
        callback = self.callback
        to_message = self._to_message
        acks_enabled = self.app.topics.acks_enabled_for(tp.topic)
        for record in recs:
            if not self.flow_active or self.app.consumer_generation_id != generation:
                return
            r_offset = self._read_offset[tp]
            if r_offset is not None and record.offset < r_offset:
                continue
            if r_offset and record.offset - r_offset > 1 and acks_enabled:
                await self._add_gap(tp, r_offset + 1, record.offset)
            commit_every = self._commit_every
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            await self.wait_first(callback(to_message(tp, record)), self.suspend_flow.wait())
            self._read_offset[tp] = record.offset


def batch_consumer(app: faust.App) -> BatchConsumer:
    """The app's consumer, which a WorkerApp makes a BatchConsumer (faust types it as ConsumerT)."""
    consumer = app.consumer
    if not isinstance(consumer, BatchConsumer):
        raise IncompatibleDependency(f"the worker's consumer is a {type(consumer).__name__}, not a BatchConsumer")
    return consumer


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer
