"""The windows of the partitions this worker owns: which are open and which closed (indexed by
end), closing them as the watermark passes, emitting their rollups (and running the window
rules on them), late deltas, the idle sweep, and retiring closed windows once their close is
committed. The windows themselves are :class:`~tokenaudit.streams.window_state.Window` values
in the state; everything here is derived and rebuilt from it when a partition is first seen.

Closing happens at the event that moved the watermark (not at the end of a batch), which
fixes each window's content at its close to "its events up to this offset", so the window
rules give the same answer however the stream was cut into batches: live, after a crash, or
in a fresh group's replay.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from tokenaudit.schemas import records
from tokenaudit.schemas.event_ids import derived_event_id, id_bytes, pack_ids
from tokenaudit.streams import state_keys as keys
from tokenaudit.streams.dedup import EventIds
from tokenaudit.streams.outputs import Counters, Outputs
from tokenaudit.streams.rules import Rules
from tokenaudit.streams.state import State
from tokenaudit.streams.window_state import M_LAST, M_WM, Window

if TYPE_CHECKING:
    from tokenaudit.settings import Settings


class Windows:
    def __init__(
        self,
        settings: Settings,
        state: State,
        ids: EventIds,
        rules: Rules,
        counters: Counters,
        committed: Callable[[int], int | None],
        clock: Callable[[], float],
    ) -> None:
        self.s = settings
        self.state = state
        self.ids = ids
        self.rules = rules
        self.counters = counters
        self.committed = committed
        self.clock = clock
        self.window_ms = settings.window_seconds * 1000
        self.grace_ms = settings.grace_seconds * 1000
        self.retention_ms = max(settings.late_retention_seconds * 1000, self.grace_ms)
        self.dedup = settings.dedup
        self.indexed: set[int] = set()
        self.open_by_end: dict[int, dict[int, set[str]]] = {}
        self.closed_by_end: dict[int, dict[int, set[str]]] = {}
        self.touched: dict[str, float] = {}
        # what each window's last emitted rollup held: (requests, ids) -- after a crash, ids come
        # back as the replay passes their events, and a row emitted before that is emitted
        # again once they are all back (same version: the later row replaces it)
        self.emitted: dict[str, tuple[int, int]] = {}
        self.corrections: set[str] = set()
        # Restored windows written by a batch whose meta record was lost: their ids come back
        # only as the replay passes their events, so their re-emission waits for it (p -> {wkey:
        # the offset the replay must pass}).
        self.deferred: dict[int, dict[str, int]] = {}

    # --- partitions --------------------------------------------------------------------------
    def ensure_indexed(self, p: int, first_offset: int | None = None) -> None:
        """Build the in-memory indexes of a partition from restored state (windows restored as
        their changelog lists become :class:`Window` objects here).

        ``first_offset`` is where consumption resumed (the committed offset). A window whose
        last change or closing is at or after it may have had its rollup lost with the crash
        (state and outputs are flushed together, but not atomically), so it is emitted again.
        Window ids come back from the id chunks (:meth:`EventIds.restore`)."""
        if p in self.indexed:
            return
        resumed = first_offset if first_offset is not None else self.committed(p)
        self.indexed.add(p)
        opened = self.open_by_end.setdefault(p, {})
        closed = self.closed_by_end.setdefault(p, {})
        self.ids.chunks.setdefault(p, {})
        self.ids.id_holders.setdefault(p, deque())
        meta = self.state.get(keys.meta_key(p))
        last = meta[M_LAST] if meta is not None else -1
        deferred = self.deferred.setdefault(p, {})
        now = self.clock()
        data = self.state.data
        by_first: dict[int, str] = {}
        chunk_keys: list[str] = []
        for key in self.state.keys_of(p):
            kind = key[0]
            if kind == keys.CHUNK:
                chunk_keys.append(key)
                continue
            if kind != keys.WINDOW:
                continue
            w = data[key]
            if w.__class__ is list:
                w = data[key] = Window.from_list(w)
            end = keys.window_start_of(key) + self.window_ms
            (closed if w.closed_at >= 0 else opened).setdefault(end, set()).add(key)
            self.touched[key] = now
            if w.first_offset is not None:
                by_first[w.first_offset] = key
            if w.closed_at >= 0:
                if resumed is not None and max(w.applied_offset, w.closed_at) < resumed:
                    self.emitted[key] = (w.requests, 0)
                elif self.dedup and max(w.applied_offset, w.closed_at) > last:
                    deferred[key] = max(w.applied_offset, w.closed_at)
                else:
                    self.corrections.add(key)
        if chunk_keys:
            self.ids.restore(p, chunk_keys, by_first, resumed, last)

    def drop(self, p: int) -> list[str]:
        """Forget a partition's indexes; returns its windows' keys."""
        self.indexed.discard(p)
        windows = []
        for index in (self.open_by_end.pop(p, {}), self.closed_by_end.pop(p, {})):
            for wkeys in index.values():
                for key in wkeys:
                    self.touched.pop(key, None)
                    self.emitted.pop(key, None)
                    windows.append(key)
        self.deferred.pop(p, None)
        return windows

    # --- closing and retiring ------------------------------------------------------------------
    def close_due(self, p: int, out: Outputs, meta: list[Any]) -> None:
        """Close the windows the partition's watermark has passed, at the event that moved it."""
        opened = self.open_by_end[p]
        if not opened:
            return
        horizon = meta[M_WM] - self.grace_ms
        due = [e for e in opened if e <= horizon]
        if not due:
            return
        closed = self.closed_by_end[p]
        data, dirty, emit, ids = self.state.data, self.state.dirty, self.emit, self.ids
        at = meta[M_LAST]
        for end in sorted(due):
            now_closed = closed.get(end)
            if now_closed is None:
                now_closed = closed[end] = set()
            for wkey in opened.pop(end):
                w = data.get(wkey)
                if w is None:
                    continue
                w.closed_at = at
                dirty[wkey] = p  # the window's partition: it is indexed under p
                emit(wkey, w, p, out, True)
                now_closed.add(wkey)
                ids.closed(p, at, wkey)  # its ids go once the close is committed

    def release_deferred(self, p: int, last: int) -> None:
        """Deferred windows whose events the replay has passed become corrections."""
        deferred = self.deferred.get(p)
        if deferred:
            for wkey in [k for k, at in deferred.items() if at <= last]:
                del deferred[wkey]
                self.corrections.add(wkey)

    def emit_corrections(self, out: Outputs) -> None:
        """Windows restored after a crash that may have lost their rollup: emitted again."""
        for wkey in list(self.corrections):
            w = self.state.get(wkey)
            if w is not None:
                self.emit(wkey, w, self.state.key_partition[wkey], out, closing=False)
        self.corrections.clear()

    def retire(self, p: int, wm: int, committed: int) -> None:
        """Delete the closed windows past their retention whose last change and emission are
        committed (a replay could bring back the events of the others, or their rollup may not
        be durable yet: later)."""
        closed = self.closed_by_end[p]
        for end in [e for e in closed if e + self.retention_ms <= wm]:
            keep = set()
            for wkey in closed.pop(end):
                w = self.state.get(wkey)
                if w is not None and max(w.applied_offset, w.closed_at) >= committed:
                    keep.add(wkey)
                    continue
                self.state.delete(wkey)
                self.touched.pop(wkey, None)
                self.emitted.pop(wkey, None)
                self.ids.window_ids.pop(wkey, None)
            if keep:
                closed[end] = keep

    def idle_sweep(self, out: Outputs, partitions: Iterable[int]) -> None:
        """Emit open windows that have been quiet (wall clock) for idle_timeout_seconds;
        ``partitions`` are indexed first, so windows restored after a restart are emitted
        even if no event follows."""
        for p in partitions:
            self.ensure_indexed(p)
        self.emit_corrections(out)
        limit = self.clock() - self.s.idle_timeout_seconds
        for p, opened in self.open_by_end.items():
            for wkeys in opened.values():
                for wkey in wkeys:
                    if self.touched.get(wkey, 0.0) <= limit:
                        w = self.state.get(wkey)
                        if w is not None and self.emitted.get(wkey) != self._mark(wkey, w):
                            self.emit(wkey, w, p, out, closing=False)

    # --- emission ------------------------------------------------------------------------------
    def emit(self, wkey: str, w: Window, p: int, out: Outputs, closing: bool) -> None:
        """The window's rollup (when its count or its ids changed since the last one), then the
        window rules (``closing``: it closes now and moves its client's baseline)."""
        client, dept, akey, model, ws = keys.parse_window_key(wkey)
        if dept is None:  # a window kept from before windows had a department and key in their identity
            dept = w.department
        # emitted again when its count changed, or its ids (they come back after a crash as the
        # replay passes their events: the same version, the later row replaces the earlier)
        ids = self.ids.window_ids.get(wkey)
        mark = (w.requests, len(ids) if ids is not None else 0)
        if self.emitted.get(wkey) != mark:
            self.emitted[wkey] = mark
            self.counters.rollups += 1
            out.rollups.append(
                records.usage_rollup(
                    client,
                    dept,
                    akey,
                    model,
                    ws,
                    ws + self.window_ms,
                    w,
                    None,
                    self.ids.packed(wkey, ids) if ids else "",
                )
            )
        self.rules.window(client, dept, akey, model, ws, w, closing, out.anomalies)

    def _mark(self, wkey: str, w: Window) -> tuple[int, int]:
        ids = self.ids.window_ids.get(wkey)
        return (w.requests, len(ids) if ids is not None else 0)

    def delta(
        self,
        ev: records.TokenUsageEvent,
        client: str,
        dept: str,
        akey: str,
        model: str,
        ws: int,
        p: int,
        offset: int,
        out: Outputs,
    ) -> None:
        """An event for a closed window: a one-event rollup the sink merges into the stored row
        once (by delta id, and by event id when the row lists its events)."""
        event_ids = pack_ids(id_bytes(ev["event_id"] or derived_event_id(ev)) or b"") if self.dedup else ""
        self.counters.rollups += 1
        out.rollups.append(
            records.usage_rollup(
                client,
                dept,
                akey,
                model,
                ws,
                ws + self.window_ms,
                Window.one_event(dept, ev, offset),
                f"{self.s.topic_usage}:{p}:{offset}",
                event_ids,
            )
        )
