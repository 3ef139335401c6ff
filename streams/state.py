"""Keyed, partitioned worker state with a dirty set, flushed once per batch.

The processor reads and writes plain Python values through :class:`State`; what backs it is
a detail: :class:`MemoryState` in unit tests, the faust Table in the worker
(:class:`tokenaudit.streams.changelog.TableState`), whose changelog topic makes it survive a crash.
Every value carries the source offset that last changed it, so replays are idempotent
(see :mod:`tokenaudit.streams.processor`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tokenaudit.streams.state_keys import CHUNK_PREFIX, META_PREFIX
from tokenaudit.streams.window_state import state_value_for_changelog


class State:
    """A mapping key -> JSON-able value, each key belonging to one source partition."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.key_partition: dict[str, int] = {}
        self.dirty: dict[str, int] = {}  # key -> partition, written at the next flush
        self.deleted: dict[str, int] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.data[key] = value
        self.key_partition[key] = partition
        self.dirty[key] = partition
        self.deleted.pop(key, None)

    def touch(self, key: str) -> None:
        """Mark an in-place mutated value for the next flush."""
        self.dirty[key] = self.key_partition[key]

    def delete(self, key: str) -> None:
        partition = self.key_partition.pop(key, None)
        if self.data.pop(key, None) is not None and partition is not None:
            self.deleted[key] = partition
        self.dirty.pop(key, None)

    def keys_of(self, partition: int) -> Iterator[str]:
        return (k for k, p in list(self.key_partition.items()) if p == partition)

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        """Forget (locally) the keys of partitions this worker no longer owns."""
        gone = set(partitions)
        for key in [k for k, p in self.key_partition.items() if p in gone]:
            self.data.pop(key, None)
            self.key_partition.pop(key, None)
            self.dirty.pop(key, None)
            self.deleted.pop(key, None)

    def flush(self) -> int:
        """Persist dirty keys and deletions; returns how many writes were made."""
        n = len(self.dirty) + len(self.deleted)
        metas, chunks = [], []
        for key, partition in self.dirty.items():
            if key.startswith(META_PREFIX):
                metas.append((key, partition))
            elif key.startswith(CHUNK_PREFIX):
                chunks.append((key, partition))
            else:
                self._write(partition, key, self.data[key])
        for key, partition in self.deleted.items():
            self._write(partition, key, None)
        # Id chunks after the windows: a restored chunk implies the windows it names were
        # restored with the counts of its events.
        for key, partition in chunks:
            self._write(partition, key, self.data[key])
        # The partition's meta record (watermark, last offset) goes last: a changelog
        # partition is appended in order, so a restored meta implies every other write of
        # its batch was restored too, and replays re-make the same event-time decisions.
        for key, partition in metas:
            self._write(partition, key, self.data[key])
        self.dirty.clear()
        self.deleted.clear()
        return n

    def _write(self, partition: int, key: str, value: Any) -> None:
        """Durable write (a changelog record); in-memory state has nothing to do."""


class MemoryState(State):
    """State for unit tests; records what a durable store would have been sent."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, str, Any]] = []

    def _write(self, partition: int, key: str, value: Any) -> None:
        import copy

        # what the changelog holds (a window as its list), so persisted() restores as recovery does
        self.writes.append((partition, key, copy.deepcopy(state_value_for_changelog(value))))

    def persisted(self) -> MemoryState:
        """A fresh state rebuilt from the writes so far, as recovery after a crash would."""
        fresh = MemoryState()
        for partition, key, value in self.writes:
            if value is None:
                fresh.data.pop(key, None)
                fresh.key_partition.pop(key, None)
            else:
                fresh.data[key] = __import__("copy").deepcopy(value)
                fresh.key_partition[key] = partition
        fresh.writes = list(self.writes)
        return fresh
