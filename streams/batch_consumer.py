"""A faust (aiokafka driver) Consumer that hands each fetched batch of one topic to a handler.

Why: faust's per-event path (a Message and an Event per record, a ``wait_first`` with two
tasks per record in the fetcher, a queue hop into the stream, per-event sensors and acks)
cost more CPU than our whole processing (profiled on bench_stream_throughput: the event
loop machinery alone ran ~5 asyncio callbacks per record). Everything else stays faust:
the same consumer thread, subscription, partition assignment, Table changelog recovery
(changelog records still take faust's per-message path), rebalance flow and the commit
machinery. The only change is how the batch topic's records are delivered and acked:

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
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.utils.futures import notify

BatchHandler = Callable[[list[tuple[TP, list[Any]]]], Awaitable[None]]


class _InFlight:
    """Stands for a batch in the consumer's unacked set (``wait_empty`` reads ``acked``)."""

    __slots__ = ("acked", "refcount", "__weakref__")

    def __init__(self) -> None:
        self.acked = False
        self.refcount = 1


class BatchConsumer(faust_aiokafka.Consumer):
    batch_topic: str | None = None
    batch_handler: BatchHandler | None = None
    fetch_timeout: float = 1.0  # longest wait of one fetch when no records are buffered

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - exercised end to end
        if self.batch_topic is None or self.batch_handler is None:
            return await super()._drain_messages(fetcher)
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        prefetch: asyncio.Task | None = None
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
                        self.log.warning(f"exception performing seek when flow not active {exc}")
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

    async def _deliver(self, records, active, generation: int) -> None:
        app = self.app
        if app.consumer_generation_id != generation:
            return  # fetched before a rebalance that has happened since: read again after its seek
        topic = self.batch_topic
        read_offset = self._read_offset
        acks_for = app.topics.acks_enabled_for
        batch: list[tuple[TP, list[Any]]] = []
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
        marker = _InFlight()
        self._unacked_messages.add(marker)
        try:
            await self.batch_handler(batch)
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

    async def _add_gaps(self, tp: TP, r_offset: int | None, recs: list) -> None:
        """Offsets missing from the fetched run (transaction markers, compaction) are gaps
        the commit may pass over, as faust's per-message loop records them."""
        prev = r_offset
        if prev is not None and recs[-1].offset - prev == len(recs):
            return  # contiguous after the last read offset: the common case
        for r in recs:
            if prev and r.offset - prev > 1:
                await self._add_gap(tp, prev + 1, r.offset)
            prev = r.offset

    def _ack_all(self, tp: TP, recs: list) -> None:
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

    async def _deliver_one_by_one(self, tp: TP, recs: list, generation: int) -> None:
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


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer
