"""Produce a handled batch's records through aiokafka's batch API (``create_batch`` /
``send_batch``), one record batch per topic-partition.

Why: ``producer.send`` per record costs a future, a done callback, a partitioner call and
an accumulator lookup each (profiled: the worker's per-record sends took more CPU than
the processing). A ``BatchBuilder`` appends records in C and yields one future per batch.
Semantics kept: records of one partition go out in the order given (the changelog meta
record stays last), batches go into the same producer accumulator that faust flushes
before it commits offsets, and every record of one key goes to one partition (the caller
names it, or ``add_keyed`` picks aiokafka's default for the key, murmur2 as ``send``
would), so compaction and per-key order hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from aiokafka.structs import RecordMetadata

#: Kafka record headers, as aiokafka takes them
Headers = list[tuple[str, bytes]]
Record = tuple[bytes | None, bytes | None, Headers | None]  # key, value, headers


class PartitionedRecords:
    """Records grouped by (topic, partition), in the order added."""

    def __init__(self, partitions_of: Callable[[str], int]) -> None:
        self.by_tp: dict[tuple[str, int], list[Record]] = {}
        self._partitions_of = partitions_of
        self._key_cache: dict[tuple[str, bytes], int] = {}

    def add(
        self, topic: str, partition: int, key: bytes | None, value: bytes | None, headers: Headers | None = None
    ) -> None:
        tp = (topic, partition)
        records = self.by_tp.get(tp)
        if records is None:
            records = self.by_tp[tp] = []
        records.append((key, value, headers))

    def add_keyed(
        self, topic: str, key: bytes, value: bytes | None, headers: Headers | None = None, cache: bool = False
    ) -> None:
        """``cache``: the key repeats (client ids), remember its partition."""
        partition = self._key_cache.get((topic, key)) if cache else None
        if partition is None:
            partition = (murmur2(key) & 0x7FFFFFFF) % self._partitions_of(topic)
            if cache:
                if len(self._key_cache) > 200_000:
                    self._key_cache.clear()
                self._key_cache[(topic, key)] = partition
        self.add(topic, partition, key, value, headers)

    def clear(self) -> None:
        self.by_tp = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_tp.values())


async def send_records(
    producer: AIOKafkaProducer,
    by_tp: dict[tuple[str, int], list[Record]],
    on_future: Callable[[asyncio.Future[RecordMetadata]], None],
) -> None:
    """Hand every record to ``producer`` (an aiokafka AIOKafkaProducer); returns once all
    are in its accumulator (not yet delivered: a flush waits for that)."""

    async def one_tp(topic: str, partition: int, records: Iterable[Record]) -> None:
        batch = producer.create_batch()
        for key, value, headers in records:
            while batch.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                if batch.record_count() == 0:
                    raise ValueError(f"record of {len(value or b'')} bytes exceeds the producer batch size")
                on_future(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
        if batch.record_count():
            on_future(await producer.send_batch(batch, topic, partition=partition))

    await asyncio.gather(*(one_tp(t, p, recs) for (t, p), recs in by_tp.items()))
