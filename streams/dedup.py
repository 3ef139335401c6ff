"""Each event counted once: the ids of the events each window counts, and their durable form.

While a window is open (and after it closed, until its close is committed) the 16-byte ids of
its events are held in one bytearray per window (a set of ints costs ~85 bytes an id; a
window's ids are searched with one C ``find``); a copy of an event the window counts is
dropped. Their durable form is one *id chunk* per partition and batch (the batch's new ids
grouped by window), written after the batch's window records and before its meta record, and
tombstoned once every window it names is closed and that is committed; a restore rebuilds
the ids from the chunks. Why not a changelog record per event (twice the records) or the ids
inside the window value (a busy window's value rewritten with all its ids on every batch:
quadratic changelog bytes): see the README.

The per-event check itself is inlined in the processor's hot loop over these structures.
"""

from __future__ import annotations

import binascii
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from tokenaudit.schemas.event_ids import ID_BYTES, pack_ids, unpack_ids
from tokenaudit.streams.state import State
from tokenaudit.streams.state_keys import chunk_key
from tokenaudit.streams.window_state import Window

log = logging.getLogger("tokenaudit.worker")

# An id chunk holds at most this many ids (~350 KB of base64): one changelog record must stay
# well inside the producer's 1 MiB batch.
CHUNK_MAX_IDS = 16384
# A rollup carries at most this many ids (~700 KB of base64) for the same reason; a window
# with more events (one client, department, key and model past 32k requests in one window)
# still counts each event once while it is open, but late copies of the ids left out of its
# row are not recognised by the sink (logged once).
ROLLUP_MAX_IDS = 32768
_b2a = binascii.b2a_base64


class EventIds:
    def __init__(self, state: State, enabled: bool):
        self.state = state
        self.enabled = enabled
        self.window_ids: dict[str, bytearray] = {}
        self.batch_ids: dict[int, dict[str, int]] = {}  # p -> {wkey: where this batch's new ids start}
        self.batch_chunk: dict[int, list[int]] = {}  # p -> [first offset with a new id, max window end]
        self.chunks: dict[
            int, dict[str, list[Any]]
        ] = {}  # p -> {chunk key: [max window end, closed at offset or None]}
        # p -> (closing offset, wkey) of closed windows holding ids, in closing order (windows
        # close in offset order; ids restored after a crash are queued first, or behind, which
        # only delays their release)
        self.id_holders: dict[int, deque[tuple[int, str]]] = {}
        self._warned_big_window = False

    def restore(self, p: int, chunk_keys: list[str], by_first: dict[int, str], resumed: int | None, last: int) -> None:
        """Rebuild the ids of a partition's windows from its id chunks. A chunk beyond the
        meta record's ``last`` offset was written by a batch whose meta record was lost, and is
        discarded: that batch is processed again and makes the same chunk."""
        data, window_ids = self.state.data, self.window_ids
        chunks = self.chunks.setdefault(p, {})
        holding: list[tuple[int, str]] = []
        for ckey in sorted(chunk_keys, key=lambda k: self.state.get(k)[0]):
            first, max_end, packed, index = self.state.get(ckey)
            if first > last or not self.enabled:
                self.state.delete(ckey)  # a lost batch's chunk (or dedup switched off): redone
                continue
            chunks[ckey] = [max_end, None]
            blob = unpack_ids(packed)
            at = 0
            for k in range(0, len(index), 2):
                win_first, count = index[k], index[k + 1]
                run = blob[at : at + ID_BYTES * count]
                at += ID_BYTES * count
                wkey = by_first.get(win_first)
                if wkey is None:
                    continue  # retired window
                w: Window = data[wkey]
                if w.closed_at >= 0 and resumed is not None and max(w.applied_offset, w.closed_at) < resumed:
                    continue  # closed and committed: never emitted again, its ids are not needed
                ids = window_ids.get(wkey)
                if ids is None:
                    ids = window_ids[wkey] = bytearray()
                    if w.closed_at >= 0:
                        holding.append((w.closed_at, wkey))
                ids += run
        self.id_holders.setdefault(p, deque()).extend(sorted(holding))

    def write_chunks(self, last_offset: Callable[[int], int]) -> None:
        """One id chunk per partition for this batch's new ids (split when large); the State
        writes chunks after the batch's window records and before its meta record.

        A chunk is ``[first offset, max window end, packed ids, [window first offset, count, ...]]``:
        the batch's new ids back to back, then which window each run of them belongs to (one
        base64 string and one flat int list, whatever the number of windows)."""
        data, window_ids = self.state.data, self.window_ids
        limit = ID_BYTES * CHUNK_MAX_IDS
        for p, new in self.batch_ids.items():
            if not new:
                continue
            first, max_end = self.batch_chunk[p]
            last = last_offset(p)
            pieces: list[tuple[bytearray, list[int]]] = []
            blob = bytearray()
            index: list[int] = []
            for wkey, pos in new.items():
                w, ids = data.get(wkey), window_ids.get(wkey)
                if w is None or ids is None:
                    continue
                while pos < len(ids):
                    take = min(len(ids) - pos, limit - len(blob))
                    blob += ids[pos : pos + take]
                    index += (w.first_offset, take // ID_BYTES)
                    pos += take
                    if len(blob) >= limit:
                        pieces.append((blob, index))
                        blob, index = bytearray(), []
            if blob:
                pieces.append((blob, index))
            chunks = self.chunks.setdefault(p, {})
            for n, (blob, index) in enumerate(pieces):
                ckey = chunk_key(p, first, last, n)
                self.state.put(p, ckey, [first, max_end, pack_ids(blob), index])
                chunks[ckey] = [max_end, None]
            new.clear()
            self.batch_chunk[p] = [-1, 0]

    def release(self, p: int, horizon: int, last: int, committed: int) -> None:
        """Drop the ids of windows whose close is committed (never emitted again, and every
        later event of theirs is a delta), and tombstone the chunks that only name such
        windows: a replay from the committed offset never looks them up. ``horizon``: the
        watermark less the grace (windows ending at or before it are closed)."""
        holders = self.id_holders.get(p)
        while holders and holders[0][0] < committed:
            self.window_ids.pop(holders.popleft()[1], None)
        chunks = self.chunks.get(p)
        if not chunks:
            return
        for ckey, entry in list(chunks.items()):
            if entry[1] is None:
                if entry[0] <= horizon:
                    entry[1] = last  # every window it names closed at or before this offset
            elif entry[1] < committed:
                self.state.delete(ckey)
                del chunks[ckey]

    def closed(self, p: int, at: int, wkey: str) -> None:
        """A window holding ids closed at offset ``at``: its ids go once that is committed."""
        if wkey in self.window_ids:
            holders = self.id_holders.get(p)
            if holders is None:
                holders = self.id_holders[p] = deque()
            holders.append((at, wkey))

    def packed(self, wkey: str, ids: bytearray) -> str:
        """A window's ids for its rollup (the first :data:`ROLLUP_MAX_IDS` of them)."""
        if len(ids) > ID_BYTES * ROLLUP_MAX_IDS:
            if not self._warned_big_window:
                self._warned_big_window = True
                log.warning(
                    "window %r has %d events: its rollup carries the ids of the first %d only "
                    "(late copies of the others would be counted)",
                    wkey,
                    len(ids) // ID_BYTES,
                    ROLLUP_MAX_IDS,
                )
            ids = ids[: ID_BYTES * ROLLUP_MAX_IDS]
        return _b2a(ids, newline=False).decode("ascii")  # = pack_ids, one call less

    def drop(self, p: int, wkeys: Iterable[str]) -> None:
        """Forget a partition this worker no longer owns (its windows ``wkeys``)."""
        for wkey in wkeys:
            self.window_ids.pop(wkey, None)
        for index in (self.chunks, self.id_holders, self.batch_ids, self.batch_chunk):
            index.pop(p, None)
