"""The worker's state in a faust Table, written to its changelog as JSON the way faust reads
it back at recovery (keys and values byte-compatible with every release so far).

How the Table is used, and why: events arrive in batches (one fetch, delivered by the batch
consumer in :mod:`tokenaudit.streams.faust_compat`, acked only after the batch was handled),
so faust's ``table[key] = value`` would write every key's changelog record to the partition of
the *last* event of the batch, not the key's own. The processor therefore mutates the Table's
store in place and, once per batch, sends one changelog record per changed key with the key's
source partition. faust flushes the producer (changelog and outputs) before it commits source
offsets, so state on disk is never behind a committed offset; it may be ahead of it after a
SIGKILL, which the per-key offsets inside each value absorb. Measured on this stack: a plain
``table[k] += 1`` counter over-counted (501 of 500) across one restart, which is why the
offsets live in the values.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tokenaudit.streams import faust_compat
from tokenaudit.streams.state import State
from tokenaudit.streams.window_state import state_value_for_changelog

if TYPE_CHECKING:
    import faust

# Keys exactly as json.dumps writes them (ASCII-escaped): compaction compares key bytes, so
# they must not change between versions. Values: the json module's C encoder, set up once.
# (orjson writes values ~6x faster, but measured on bench_stream_memory it raised the worker's
# RSS by 100-300 MB after a burst of 100k window closes, and made it keep growing.)
_json_key = json.encoder.encode_basestring_ascii  # == json.dumps(str)
# The C encoder JSONEncoder(separators=(",", ":")).encode builds on every call, made once
# (~1 us less per changelog record; same output, tested). No circular-reference check:
# state values are flat lists of scalars.
_json_chunks = json.encoder.c_make_encoder(  # type: ignore[attr-defined]  # CPython's C encoder, not in typeshed
    None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
)


def _json_value(value: Any) -> str:
    return "".join(_json_chunks(value, 0))


def _json_bytes_python(value: Any) -> bytes:
    return (_json_key(value) if value.__class__ is str else _json_value(value)).encode()


# The same bytes from C (streams/_fastjson.pyx, ~4x faster on state lists) when it is built.
_json_bytes: Callable[[Any], bytes] = _json_bytes_python
try:
    from tokenaudit.streams import _fastjson

    if getattr(_fastjson, "ABI_VERSION", None) == 1:  # a stale build is not used
        _json_bytes = functools.partial(_fastjson.dumps_compact, fallback=_json_bytes_python)
except ImportError:  # not built (no C compiler): the stdlib encoder above
    pass


def changelog_record(partition: int, key: str, value: Any) -> tuple[int, bytes, bytes | None]:
    """(partition, key bytes, value bytes or None for a deletion) of one state write, as faust's
    json codec reads it back during recovery (a window as its list layout)."""
    return partition, _json_key(key).encode(), None if value is None else _json_bytes(state_value_for_changelog(value))


class TableState(State):
    """:class:`State` over a faust Table's in-memory store, durable through its changelog.

    Writes are collected per flush and produced by the runtime straight through the aiokafka
    producer (faust's ``send_soon`` buffer sends one message per await, a few thousand per
    second: too slow for a changelog record per changed key per batch)."""

    def __init__(self, table: faust.Table[str, Any]) -> None:
        super().__init__()
        self.table = table
        self._data: dict[str, Any] | None = None
        self.pending: list[tuple[int, bytes, bytes | None]] = []

    @property
    def data(self) -> dict[str, Any]:
        # The memory store keeps one dict for its lifetime: hold it instead of two property
        # lookups per state access.
        d = self._data
        if d is None:
            d = self._data = faust_compat.store_dict(self.table)
        return d

    @data.setter
    def data(self, value: dict[str, Any]) -> None:  # State.__init__ assigns; the store owns the dict
        pass

    @property
    def key_partition(self) -> dict[str, int]:
        return faust_compat.key_partitions(self.table)

    @key_partition.setter
    def key_partition(self, value: dict[str, int]) -> None:
        pass

    def _write(self, partition: int, key: str, value: Any) -> None:
        self.pending.append(changelog_record(partition, key, value))
