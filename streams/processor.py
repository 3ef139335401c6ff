"""The stream job's logic, free of faust: events in, rollups / sampled records / anomalies /
dead letters out, with all state in a :class:`~tokenaudit.streams.state.State`.

Why it is built this way (see docs/exactness.md and docs/architecture.md):

* **Event-time windows in our own state.** Per (client_id, department, api_key_id, model)
  tumbling windows (keys: :mod:`.state_keys`; values: :class:`~.windows.Window`; attribution
  per event: a client that changes department mid-window is charged to each in turn). A partition's watermark is the largest event time seen on it; a window is *closed*
  (rollup emitted, baseline updated) once the watermark passes its end plus grace, and a
  wall-clock idle sweep emits open windows that have been quiet for ``idle_timeout_seconds``
  so quiet clients still get rows.
* **Late events are never dropped.** An event whose window has closed (or was never opened
  before the watermark passed it) is sent as a one-event *delta* rollup (``delta_id`` =
  source topic:partition:offset, ``event_ids`` = its id); the sink merges it into the stored
  row once. A closed window stays in state for ``late_retention_seconds`` only so that it
  can be emitted again after a crash.
* **Each event counted once** (:mod:`tokenaudit.schemas.event_ids`, :mod:`.dedup`). Copies
  of an event (producer retries, spool replays) share its ``event_id`` and, keyed by
  client_id, its partition. While a window is open, the ids of its events are held in memory
  and a copy is dropped (counted in the partition's meta record, so the count survives
  restarts); their durable form is one id chunk per partition and batch. Rollups carry their
  window's packed id set, so the sink can skip a late delta whose event a stored row already
  counts (a copy later than the window).
* **Poison never stops the stream.** Undecodable bytes, an event that breaks the contract's
  rule (:mod:`tokenaudit.schemas.validation`: identifiers, counts below 0 or above
  ``max_tokens_per_event``, a malformed event_id...), or an event time more than ``max_clock_skew_seconds`` ahead of the
  worker's clock go to the dead-letter topic with a reason; such an event never moves a
  watermark. The clock decision is kept (offsets in the meta record) until committed, so a
  replay after a crash decides the same.
* **Exactly-once effect from at-least-once delivery.** Every state value carries the
  source offset that last changed it. A replayed event (offset <= that) changes nothing but
  re-emits its outputs, which are idempotent downstream: rollup version = the window's
  request count (monotone, and the content for a given count is fixed by partition order),
  anomaly ids are hashes of (rule, client, model, window[, department, api key]), sampled
  records are keyed by request id (:mod:`tokenaudit.schemas.records`). Dedup decisions replay the same way: in the *replay zone*
  (offsets at or below the restored meta record's last offset) every decision is already in
  state; above it, chunks written by a batch whose meta record was lost are discarded at
  restore, so the ids held are exactly those of the events before the offset being decided.

The steps, each in its own module: decode + validate (:mod:`.source`), deduplicate
(:mod:`.dedup`), windows (:mod:`.windows`), rules (:mod:`.rules`), sampling (:mod:`.sampler`),
budget spend (:mod:`.spend`), outputs (:mod:`.outputs`). :meth:`Processor.process_records` runs
them per event in one loop: a call per step cost as much as the step, so fast paths are inline.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tokenaudit.errors import RegistryError
from tokenaudit.schemas import AvroDecodeError, records
from tokenaudit.schemas.event_ids import ID_BYTES, derived_id_bytes
from tokenaudit.schemas.latency_hist import CELLS_PER_INPUT, LATENCY_BOUNDS_MS
from tokenaudit.schemas.validation import event_problem
from tokenaudit.streams import state_keys as keys
from tokenaudit.streams.dedup import EventIds
from tokenaudit.streams.outputs import Counters, Outputs
from tokenaudit.streams.rules import Rules
from tokenaudit.streams.sampler import Sampling
from tokenaudit.streams.source import SourceRecord, SourceTuple, decode_event
from tokenaudit.streams.spend import SpendCounter
from tokenaudit.streams.state import State
from tokenaudit.streams.window_state import (
    M_DUPS,
    M_LAST,
    M_SKEWED,
    M_WM,
    N_COUNT,
    N_INPUT,
    N_LATENCY,
    N_OFFSET,
    Window,
)
from tokenaudit.streams.windows import Windows

if TYPE_CHECKING:
    from tokenaudit.settings import Settings

log = logging.getLogger("tokenaudit.worker")

_fromhex = bytes.fromhex
INF = math.inf


class Processor:
    def __init__(
        self,
        settings: Settings,
        state: State,
        clock: Callable[[], float] = time.monotonic,
        committed: Callable[[int], int | None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.s = settings
        # committed(partition) -> the group's committed offset (next to read) or None.
        self.committed: Callable[[int], int | None] = committed or (lambda p: None)
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
        self.ids = EventIds(state, settings.dedup)
        self.rules = Rules(settings, state, self.window_ms, self.counters)
        self.sampling = Sampling(state, settings.sample_fraction, settings.sample_warmup)
        self.spend = SpendCounter.from_settings(settings, state)
        self.input_threshold = self.rules.input_threshold
        self.windows = Windows(
            settings,
            state,
            self.ids,
            self.rules,
            self.counters,
            lambda p: self.committed(p),  # noqa: PLW0108 (late-bound: tests swap self.committed and the clock)
            lambda: self.clock(),  # noqa: PLW0108
        )
        self.batch_partitions: set[int] = set()
        self._meta_keys: dict[int, str] = {}

    # --- partitions --------------------------------------------------------------------------
    def drop_partitions(self, partitions: Iterable[int], drop_state: bool = True) -> None:
        """Forget derived state of partitions this worker no longer owns."""
        for p in partitions:
            self.ids.drop(p, self.windows.drop(p))
            self.sampling.drop(p)
        if drop_state:
            self.state.drop_partitions(partitions)

    def _meta(self, p: int) -> list[Any]:
        key = keys.meta_key(p)
        meta: list[Any] | None = self.state.get(key)
        if meta is None:
            meta = [0, -1, 0, []]  # watermark ms, last offset, copies dropped, skew-rejected offsets
            self.state.put(p, key, meta)
        elif len(meta) < 4:  # written before copies were counted
            meta.extend([0, []][len(meta) - 2 :])
        return meta

    def duplicates(self, partitions: Iterable[int] | None = None) -> int:
        """Copies dropped on the given partitions (default: all in state), ever: kept in the
        partitions' meta records, so the count survives restarts and moves with a partition."""
        total = 0
        for p in set(self.state.key_partition.values()) if partitions is None else partitions:
            meta = self.state.get(keys.meta_key(p))
            if meta is not None and len(meta) > M_DUPS:
                total += meta[M_DUPS]
        return total

    # --- events ------------------------------------------------------------------------------
    def process(self, p: int, offset: int, key: bytes | None, value: bytes | None, out: Outputs) -> None:
        """One source record (tests, replays); the worker hands whole fetches to process_records."""
        self.process_records(p, ((offset, key, value),), out)

    def process_records(self, p: int, records: Iterable[SourceTuple | SourceRecord], out: Outputs) -> None:
        """Source records of partition ``p`` in offset order: ``(offset, key, value)`` tuples
        or objects with those attributes (aiokafka ConsumerRecords).

        Per event, in order: 1. decode + validate, 2. event time (watermark, clock skew), 3. a
        closed window: a late delta, 4. deduplicate, 5. the window, 6. the request rule and
        sampling. The per-event hot path (tens of thousands a second): one call per fetched
        run, locals over attribute and method lookups, int epoch ms throughout, state values
        mutated in place (profiled: per-event calls and lookups were a third of the processing)."""
        st = self.state
        data = st.data
        dirty = st.dirty
        touched = self.windows.touched
        now = self.clock()
        skew_limit = int(self.wall_clock() * 1000) + self.skew_ms
        max_tokens = self.max_tokens
        decode = decode_event
        fromhex = _fromhex
        window_key = keys.window_key
        window_ms, grace_ms = self.window_ms, self.grace_ms
        mkey = self._meta_keys.get(p) or self._meta_key(p)
        per_request, count_spend = self._per_request, self.spend.count
        dedup = self.dedup
        window_ids = self.ids.window_ids
        win = self.windows
        corrections, deferred, indexed = win.corrections, win.deferred, win.indexed
        norms: dict[str, tuple[str, list[Any]]] = {}  # model -> (key, value) for this run
        bounds, bisect, per_input = LATENCY_BOUNDS_MS, bisect_left, CELLS_PER_INPUT
        meta: list[Any] = []
        batch_ids: dict[str, int] = {}
        chunk: list[int] = []
        consumed = events = counted = replayed = late = 0
        for record in records:
            if isinstance(record, tuple):
                offset, key, value = record
            else:
                offset, key, value = record.offset, record.key, record.value
            consumed += 1
            if not meta:
                if p not in indexed:
                    win.ensure_indexed(p, offset)
                self.batch_partitions.add(p)
                stored = data.get(mkey)
                meta = stored if stored is not None and len(stored) >= 4 else self._meta(p)
                batch_ids = self.ids.batch_ids.setdefault(p, {})
                chunk = self.ids.batch_chunk.setdefault(p, [-1, 0])
            # --- 1. decode + validate -------------------------------------------------------------
            try:
                if value is None:
                    raise AvroDecodeError("a record without a value (a tombstone)")
                ev = decode(value)
            except AvroDecodeError as exc:
                self._dead(out, key, value, f"undecodable: {exc}", p, offset)
                continue
            except RegistryError:  # the record is fine, the registry is unreachable: retry, never dead-letter
                raise
            except Exception as exc:  # never let one message stop the worker
                self._dead(out, key, value, f"undecodable: {exc!r}", p, offset)
                continue
            client, model, dept = ev["client_id"], ev["model"], ev["department"]
            akey, eid, ts = ev["api_key_id"], ev["event_id"], ev["ts"]
            ws = ts - ts % window_ms
            wkey = window_key(client, dept, akey or "", model, ws)
            w = data.get(wkey)
            # event_problem()'s checks (schemas.validation), inline for the valid case (NaN fails
            # the chained comparison). Identifiers (printable, at most 128 characters:
            # schemas.identifiers) only when the window is not in state: one in state was made
            # from checked ones, and a key built from identifiers holding the separator has more
            # parts than any window's key.
            if not (
                0 <= ev["input_tokens"] <= max_tokens
                and 0 <= ev["output_tokens"] <= max_tokens
                and 0 <= ev["total_tokens"] <= max_tokens
                and 100 <= ev["status_code"] <= 599
                and 0.0 <= ev["latency_ms"] < INF
                and (
                    w is not None
                    or (
                        0 < len(client) <= 128
                        and client.isprintable()
                        and 0 < len(model) <= 128
                        and model.isprintable()
                        and len(dept) <= 128
                        and dept.isprintable()
                        and (akey is None or (len(akey) <= 128 and akey.isprintable()))
                    )
                )
            ):
                self._dead(out, key, value, event_problem(ev, max_tokens) or "invalid", p, offset)
                continue
            if eid is not None:
                # the id's 16 bytes, which also checks it is UUID text (schemas.event_ids.id_bytes,
                # inline: the per-event path)
                try:
                    h = (
                        fromhex(eid.replace("-", ""))
                        if (len(eid) == 36 and eid[8] == "-" and eid[13] == "-" and eid[18] == "-" and eid[23] == "-")
                        else b""
                    )
                except ValueError:
                    h = b""
                if len(h) != ID_BYTES:
                    self._dead(out, key, value, event_problem(ev, max_tokens) or "invalid: event_id", p, offset)
                    continue
            elif dedup:
                h = derived_id_bytes(ev)  # a record without one (v1/v2, other producers)
            # --- 2. event time ---------------------------------------------------------------------
            fresh = offset > meta[M_LAST]
            if fresh:
                if ts > skew_limit:
                    # Never moves the watermark; the decision is kept for replays (end_batch
                    # forgets it once committed).
                    meta[M_LAST] = offset
                    meta[M_SKEWED].append(offset)
                    dirty[mkey] = p
                    self._dead(out, key, value, self._skew_reason(ts, skew_limit), p, offset)
                    continue
            elif meta[M_SKEWED] and offset in meta[M_SKEWED]:
                self._dead(out, key, value, self._skew_reason(ts, skew_limit), p, offset)
                continue
            events += 1
            if fresh:
                advanced = ts > meta[M_WM]
                if advanced:
                    meta[M_WM] = ts
                meta[M_LAST] = offset
                dirty[mkey] = p
                if advanced:  # the closing offset is this event's: a replay from here re-closes
                    win.close_due(p, out, meta)
            end = ws + window_ms
            if akey is None:
                akey = ""
            # --- 3. a closed window: a late delta ---------------------------------------------------
            if end + grace_ms <= meta[M_WM]:
                # The window has closed (or the watermark passed it before any of its events
                # came): a one-event delta the sink merges once, by event id.
                if fresh:
                    late += 1
                    counted += 1
                if wkey in corrections or wkey in deferred.get(p, ()):
                    # Restored after a crash, its rollup maybe lost: it goes out before the
                    # delta, which the sink must merge into that row, not into a missing one
                    # (and the replay has passed its events: its ids are back).
                    corrections.discard(wkey)
                    deferred[p].pop(wkey, None)
                    win.emit(wkey, data[wkey], p, out, closing=False)
                win.delta(ev, client, dept, akey, model, ws, p, offset, out)
                self.spend.count_late(p, offset, ev, window_ids.get(wkey) if dedup else None, h if dedup else b"")
                per_request(ev, None, wkey, ws, p, offset, out, fresh)
                continue
            # --- 4. deduplicate ----------------------------------------------------------------------
            if dedup:
                ids = window_ids.get(wkey)
                if ids is not None:
                    i = ids.find(h)
                    while i > 0 and i & 15:  # a hit across two ids is not one
                        i = ids.find(h, i + 1)
                    if i >= 0:
                        if fresh:  # a copy of an event this window counts: dropped
                            meta[M_DUPS] += 1
                            continue
                        if w is not None and offset > w.applied_offset:
                            continue  # replay zone: a copy (the original is at or below applied_offset)
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
                    if w is not None and w.closed_at >= 0:  # restored closed (deferred): ids come back
                        self.ids.id_holders[p].append((w.closed_at, wkey))
                if chunk[0] < 0:
                    chunk[0] = offset
            count_spend(p, offset, ev)  # its own offset guard: a replay changes nothing
            # --- 5. the window -------------------------------------------------------------------------
            if w is None:
                # A client's state comes with its first window and is never retired, so a
                # window in state implies its client's (put first: a changelog prefix that
                # restores the window restores the client too).
                ckey = keys.client_key(client)
                if ckey not in data:
                    st.put(p, ckey, [0, 0.0, 0.0, -1, ws])
                w = Window(dept, offset)
                st.put(p, wkey, w)
                index = win.open_by_end[p]
                wkeys = index.get(end)
                if wkeys is None:
                    index[end] = {wkey}
                else:
                    wkeys.add(wkey)
            if offset > w.applied_offset:
                latency = ev["latency_ms"]
                inp = ev["input_tokens"]
                w.requests += 1
                if ev["status_code"] >= 400:
                    w.errors += 1
                w.input_tokens += inp
                w.output_tokens += ev["output_tokens"]
                w.total_tokens += ev["total_tokens"]
                w.latency_ms_sum += latency
                if latency > w.latency_ms_max:
                    w.latency_ms_max = latency
                if inp > w.max_input_tokens:
                    w.max_input_tokens = inp
                if ev["truncated"]:
                    w.truncated += 1
                # the latency histogram's cell (schemas.latency_hist.cell, inline: per event)
                hcell = (0 if inp <= 16 else (inp - 1).bit_length() - 4) * per_input + bisect(bounds, latency)
                hist = w.hist
                hist[hcell] = hist.get(hcell, 0) + 1
                w.applied_offset = offset
                dirty[wkey] = p
                counted += 1
                nkey, norm = norms.get(model) or self._norm(p, model, norms)
                if offset > norm[N_OFFSET]:
                    norm[N_LATENCY] += latency
                    norm[N_INPUT] += inp
                    norm[N_COUNT] += 1
                    norm[N_OFFSET] = offset
                    dirty[nkey] = p
                if w.norm_count is not None:
                    w.norm_latency, w.norm_input, w.norm_count = norm[N_LATENCY], norm[N_INPUT], norm[N_COUNT]
            else:
                replayed += 1
            touched[wkey] = now
            # --- 6. the request rule and sampling ----------------------------------------------------
            per_request(ev, w, wkey, ws, p, offset, out, fresh)
        c = self.counters
        c.consumed += consumed
        c.events += events
        c.counted += counted
        c.replayed += replayed
        c.late += late

    # --- the end of a batch, and the idle sweep -------------------------------------------------
    def end_batch(self, out: Outputs) -> None:
        """Close windows the watermark has passed, emit corrections, write the batch's id
        chunks, retire what is committed, persist dirty state (meta records last)."""
        win = self.windows
        for p in self.batch_partitions:
            meta = self._meta(p)
            win.close_due(p, out, meta)
            win.release_deferred(p, meta[M_LAST])
        # Corrections (windows restored after a crash that may have lost their rollup) before
        # retirement.
        win.emit_corrections(out)
        self.ids.write_chunks(lambda p: self._meta(p)[M_LAST])
        for p in self.batch_partitions:
            meta = self._meta(p)
            committed = self.committed(p)
            if committed is None:
                continue  # nothing committed yet: a replay could still need every window
            if meta[M_SKEWED] and meta[M_SKEWED][0] < committed:
                meta[M_SKEWED] = [o for o in meta[M_SKEWED] if o >= committed]  # committed: never replayed
                self.state.touch(keys.meta_key(p))
            self.ids.release(p, meta[M_WM] - self.grace_ms, meta[M_LAST], committed)
            win.retire(p, meta[M_WM], committed)
        self.batch_partitions.clear()
        self.sampling.flush()
        self.state.flush()

    def idle_sweep(self, out: Outputs, partitions: Iterable[int] | None = None) -> None:
        """Emit open windows that have been quiet (wall clock) for idle_timeout_seconds.

        ``partitions``: the owned partitions whose state is fully restored (default: all in
        state), so windows restored after a restart are emitted even if no event follows."""
        if partitions is None:
            partitions = set(self.state.key_partition.values())
        self.windows.idle_sweep(out, partitions)

    def _skew_reason(self, ts: int, skew_limit: int) -> str:
        ahead = (ts - (skew_limit - self.skew_ms)) / 1000
        return (
            f"invalid: event time {ts} is {ahead:.0f} s ahead of the worker's clock (limit {self.skew_ms / 1000:.0f} s)"
        )

    def _norm(self, p: int, model: str, cache: dict[str, tuple[str, list[Any]]]) -> tuple[str, list[Any]]:
        """The partition's latency norm of ``model`` (``N_*`` slots)."""
        nkey = keys.norm_key(p, model)
        norm: list[Any] | None = self.state.get(nkey)
        if norm is None:
            norm = [0.0, 0, 0, -1]
            self.state.put(p, nkey, norm)
        cache[model] = (nkey, norm)
        return nkey, norm

    def client_partition(self, client: str) -> int | None:  # None before the client's first event
        return self.state.key_partition.get(keys.client_key(client))

    def _meta_key(self, p: int) -> str:
        return self._meta_keys.setdefault(p, keys.meta_key(p))

    def _per_request(
        self,
        ev: records.TokenUsageEvent,
        w: Window | None,
        wkey: str,
        ws: int,
        p: int,
        offset: int,
        out: Outputs,
        fold: bool,
    ) -> None:
        """Per-request anomaly rule and the top-fraction sampler. ``fold``: the event is new (above
        the meta record's last offset), so it goes into the sketch (the replay zone's has it)."""
        # the guard reads what the client sent, as the rule does (rules.sent_input_tokens)
        thr = self.input_threshold
        kept = (ev["input_tokens"] > thr or ev["untruncated_input_tokens"] > thr) and self.rules.request(
            ev, w, ws, offset, lambda: self.state.touch(wkey), out.anomalies
        )
        if kept:
            out.sampled.append(self._sampled(ev, "anomaly:input_tokens", float(self.input_threshold)))
        sampling = self.sampling
        model = ev["model"]
        top = sampling.sketches.get((p, model)) or sampling.sketch(p, model)
        total = float(ev["total_tokens"])
        if not kept and top.keep(total, sampling.fraction, ev["request_id"], sampling.warmup):
            out.sampled.append(self._sampled(ev, "top_fraction", top.threshold()))
        if fold and offset > top.offset:
            top.update(total, offset)
            sampling.dirty.add((p, model))

    def _sampled(self, ev: records.TokenUsageEvent, reason: str, thr: float) -> records.SampledRecord:
        self.counters.sampled += 1
        return records.sampled_record(ev, reason, thr)

    def _dead(self, out: Outputs, key: bytes | None, value: bytes | None, reason: str, p: int, offset: int) -> None:
        self.counters.dead_lettered += 1
        out.dlq.append((key, value, reason[:500], p, offset))
