"""The stream job's logic, free of faust: events in, rollups / sampled records / anomalies /
dead letters out, with all state in a :class:`~tokenaudit.streams.state.State`.

Why it is built this way (see DESIGN.md):

* **Event-time windows in our own state.** Per (client_id, department, api_key_id, model)
  tumbling windows keyed ``w<US>client<US>department<US>api_key_id<US>model<US>window_start``
  (attribution per event: a client that changes department mid-window is charged to each in
  turn). A partition's watermark is the largest event time seen on it; a window is *closed*
  (rollup emitted, baseline updated) once the watermark passes its end plus grace, and a
  wall-clock idle sweep emits open windows that have been quiet for ``idle_timeout_seconds``
  so quiet clients still get rows.
* **Late events are never dropped.** An event whose window has closed (or was never opened
  before the watermark passed it) is sent as a one-event *delta* rollup (``delta_id`` =
  source topic:partition:offset, ``event_ids`` = its id); the sink merges it into the stored
  row once. A closed window stays in state for ``late_retention_seconds`` only so that it
  can be emitted again after a crash.
* **Each event counted once** (:mod:`tokenaudit.schemas.event_ids`). Copies of an event
  (producer retries, spool replays) share its ``event_id`` and, keyed by client_id, its
  partition. While a window is open, the ids of its events (16 bytes each) are held in memory
  and a copy is dropped (counted in the partition's meta record, so the count survives
  restarts). Their durable form is one *id chunk* per partition and batch (``d<US>p<US>...``:
  the batch's new ids grouped by window), written after the batch's window records and before
  its meta record, and tombstoned once every window it names is closed and that is
  committed; a restore rebuilds the ids from the chunks. Rollups carry their window's packed
  id set, so the sink can skip a late delta whose event a stored row already counts (a copy
  later than the window). Why not a changelog record per event (twice the records) or the
  ids inside the window value (a busy window's value rewritten with all its ids on every
  batch: quadratic changelog bytes): see the README.
* **Poison never stops the stream.** Undecodable bytes, identifiers that break the shared rule
  (:mod:`tokenaudit.schemas.identifiers`), counts below 0 or above ``max_tokens_per_event``,
  a malformed event_id, or an event time more than ``max_clock_skew_seconds`` ahead of the
  worker's clock go to the dead-letter topic with a reason; such an event never moves a
  watermark. The clock decision is kept (offsets in the meta record) until committed, so a
  replay after a crash decides the same.
* **Exactly-once effect from at-least-once delivery.** Every state value carries the
  source offset that last changed it. A replayed event (offset <= that) changes nothing but
  re-emits its outputs, which are idempotent downstream: rollup version = the window's
  request count (monotone, and the content for a given count is fixed by partition order),
  anomaly ids are hashes of (rule, client, model, window[, department, api key]), sampled
  records are keyed by request id. Dedup decisions replay the same way: in the *replay zone*
  (offsets at or below the restored meta record's last offset) every decision is already in
  state; above it, chunks written by a batch whose meta record was lost are discarded at
  restore, so the ids held are exactly those of the events before the offset being decided.
"""

from __future__ import annotations

import logging
import math
import time
import binascii
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenaudit.schemas import EVENT, AvroDecodeError, records
from tokenaudit.schemas.compiled import compile_decoder
from tokenaudit.schemas.event_ids import ID_BYTES, derived_event_id, id_bytes, pack_ids, unpack_ids
from tokenaudit.schemas.validation import event_problem
from tokenaudit.streams import sampler
from tokenaudit.streams.state import CHUNK_PREFIX, State

log = logging.getLogger("tokenaudit.worker")

SEP = "\x1f"
_fromhex = bytes.fromhex
_b2a = binascii.b2a_base64
# An id chunk holds at most this many ids (~350 KB of base64): one changelog record must stay
# well inside the producer's 1 MiB batch.
CHUNK_MAX_IDS = 16384
# A rollup carries at most this many ids (~700 KB of base64) for the same reason; a window
# with more events (one client, department, key and model past 32k requests in one window)
# still counts each event once while it is open, but late copies of the ids left out of its
# row are not recognised by the sink (logged once).
ROLLUP_MAX_IDS = 32768

# Events as dicts with ``ts`` in int epoch ms: the native codec reads the current writer
# version in ~1.5 us (generated Python without a compiler: ~7 us; fastavro's generic reader:
# 12-18 us); older writers go through fastavro.
decode_event = compile_decoder(EVENT)
assert decode_event is not None, "the token-usage event schema is flat by contract"

# window value layout (a JSON list, small and fast to copy). CLOSED: -1 while open, else the
# source offset at which the window was closed (and its rollup emitted).
# NLAT/NIN/NCNT: the model's latency norm (per source partition) as of this window's last
# applied event, so the latency rule gives the same answer however batches were cut (live,
# after a crash, or in a fresh group's replay).
# FIRST: the source offset of the event that opened the window (unique per partition: it names
# the window in id chunks).
DEPT, REQ, ERR, IN, OUT, TOT, LSUM, LMAX, MAXIN, TRUNC, OFF, CLOSED, FIRED, NLAT, NIN, NCNT, FIRST = range(17)
# meta value layout (the partition's record, written last in each batch): watermark ms, last
# processed offset, copies dropped (ever, on this partition), offsets dead-lettered for clock
# skew that are not committed yet (so a replay decides the same whatever the clock says then)
M_WM, M_LAST, M_DUPS, M_SKEWED = range(4)
# client value layout: windows seen, EWMA mean and variance of tokens per window,
# last closed window_start, first window_start
C_N, C_MEAN, C_VAR, C_LAST, C_FIRST = range(5)
EWMA_ALPHA = 0.1  # after warm-up; before it, 1/(n+1) (the running mean and variance)
INF = math.inf


@dataclass
class Outputs:
    rollups: list[dict] = field(default_factory=list)
    sampled: list[dict] = field(default_factory=list)
    anomalies: list[dict] = field(default_factory=list)
    dlq: list[tuple[bytes | None, bytes, str, int, int]] = field(default_factory=list)  # key, value, reason, partition, offset

    def __len__(self) -> int:
        return len(self.rollups) + len(self.sampled) + len(self.anomalies) + len(self.dlq)


@dataclass
class Counters:
    """This process's counts (the copies dropped, which must survive restarts, are kept per
    partition in the meta records: :meth:`Processor.duplicates`)."""

    consumed: int = 0  # source records read (replays, copies and dead letters included)
    events: int = 0  # decodable, valid events (replays and copies included)
    counted: int = 0  # events added to a window or sent as a late delta (first time only)
    replayed: int = 0
    dead_lettered: int = 0
    late: int = 0  # events whose window had closed: sent as deltas
    rollups: int = 0
    sampled: int = 0
    anomalies: int = 0


class Processor:
    def __init__(self, settings, state: State, clock=time.monotonic, committed=None, wall_clock=time.time):
        self.s = settings
        # committed(partition) -> the group's committed offset (next to read) or None.
        self.committed = committed or (lambda p: None)
        self.state = state
        self.clock = clock  # idle timeouts (monotonic)
        self.wall_clock = wall_clock  # the clock-skew check (epoch seconds)
        self.window_ms = settings.window_seconds * 1000
        self.grace_ms = settings.grace_seconds * 1000
        self.retention_ms = max(settings.late_retention_seconds * 1000, self.grace_ms)
        self.dedup = settings.dedup
        self.max_tokens = settings.max_tokens_per_event
        self.skew_ms = int(settings.max_clock_skew_seconds * 1000)
        self.counters = Counters()
        # Derived, in-memory only (rebuilt from state when a partition is first seen).
        self.indexed: set[int] = set()
        self.open_by_end: dict[int, dict[int, set[str]]] = {}
        self.closed_by_end: dict[int, dict[int, set[str]]] = {}
        self.touched: dict[str, float] = {}
        # what each window's last emitted rollup held: (requests, ids) -- after a crash, ids come
        # back as the replay passes their events, and a row emitted before that is emitted
        # again once they are all back (same version: the later row replaces it)
        self.emitted: dict[str, tuple[int, int]] = {}
        self.sketches: dict[tuple[int, str], sampler.TopSampler] = {}  # (partition, model)
        self.dirty_sketches: set[tuple[int, str]] = set()
        self.batch_partitions: set[int] = set()
        self.corrections: set[str] = set()
        # Restored windows written by a batch whose meta record was lost: their ids come back
        # only as the replay passes their events, so their re-emission waits for it (p -> {wkey:
        # the offset the replay must pass}).
        self.deferred: dict[int, dict[str, int]] = {}
        self._meta_keys: dict[int, str] = {}
        # Dedup: the ids of each window that is open (or closed, until its close is committed):
        # 16 bytes an id in one bytearray per window (a set of ints costs ~85 bytes an id; a
        # window's ids are searched with one C ``find``).
        self.window_ids: dict[str, bytearray] = {}
        self.batch_ids: dict[int, dict[str, int]] = {}  # p -> {wkey: where this batch's new ids start}
        self.batch_chunk: dict[int, list[int]] = {}  # p -> [first offset with a new id, max window end]
        self.chunks: dict[int, dict[str, list]] = {}  # p -> {chunk key: [max window end, closed at offset or None]}
        # p -> (closing offset, wkey) of closed windows holding ids, in closing order (windows
        # close in offset order; ids restored after a crash are queued first, or behind, which
        # only delays their release)
        self.id_holders: dict[int, deque] = {}
        self._warned_big_window = False
        # settings read per event, hoisted (pydantic attribute access is not free)
        self.input_threshold = settings.anomaly_input_tokens
        self.spike_min_history = settings.anomaly_spike_min_history
        self.spike_floor = float(settings.anomaly_spike_floor_tokens)
        self.spike_k = settings.anomaly_spike_k
        self.error_min_requests = settings.anomaly_error_min_requests
        self.error_rate = settings.anomaly_error_rate
        self.latency_min_requests = settings.anomaly_latency_min_requests
        self.latency_factor = settings.anomaly_latency_factor
        self.new_client_tokens = settings.anomaly_new_client_tokens
        self.sample_fraction = settings.sample_fraction
        self.sample_warmup = settings.sample_warmup

    # --- partitions --------------------------------------------------------------------------
    def _ensure_indexed(self, p: int, first_offset: int | None = None) -> None:
        """Build the in-memory indexes of a partition from restored state.

        ``first_offset`` is where consumption resumed (the committed offset). A window whose
        last change or closing is at or after it may have had its rollup lost with the crash
        (state and outputs are flushed together, but not atomically), so it is emitted again.
        Window ids come back from the id chunks; a chunk beyond the meta record's last offset
        was written by a batch whose meta record was lost, and is discarded: that batch is
        processed again and makes the same chunk."""
        if p in self.indexed:
            return
        resumed = first_offset if first_offset is not None else self.committed(p)
        self.indexed.add(p)
        opened = self.open_by_end.setdefault(p, {})
        closed = self.closed_by_end.setdefault(p, {})
        self.chunks.setdefault(p, {})
        holders = self.id_holders.setdefault(p, deque())
        meta = self.state.get(f"p{SEP}{p}")
        last = meta[M_LAST] if meta is not None else -1
        deferred = self.deferred.setdefault(p, {})
        now = self.clock()
        by_first: dict[int, str] = {}
        chunk_keys = []
        for key in self.state.keys_of(p):
            if key[0] == "d":
                chunk_keys.append(key)
                continue
            if key[0] != "w":
                continue
            w = self.state.get(key)
            end = int(key.rsplit(SEP, 1)[1]) + self.window_ms
            (closed if w[CLOSED] >= 0 else opened).setdefault(end, set()).add(key)
            self.touched[key] = now
            if len(w) > FIRST:
                by_first[w[FIRST]] = key
            if w[CLOSED] >= 0:
                if resumed is not None and max(w[OFF], w[CLOSED]) < resumed:
                    self.emitted[key] = (w[REQ], 0)
                elif self.dedup and max(w[OFF], w[CLOSED]) > last:
                    deferred[key] = max(w[OFF], w[CLOSED])
                else:
                    self.corrections.add(key)
        if chunk_keys:
            self._restore_ids(p, chunk_keys, by_first, resumed, holders, last)

    def _restore_ids(self, p: int, chunk_keys: list[str], by_first: dict[int, str], resumed: int | None,
                     holders: deque, last: int) -> None:
        data, window_ids = self.state.data, self.window_ids
        holding = []
        for ckey in sorted(chunk_keys, key=lambda k: self.state.get(k)[0]):
            first, max_end, packed, index = self.state.get(ckey)
            if first > last or not self.dedup:
                self.state.delete(ckey)  # a lost batch's chunk (or dedup switched off): redone
                continue
            self.chunks[p][ckey] = [max_end, None]
            blob = unpack_ids(packed)
            at = 0
            for k in range(0, len(index), 2):
                win_first, count = index[k], index[k + 1]
                run = blob[at:at + ID_BYTES * count]
                at += ID_BYTES * count
                wkey = by_first.get(win_first)
                if wkey is None:
                    continue  # retired window
                w = data[wkey]
                if w[CLOSED] >= 0 and resumed is not None and max(w[OFF], w[CLOSED]) < resumed:
                    continue  # closed and committed: never emitted again, its ids are not needed
                ids = window_ids.get(wkey)
                if ids is None:
                    ids = window_ids[wkey] = bytearray()
                    if w[CLOSED] >= 0:
                        holding.append((w[CLOSED], wkey))
                ids += run
        holders.extend(sorted(holding))

    def drop_partitions(self, partitions, drop_state: bool = True) -> None:
        """Forget derived state of partitions this worker no longer owns."""
        for p in partitions:
            self.indexed.discard(p)
            for index in (self.open_by_end.pop(p, {}), self.closed_by_end.pop(p, {})):
                for keys in index.values():
                    for key in keys:
                        self.touched.pop(key, None)
                        self.emitted.pop(key, None)
                        self.window_ids.pop(key, None)
            for sk in [k for k in self.sketches if k[0] == p]:
                self.sketches.pop(sk, None)
                self.dirty_sketches.discard(sk)
            self.chunks.pop(p, None)
            self.id_holders.pop(p, None)
            self.deferred.pop(p, None)
            self.batch_ids.pop(p, None)
            self.batch_chunk.pop(p, None)
        if drop_state:
            self.state.drop_partitions(partitions)

    def _meta(self, p: int) -> list:
        key = f"p{SEP}{p}"
        meta = self.state.get(key)
        if meta is None:
            meta = [0, -1, 0, []]  # watermark ms, last offset, copies dropped, skew-rejected offsets
            self.state.put(p, key, meta)
        elif len(meta) < 4:  # written before copies were counted
            meta.extend([0, []][len(meta) - 2:])
        return meta

    def duplicates(self, partitions=None) -> int:
        """Copies dropped on the given partitions (default: all in state), ever: kept in the
        partitions' meta records, so the count survives restarts and moves with a partition."""
        total = 0
        for p in (set(self.state.key_partition.values()) if partitions is None else partitions):
            meta = self.state.get(f"p{SEP}{p}")
            if meta is not None and len(meta) > M_DUPS:
                total += meta[M_DUPS]
        return total

    def _sketch(self, p: int, model: str) -> sampler.TopSampler:
        entry = self.sketches.get((p, model))
        if entry is None:
            stored = self.state.get(f"s{SEP}{p}{SEP}{model}")
            entry = (sampler.TopSampler(sampler.load_sketch(stored[0]), stored[1]) if stored
                     else sampler.TopSampler(sampler.new_sketch()))
            self.sketches[(p, model)] = entry
        return entry

    # --- events ------------------------------------------------------------------------------
    def process(self, p: int, offset: int, key: bytes | None, value: bytes, out: Outputs) -> None:
        """One source record (tests, replays); the worker hands whole fetches to process_records."""
        self.process_records(p, ((offset, key, value),), out)

    def process_records(self, p: int, records: Iterable, out: Outputs) -> None:
        """Source records of partition ``p`` in offset order: ``(offset, key, value)`` tuples
        or objects with those attributes (aiokafka ConsumerRecords).

        The per-event hot path (tens of thousands a second): one call per fetched run, locals
        over attribute and method lookups, int epoch ms throughout, state values mutated in
        place (profiled: per-event calls and lookups were a third of the processing)."""
        st = self.state
        data = st.data
        dirty = st.dirty
        touched = self.touched
        now = self.clock()
        skew_limit = int(self.wall_clock() * 1000) + self.skew_ms
        max_tokens = self.max_tokens
        decode = decode_event
        fromhex = _fromhex
        window_ms, grace_ms = self.window_ms, self.grace_ms
        mkey = self._meta_keys.get(p) or self._meta_key(p)
        per_request = self._per_request
        dedup = self.dedup
        window_ids = self.window_ids
        norms: dict[str, tuple[str, list]] = {}  # model -> (key, value) for this run
        meta: list = []
        batch_ids: dict[str, int] = {}
        chunk: list[int] = []
        consumed = events = counted = replayed = late = 0
        for record in records:
            if record.__class__ is tuple:
                offset, key, value = record
            else:
                offset, key, value = record.offset, record.key, record.value
            consumed += 1
            if not meta:
                if p not in self.indexed:
                    self._ensure_indexed(p, offset)
                self.batch_partitions.add(p)
                meta = data.get(mkey)
                if meta is None or len(meta) < 4:
                    meta = self._meta(p)
                batch_ids = self.batch_ids.setdefault(p, {})
                chunk = self.batch_chunk.setdefault(p, [-1, 0])
            try:
                ev = decode(value)
            except AvroDecodeError as exc:
                self._dead(out, key, value, f"undecodable: {exc}", p, offset)
                continue
            except Exception as exc:  # never let one message stop the worker
                self._dead(out, key, value, f"undecodable: {exc!r}", p, offset)
                continue
            client, model, dept = ev["client_id"], ev["model"], ev["department"]
            akey, eid, ts = ev["api_key_id"], ev["event_id"], ev["ts"]
            ws = ts - ts % window_ms
            wkey = f"w{SEP}{client}{SEP}{dept}{SEP}{akey or ''}{SEP}{model}{SEP}{ws}"
            w = data.get(wkey)
            # event_problem()'s checks (schemas.validation), inline for the valid case (NaN fails the chained comparison).
            # Identifiers (printable, at most 128 characters: schemas.identifiers) only when the
            # window is not in state: one in state was made from checked ones, and a key built
            # from identifiers holding the separator has more parts than any window's key.
            if not (0 <= ev["input_tokens"] <= max_tokens and 0 <= ev["output_tokens"] <= max_tokens
                    and 0 <= ev["total_tokens"] <= max_tokens and 100 <= ev["status_code"] <= 599
                    and 0.0 <= ev["latency_ms"] < INF
                    and (w is not None or (
                        0 < len(client) <= 128 and client.isprintable() and 0 < len(model) <= 128
                        and model.isprintable() and len(dept) <= 128 and dept.isprintable()
                        and (akey is None or (len(akey) <= 128 and akey.isprintable()))))):
                self._dead(out, key, value, event_problem(ev, max_tokens) or "invalid", p, offset)
                continue
            if eid is not None:
                # the id's 16 bytes, which also checks it is UUID text (schemas.event_ids.id_bytes,
                # inline: the per-event path)
                try:
                    h = fromhex(eid.replace("-", "")) if (len(eid) == 36 and eid[8] == "-" and eid[13] == "-"
                                                          and eid[18] == "-" and eid[23] == "-") else b""
                except ValueError:
                    h = b""
                if len(h) != ID_BYTES:
                    self._dead(out, key, value, event_problem(ev, max_tokens) or "invalid: event_id", p, offset)
                    continue
            elif dedup:
                h = id_bytes(derived_event_id(ev))  # a record without one (v1/v2, other producers)
            fresh = offset > meta[1]
            if fresh:
                if ts > skew_limit:
                    # Never moves the watermark; the decision is kept for replays (end_batch
                    # forgets it once committed).
                    meta[1] = offset
                    meta[3].append(offset)
                    dirty[mkey] = p
                    self._dead(out, key, value, self._skew_reason(ts, skew_limit), p, offset)
                    continue
            elif meta[3] and offset in meta[3]:
                self._dead(out, key, value, self._skew_reason(ts, skew_limit), p, offset)
                continue
            events += 1
            if fresh:
                advanced = ts > meta[0]
                if advanced:
                    meta[0] = ts
                meta[1] = offset
                dirty[mkey] = p
                if advanced:  # the closing offset is this event's: a replay from here re-closes
                    self._close_due(p, out, meta)
            end = ws + window_ms
            if akey is None:
                akey = ""
            if end + grace_ms <= meta[0]:
                # The window has closed (or the watermark passed it before any of its events
                # came): a one-event delta the sink merges once, by event id.
                if fresh:
                    late += 1
                    counted += 1
                if wkey in self.corrections or wkey in self.deferred.get(p, ()):
                    # Restored after a crash, its rollup maybe lost: it goes out before the
                    # delta, which the sink must merge into that row, not into a missing one
                    # (and the replay has passed its events: its ids are back).
                    self.corrections.discard(wkey)
                    self.deferred[p].pop(wkey, None)
                    self._emit(wkey, data[wkey], p, out, closing=False)
                self._delta(ev, client, dept, akey, model, ws, p, offset, out)
                per_request(ev, None, wkey, ws, p, offset, out, fresh)
                continue
            if dedup:
                ids = window_ids.get(wkey)
                if ids is not None:
                    i = ids.find(h)
                    while i > 0 and i & 15:  # a hit across two ids is not one
                        i = ids.find(h, i + 1)
                    if i >= 0:
                        if fresh:  # a copy of an event this window counts: dropped
                            meta[2] += 1
                            continue
                        if w is not None and offset > w[OFF]:
                            continue  # replay zone: a copy (the original is at or below w[OFF])
                        replayed += 1  # replay zone: decided before; only re-emit its outputs
                        touched[wkey] = now
                        per_request(ev, w, wkey, ws, p, offset, out, False)
                        continue
                    if wkey not in batch_ids:
                        batch_ids[wkey] = len(ids)
                        if end > chunk[1]:
                            chunk[1] = end
                    ids += h
                else:
                    window_ids[wkey] = bytearray(h)
                    batch_ids[wkey] = 0
                    if end > chunk[1]:
                        chunk[1] = end
                    if w is not None and w[CLOSED] >= 0:  # restored closed (deferred): ids come back
                        self.id_holders[p].append((w[CLOSED], wkey))
                if chunk[0] < 0:
                    chunk[0] = offset
            if w is None:
                # A client's state comes with its first window and is never retired, so a
                # window in state implies its client's (put first: a changelog prefix that
                # restores the window restores the client too).
                ckey = f"c{SEP}{client}"
                if ckey not in data:
                    st.put(p, ckey, [0, 0.0, 0.0, -1, ws])
                w = [dept, 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, -1, -1, -1, 0.0, 0, 0, offset]
                st.put(p, wkey, w)
                index = self.open_by_end[p]
                keys = index.get(end)
                if keys is None:
                    index[end] = {wkey}
                else:
                    keys.add(wkey)
            if offset > w[OFF]:
                latency = ev["latency_ms"]
                inp = ev["input_tokens"]
                w[REQ] += 1
                if ev["status_code"] >= 400:
                    w[ERR] += 1
                w[IN] += inp
                w[OUT] += ev["output_tokens"]
                w[TOT] += ev["total_tokens"]
                w[LSUM] += latency
                if latency > w[LMAX]:
                    w[LMAX] = latency
                if inp > w[MAXIN]:
                    w[MAXIN] = inp
                if ev["truncated"]:
                    w[TRUNC] += 1
                w[OFF] = offset
                dirty[wkey] = p
                counted += 1
                nkey, norm = norms.get(model) or self._norm(p, model, norms)
                if offset > norm[3]:
                    norm[0] += latency
                    norm[1] += inp
                    norm[2] += 1
                    norm[3] = offset
                    dirty[nkey] = p
                if len(w) > NCNT:
                    w[NLAT], w[NIN], w[NCNT] = norm[0], norm[1], norm[2]
            else:
                replayed += 1
            touched[wkey] = now
            per_request(ev, w, wkey, ws, p, offset, out, fresh)
        c = self.counters
        c.consumed += consumed
        c.events += events
        c.counted += counted
        c.replayed += replayed
        c.late += late

    def _skew_reason(self, ts: int, skew_limit: int) -> str:
        ahead = (ts - (skew_limit - self.skew_ms)) / 1000
        return (f"invalid: event time {ts} is {ahead:.0f} s ahead of the worker's clock "
                f"(limit {self.skew_ms / 1000:.0f} s)")

    def _norm(self, p: int, model: str, cache: dict) -> tuple[str, list]:
        """The partition's latency norm of ``model`` (latency sum, input tokens, requests, offset)."""
        nkey = f"n{SEP}{p}{SEP}{model}"
        norm = self.state.get(nkey)
        if norm is None:
            norm = [0.0, 0, 0, -1]
            self.state.put(p, nkey, norm)
        cache[model] = (nkey, norm)
        return nkey, norm

    def client_partition(self, client: str) -> int | None:
        """The source partition a client's events arrive on (None before its first event)."""
        return self.state.key_partition.get(f"c{SEP}{client}")

    def _meta_key(self, p: int) -> str:
        key = self._meta_keys[p] = f"p{SEP}{p}"
        return key

    def _per_request(self, ev: dict, w: list | None, wkey: str, ws: int, p: int, offset: int, out: Outputs,
                     fold: bool) -> None:
        """Per-request anomaly rule and the top-fraction sampler. ``fold``: the event is new
        (above the meta record's last offset), so it goes into the sketch; in the replay zone
        the stored sketch already holds what it should."""
        kept = False
        if ev["input_tokens"] > self.input_threshold and (w is None or w[FIRED] in (-1, offset)):
            if w is not None and w[FIRED] == -1:
                w[FIRED] = offset
                self.state.touch(wkey)
            obs, thr = ev["input_tokens"], self.input_threshold
            out.anomalies.append(self._anomaly(
                "input_tokens", ev["client_id"], ev["department"], ev["model"], ws, obs, thr,
                f"request {ev['request_id']} sent {obs} input tokens (threshold {thr})",
                request_id=ev["request_id"], ts=ev["ts"], api_key_id=ev["api_key_id"] or ""))
            out.sampled.append(self._sampled(ev, "anomaly:input_tokens", float(thr)))
            kept = True
        model = ev["model"]
        top = self.sketches.get((p, model)) or self._sketch(p, model)
        total = float(ev["total_tokens"])
        if not kept and top.keep(total, self.sample_fraction, ev["request_id"], self.sample_warmup):
            out.sampled.append(self._sampled(ev, "top_fraction", top.threshold()))
        if fold and offset > top.offset:
            top.update(total, offset)
            self.dirty_sketches.add((p, model))

    def _dead(self, out: Outputs, key, value, reason: str, p: int, offset: int) -> None:
        self.counters.dead_lettered += 1
        out.dlq.append((key, value, reason[:500], p, offset))

    # --- windows -----------------------------------------------------------------------------
    def _close_due(self, p: int, out: Outputs, meta: list) -> None:
        """Close the windows the partition's watermark has passed, at the event that moved it.

        Closing here (not at the end of a batch) fixes each window's content at its close to
        "its events up to this offset", so the window rules give the same answer however the
        stream was cut into batches: live, after a crash, or in a fresh group's replay."""
        opened = self.open_by_end[p]
        if not opened:
            return
        horizon = meta[0] - self.grace_ms
        due = [e for e in opened if e <= horizon]
        if not due:
            return
        closed = self.closed_by_end[p]
        data, dirty, emit = self.state.data, self.state.dirty, self._emit
        window_ids = self.window_ids
        holders = self.id_holders.get(p)
        if holders is None:
            holders = self.id_holders[p] = deque()
        at = meta[1]
        for end in sorted(due):
            now_closed = closed.get(end)
            if now_closed is None:
                now_closed = closed[end] = set()
            for wkey in opened.pop(end):
                w = data.get(wkey)
                if w is None:
                    continue
                w[CLOSED] = at
                dirty[wkey] = p  # the window's partition: it is indexed under p
                emit(wkey, w, p, out, True)
                now_closed.add(wkey)
                if wkey in window_ids:
                    holders.append((at, wkey))  # its ids go once the close is committed

    def end_batch(self, out: Outputs) -> None:
        """Close windows the watermark has passed, emit corrections, persist dirty state."""
        for p in self.batch_partitions:
            meta = self._meta(p)
            self._close_due(p, out, meta)
            deferred = self.deferred.get(p)
            if deferred:
                for wkey in [k for k, at in deferred.items() if at <= meta[1]]:
                    del deferred[wkey]
                    self.corrections.add(wkey)
        # Corrections (windows restored after a crash that may have lost their rollup) before
        # retirement.
        for wkey in self.corrections:
            w = self.state.get(wkey)
            if w is not None:
                self._emit(wkey, w, self.state.key_partition[wkey], out, closing=False)
        self.corrections.clear()
        self._write_chunks()
        for p in self.batch_partitions:
            meta = self._meta(p)
            wm = meta[0]
            closed = self.closed_by_end[p]
            committed = self.committed(p)
            if committed is None:
                continue  # nothing committed yet: a replay could still need every window
            if meta[3] and meta[3][0] < committed:
                meta[3] = [o for o in meta[3] if o >= committed]  # committed: never replayed
                self.state.touch(f"p{SEP}{p}")
            self._release_ids(p, wm, meta[1], committed)
            for end in [e for e in closed if e + self.retention_ms <= wm]:
                keep = set()
                for wkey in closed.pop(end):
                    w = self.state.get(wkey)
                    if w is not None and max(w[OFF], w[CLOSED]) >= committed:
                        # Its last change or emission is not committed yet: a replay could
                        # bring its events back, or its rollup may not be durable. Later.
                        keep.add(wkey)
                        continue
                    self.state.delete(wkey)
                    self.touched.pop(wkey, None)
                    self.emitted.pop(wkey, None)
                    self.window_ids.pop(wkey, None)
                if keep:
                    closed[end] = keep
        self.batch_partitions.clear()
        for p, model in self.dirty_sketches:
            top = self.sketches[(p, model)]
            self.state.put(p, f"s{SEP}{p}{SEP}{model}", [sampler.dump_sketch(top.sketch), top.offset])
        self.dirty_sketches.clear()
        self.state.flush()

    def _write_chunks(self) -> None:
        """One id chunk per partition for this batch's new ids (split when large); the State
        writes chunks after the batch's window records and before its meta record.

        A chunk is ``[first offset, max window end, packed ids, [window FIRST, count, ...]]``:
        the batch's new ids back to back, then which window each run of them belongs to (one
        base64 string and one flat int list, whatever the number of windows)."""
        data, window_ids = self.state.data, self.window_ids
        limit = ID_BYTES * CHUNK_MAX_IDS
        for p, new in self.batch_ids.items():
            if not new:
                continue
            first, max_end = self.batch_chunk[p]
            last = self._meta(p)[M_LAST]
            pieces: list[tuple[bytearray, list[int]]] = []
            blob, index = bytearray(), []
            for wkey, pos in new.items():
                w, ids = data.get(wkey), window_ids.get(wkey)
                if w is None or ids is None:
                    continue
                while pos < len(ids):
                    take = min(len(ids) - pos, limit - len(blob))
                    blob += ids[pos:pos + take]
                    index += (w[FIRST], take // ID_BYTES)
                    pos += take
                    if len(blob) >= limit:
                        pieces.append((blob, index))
                        blob, index = bytearray(), []
            if blob:
                pieces.append((blob, index))
            chunks = self.chunks.setdefault(p, {})
            for n, (blob, index) in enumerate(pieces):
                ckey = f"{CHUNK_PREFIX}{p}{SEP}{first}{SEP}{last}{SEP}{n}"
                self.state.put(p, ckey, [first, max_end, pack_ids(blob), index])
                chunks[ckey] = [max_end, None]
            new.clear()
            self.batch_chunk[p] = [-1, 0]

    def _release_ids(self, p: int, wm: int, last: int, committed: int) -> None:
        """Drop the ids of windows whose close is committed (never emitted again, and every
        later event of theirs is a delta), and tombstone the chunks that only name such
        windows: a replay from the committed offset never looks them up."""
        holders = self.id_holders.get(p)
        while holders and holders[0][0] < committed:
            self.window_ids.pop(holders.popleft()[1], None)
        chunks = self.chunks.get(p)
        if not chunks:
            return
        horizon = wm - self.grace_ms
        for ckey, entry in list(chunks.items()):
            if entry[1] is None:
                if entry[0] <= horizon:
                    entry[1] = last  # every window it names closed at or before this offset
            elif entry[1] < committed:
                self.state.delete(ckey)
                del chunks[ckey]

    def idle_sweep(self, out: Outputs, partitions=None) -> None:
        """Emit open windows that have been quiet (wall clock) for idle_timeout_seconds.

        ``partitions``: the owned partitions whose state is fully restored (default: all in
        state), so windows restored after a restart are emitted even if no event follows."""
        if partitions is None:
            partitions = set(self.state.key_partition.values())
        for p in partitions:
            self._ensure_indexed(p)
        for wkey in list(self.corrections):
            w = self.state.get(wkey)
            if w is not None:
                self._emit(wkey, w, self.state.key_partition[wkey], out, closing=False)
        self.corrections.clear()
        limit = self.clock() - self.s.idle_timeout_seconds
        for p, opened in self.open_by_end.items():
            for keys in opened.values():
                for wkey in keys:
                    if self.touched.get(wkey, 0.0) <= limit:
                        w = self.state.get(wkey)
                        if w is not None and self.emitted.get(wkey) != self._mark(wkey, w):
                            self._emit(wkey, w, p, out, closing=False)

    def _emit(self, wkey: str, w: list, p: int, out: Outputs, closing: bool) -> None:
        parts = wkey.split(SEP)
        if len(parts) == 6:
            _, client, dept, akey, model, ws_text = parts
        else:  # a window kept from before windows had a department and key in their identity
            _, client, model, ws_text = parts
            dept, akey = w[DEPT], ""
        ws = int(ws_text)
        # emitted again when its count changed, or its ids (they come back after a crash as the
        # replay passes their events: the same version, the later row replaces the earlier)
        ids = self.window_ids.get(wkey)
        mark = (w[REQ], len(ids) if ids is not None else 0)
        if self.emitted.get(wkey) != mark:
            self.emitted[wkey] = mark
            out.rollups.append(self._rollup(client, dept, akey, model, ws, w,
                                            event_ids=self._packed_ids(wkey, ids) if ids else ""))
        self._window_rules(client, dept, akey, model, ws, w, p, out, closing)

    def _mark(self, wkey: str, w: list) -> tuple[int, int]:
        ids = self.window_ids.get(wkey)
        return (w[REQ], len(ids) if ids is not None else 0)

    def _packed_ids(self, wkey: str, ids: bytearray) -> str:
        if len(ids) > ID_BYTES * ROLLUP_MAX_IDS:
            if not self._warned_big_window:
                self._warned_big_window = True
                log.warning("window %r has %d events: its rollup carries the ids of the first %d only "
                            "(late copies of the others would be counted)", wkey, len(ids) // ID_BYTES,
                            ROLLUP_MAX_IDS)
            ids = ids[:ID_BYTES * ROLLUP_MAX_IDS]
        return _b2a(ids, newline=False).decode("ascii")  # = pack_ids

    def _rollup(self, client: str, dept: str, akey: str, model: str, ws: int, w: list, delta_id: str | None = None,
                event_ids: str = "") -> dict:
        self.counters.rollups += 1
        return {
            "client_id": client, "department": dept, "api_key_id": akey, "model": model,
            "window_start": ws, "window_end": ws + self.window_ms,
            "requests": w[REQ], "errors": w[ERR], "input_tokens": w[IN], "output_tokens": w[OUT],
            "total_tokens": w[TOT], "latency_ms_sum": w[LSUM], "latency_ms_max": w[LMAX],
            "max_input_tokens": w[MAXIN], "truncated": w[TRUNC], "version": w[REQ], "delta_id": delta_id,
            "applied_offset": w[OFF], "event_ids": event_ids,
        }

    def _delta(self, ev: dict, client: str, dept: str, akey: str, model: str, ws: int, p: int, offset: int,
               out: Outputs) -> None:
        """An event for a closed window: a one-event rollup the sink merges into the stored row
        once (by delta id, and by event id when the row lists its events)."""
        w = [dept, 1, int(ev["status_code"] >= 400), ev["input_tokens"], ev["output_tokens"],
             ev["total_tokens"], ev["latency_ms"], ev["latency_ms"], ev["input_tokens"], int(bool(ev["truncated"])),
             offset, 1, -1, 0.0, 0, 0]
        event_ids = pack_ids(id_bytes(ev["event_id"] or derived_event_id(ev)) or b"") if self.dedup else ""
        out.rollups.append(self._rollup(client, dept, akey, model, ws, w, delta_id=f"{self.s.topic_usage}:{p}:{offset}",
                                        event_ids=event_ids))

    # --- window anomaly rules ------------------------------------------------------------------
    def _window_rules(self, client: str, dept: str, akey: str, model: str, ws: int, w: list, p: int, out: Outputs,
                      closing: bool) -> None:
        ckey = f"c{SEP}{client}"
        c = self.state.data.get(ckey)
        tokens = w[TOT]
        if c is not None and c[C_N] >= self.spike_min_history:
            sigma = max(math.sqrt(max(c[C_VAR], 0.0)), 0.1 * c[C_MEAN], 1.0)
            thr = max(self.spike_floor, c[C_MEAN] + self.spike_k * sigma)
            if tokens > thr:
                out.anomalies.append(self._anomaly(
                    "token_spike", client, dept, model, ws, tokens, thr,
                    f"{tokens} tokens in the window vs a baseline of {c[C_MEAN]:.0f} (band {thr:.0f})", api_key_id=akey))
        if w[REQ] >= self.error_min_requests and w[ERR] / w[REQ] >= self.error_rate:
            rate = w[ERR] / w[REQ]
            out.anomalies.append(self._anomaly(
                "error_rate", client, dept, model, ws, rate, self.error_rate,
                f"{w[ERR]} of {w[REQ]} requests failed ({rate:.0%})", api_key_id=akey))
        if (len(w) > NCNT and w[NCNT] >= self.latency_min_requests and w[NIN] > 0 and w[IN] > 0
                and w[REQ] >= 3):
            model_ratio = w[NLAT] / w[NIN]
            ratio = w[LSUM] / w[IN]
            if ratio > self.latency_factor * model_ratio:
                out.anomalies.append(self._anomaly(
                    "latency_per_token", client, dept, model, ws, ratio, model_ratio,
                    f"{ratio:.3f} ms per input token vs {model_ratio:.3f} for {model}", api_key_id=akey))
        if c is not None and c[C_N] == 0 and c[C_FIRST] == ws and tokens >= self.new_client_tokens:
            out.anomalies.append(self._anomaly(
                "new_client_volume", client, dept, model, ws, tokens, self.new_client_tokens,
                f"never-seen client used {tokens} tokens in its first window", api_key_id=akey))
        if closing and c is not None and ws > c[C_LAST]:
            if c[C_N] == 0:
                c[C_MEAN], c[C_VAR] = float(tokens), 0.0
            else:
                alpha = max(EWMA_ALPHA, 1.0 / (c[C_N] + 1))
                diff = tokens - c[C_MEAN]
                c[C_MEAN] += alpha * diff
                c[C_VAR] = (1 - alpha) * (c[C_VAR] + alpha * diff * diff)
            c[C_N] += 1
            c[C_LAST] = ws
            self.state.touch(ckey)

    def _anomaly(self, rule: str, client: str, dept: str, model: str, ws: int, observed: float, thr: float,
                 message: str, request_id: str | None = None, ts: Any = None, api_key_id: str = "") -> dict:
        self.counters.anomalies += 1
        return records.anomaly(rule, client, dept, model, ws, observed, thr, message,
                               ts if ts is not None else ws + self.window_ms, request_id, api_key_id)

    def _sampled(self, ev: dict, reason: str, thr: float) -> dict:
        self.counters.sampled += 1
        return records.sampled_record(ev, reason, thr)
