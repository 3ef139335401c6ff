"""The stream job's logic, free of faust: events in, rollups / sampled records / anomalies /
dead letters out, with all state in a :class:`~tokenaudit.streams.state.State`.

Why it is built this way (see DESIGN.md):

* **Event-time windows in our own state.** Per (client_id, model) tumbling windows keyed
  ``w<US>client<US>model<US>window_start``. A partition's watermark is the largest event
  time seen on it; a window is *closed* (rollup emitted, baseline updated) once the
  watermark passes its end plus grace, and a wall-clock idle sweep emits open windows that
  have been quiet for ``idle_timeout_seconds`` so quiet clients still get rows.
* **Late events are never dropped.** A closed window stays in state for
  ``late_retention_seconds`` of event time; a late event updates it and re-emits the whole
  row with a higher version, which replaces the earlier row in ClickHouse. An event later
  than that (or a window whose state is gone) is sent as a *delta* rollup with a
  deterministic ``delta_id``; the sink merges it into the stored row exactly once.
* **Exactly-once effect from at-least-once delivery.** Every state value carries the
  source offset that last changed it. A replayed event (offset <= that) changes nothing but
  re-emits its outputs, which are idempotent downstream: rollup version = the window's
  request count (monotone, and the content for a given count is fixed by partition order),
  anomaly ids are hashes of (rule, client, model, window), sampled records are keyed by
  request id.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenaudit.schemas import EVENT, AvroDecodeError
from tokenaudit.schemas.compiled import compile_decoder
from tokenaudit.streams import sampler
from tokenaudit.streams.state import State

SEP = "\x1f"

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
DEPT, REQ, ERR, IN, OUT, TOT, LSUM, LMAX, MAXIN, TRUNC, OFF, CLOSED, FIRED, NLAT, NIN, NCNT = range(16)
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
    events: int = 0
    replayed: int = 0
    dlq: int = 0
    late: int = 0
    late_beyond_retention: int = 0
    rollups: int = 0
    sampled: int = 0
    anomalies: int = 0


def anomaly_id(rule: str, client_id: str, model: str, window_start: int) -> str:
    return hashlib.sha1(f"{rule}{SEP}{client_id}{SEP}{model}{SEP}{window_start}".encode()).hexdigest()[:24]


def validate(ev: dict) -> str | None:
    """Why an event is unusable, or None."""
    if not ev["client_id"]:
        return "invalid: empty client_id"
    if not ev["model"]:
        return "invalid: empty model"
    for name in ("input_tokens", "output_tokens", "total_tokens"):
        if ev[name] < 0:
            return f"invalid: negative {name}"
    if not 100 <= ev["status_code"] <= 599:
        return f"invalid: status_code {ev['status_code']}"
    if not math.isfinite(ev["latency_ms"]) or ev["latency_ms"] < 0:
        return "invalid: latency_ms"
    return None


class Processor:
    def __init__(self, settings, state: State, clock=time.monotonic, committed=None):
        self.s = settings
        # committed(partition) -> the group's committed offset (next to read) or None.
        self.committed = committed or (lambda p: None)
        self.state = state
        self.clock = clock
        self.window_ms = settings.window_seconds * 1000
        self.grace_ms = settings.grace_seconds * 1000
        self.retention_ms = max(settings.late_retention_seconds * 1000, self.grace_ms)
        self.counters = Counters()
        # Derived, in-memory only (rebuilt from state when a partition is first seen).
        self.indexed: set[int] = set()
        self.open_by_end: dict[int, dict[int, set[str]]] = {}
        self.closed_by_end: dict[int, dict[int, set[str]]] = {}
        self.touched: dict[str, float] = {}
        self.emitted: dict[str, int] = {}
        self.sketches: dict[tuple[int, str], sampler.TopSampler] = {}  # (partition, model)
        self.dirty_sketches: set[tuple[int, str]] = set()
        self.batch_partitions: set[int] = set()
        self.corrections: set[str] = set()
        self._meta_keys: dict[int, str] = {}
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
        (state and outputs are flushed together, but not atomically), so it is emitted again."""
        if p in self.indexed:
            return
        resumed = first_offset if first_offset is not None else self.committed(p)
        self.indexed.add(p)
        opened = self.open_by_end.setdefault(p, {})
        closed = self.closed_by_end.setdefault(p, {})
        now = self.clock()
        for key in self.state.keys_of(p):
            if key[0] != "w":
                continue
            w = self.state.get(key)
            end = int(key.rsplit(SEP, 1)[1]) + self.window_ms
            (closed if w[CLOSED] >= 0 else opened).setdefault(end, set()).add(key)
            self.touched[key] = now
            if w[CLOSED] >= 0:
                if resumed is not None and max(w[OFF], w[CLOSED]) < resumed:
                    self.emitted[key] = w[REQ]
                else:
                    self.corrections.add(key)

    def drop_partitions(self, partitions, drop_state: bool = True) -> None:
        """Forget derived state of partitions this worker no longer owns."""
        for p in partitions:
            self.indexed.discard(p)
            for index in (self.open_by_end.pop(p, {}), self.closed_by_end.pop(p, {})):
                for keys in index.values():
                    for key in keys:
                        self.touched.pop(key, None)
                        self.emitted.pop(key, None)
            for sk in [k for k in self.sketches if k[0] == p]:
                self.sketches.pop(sk, None)
                self.dirty_sketches.discard(sk)
        if drop_state:
            self.state.drop_partitions(partitions)

    def _meta(self, p: int) -> list:
        key = f"p{SEP}{p}"
        meta = self.state.get(key)
        if meta is None:
            meta = [0, -1]  # watermark ms, last offset
            self.state.put(p, key, meta)
        return meta

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
        decode = decode_event
        window_ms, grace_ms, retention_ms = self.window_ms, self.grace_ms, self.retention_ms
        mkey = self._meta_keys.get(p) or self._meta_key(p)
        per_request = self._per_request
        norms: dict[str, tuple[str, list]] = {}  # model -> (key, value) for this run
        meta = None
        events = replayed = late = 0
        for record in records:
            if record.__class__ is tuple:
                offset, key, value = record
            else:
                offset, key, value = record.offset, record.key, record.value
            try:
                ev = decode(value)
            except AvroDecodeError as exc:
                self._dead(out, key, value, f"undecodable: {exc}", p, offset)
                continue
            except Exception as exc:  # never let one message stop the worker
                self._dead(out, key, value, f"undecodable: {exc!r}", p, offset)
                continue
            # validate()'s checks, inline for the valid case (NaN fails the chained comparison)
            if not (ev["client_id"] and ev["model"] and ev["input_tokens"] >= 0 and ev["output_tokens"] >= 0
                    and ev["total_tokens"] >= 0 and 100 <= ev["status_code"] <= 599
                    and 0.0 <= ev["latency_ms"] < INF):
                self._dead(out, key, value, validate(ev) or "invalid", p, offset)
                continue
            if meta is None:
                if p not in self.indexed:
                    self._ensure_indexed(p, offset)
                self.batch_partitions.add(p)
                meta = data.get(mkey)
                if meta is None:
                    meta = self._meta(p)
            events += 1
            ts = ev["ts"]
            if offset > meta[1]:
                advanced = ts > meta[0]
                if advanced:
                    meta[0] = ts
                meta[1] = offset
                dirty[mkey] = p
                if advanced:  # the closing offset is this event's: a replay from here re-closes
                    self._close_due(p, out, meta)
            client, model = ev["client_id"], ev["model"]
            ws = ts - ts % window_ms
            end = ws + window_ms
            wkey = f"w{SEP}{client}{SEP}{model}{SEP}{ws}"
            w = data.get(wkey)
            if w is None and end + retention_ms <= meta[0]:
                # Never in state, or retired after all its events and its rollup were committed
                # (so this cannot be a replay of an event already counted): a one-event delta.
                self._delta(ev, ws, p, offset, out)
                per_request(ev, None, wkey, ws, p, offset, out)
                continue
            if w is None:
                # A client's state comes with its first window and is never retired, so a
                # window in state implies its client's (put first: a changelog prefix that
                # restores the window restores the client too).
                ckey = f"c{SEP}{client}"
                if ckey not in data:
                    st.put(p, ckey, [0, 0.0, 0.0, -1, ws])
                closed = offset if end + grace_ms <= meta[0] else -1
                w = [ev["department"], 0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, -1, closed, -1, 0.0, 0, 0]
                st.put(p, wkey, w)
                index = (self.closed_by_end if closed >= 0 else self.open_by_end)[p]
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
                if w[CLOSED] >= 0:
                    late += 1
                    self.corrections.add(wkey)
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
            per_request(ev, w, wkey, ws, p, offset, out)
        c = self.counters
        c.events += events
        c.replayed += replayed
        c.late += late

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

    def _per_request(self, ev: dict, w: list | None, wkey: str, ws: int, p: int, offset: int, out: Outputs) -> None:
        """Per-request anomaly rule and the top-fraction sampler."""
        kept = False
        if ev["input_tokens"] > self.input_threshold and (w is None or w[FIRED] in (-1, offset)):
            if w is not None and w[FIRED] == -1:
                w[FIRED] = offset
                self.state.touch(wkey)
            obs, thr = ev["input_tokens"], self.input_threshold
            out.anomalies.append(self._anomaly(
                "input_tokens", ev["client_id"], ev["department"], ev["model"], ws, obs, thr,
                f"request {ev['request_id']} sent {obs} input tokens (threshold {thr})",
                request_id=ev["request_id"], ts=ev["ts"]))
            out.sampled.append(self._sampled(ev, "anomaly:input_tokens", float(thr)))
            kept = True
        model = ev["model"]
        top = self.sketches.get((p, model)) or self._sketch(p, model)
        total = float(ev["total_tokens"])
        if not kept and top.keep(total, self.sample_fraction, ev["request_id"], self.sample_warmup):
            out.sampled.append(self._sampled(ev, "top_fraction", top.threshold()))
        if offset > top.offset:
            top.update(total, offset)
            self.dirty_sketches.add((p, model))

    def _dead(self, out: Outputs, key, value, reason: str, p: int, offset: int) -> None:
        self.counters.dlq += 1
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

    def end_batch(self, out: Outputs) -> None:
        """Close windows the watermark has passed, emit corrections, persist dirty state."""
        for p in self.batch_partitions:
            self._close_due(p, out, self._meta(p))
        # Corrections before retirement: a late event applied in this batch must be emitted
        # even when its window is retired at the end of the same batch.
        for wkey in self.corrections:
            w = self.state.get(wkey)
            if w is not None:
                self._emit(wkey, w, self.state.key_partition[wkey], out, closing=False)
        self.corrections.clear()
        for p in self.batch_partitions:
            wm = self._meta(p)[0]
            closed = self.closed_by_end[p]
            committed = self.committed(p)
            if committed is None:
                continue  # nothing committed yet: a replay could still need every window
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
                if keep:
                    closed[end] = keep
        self.batch_partitions.clear()
        for p, model in self.dirty_sketches:
            top = self.sketches[(p, model)]
            self.state.put(p, f"s{SEP}{p}{SEP}{model}", [sampler.dump_sketch(top.sketch), top.offset])
        self.dirty_sketches.clear()
        self.state.flush()

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
                        if w is not None and self.emitted.get(wkey) != w[REQ]:
                            self._emit(wkey, w, p, out, closing=False)

    def _emit(self, wkey: str, w: list, p: int, out: Outputs, closing: bool) -> None:
        _, client, model, ws_text = wkey.split(SEP)
        ws = int(ws_text)
        if self.emitted.get(wkey) != w[REQ]:
            self.emitted[wkey] = w[REQ]
            out.rollups.append(self._rollup(client, model, ws, w))
        self._window_rules(client, model, ws, w, p, out, closing)

    def _rollup(self, client: str, model: str, ws: int, w: list, delta_id: str | None = None) -> dict:
        self.counters.rollups += 1
        return {
            "client_id": client, "department": w[DEPT], "model": model,
            "window_start": ws, "window_end": ws + self.window_ms,
            "requests": w[REQ], "errors": w[ERR], "input_tokens": w[IN], "output_tokens": w[OUT],
            "total_tokens": w[TOT], "latency_ms_sum": w[LSUM], "latency_ms_max": w[LMAX],
            "max_input_tokens": w[MAXIN], "truncated": w[TRUNC], "version": w[REQ], "delta_id": delta_id,
            "applied_offset": w[OFF],
        }

    def _delta(self, ev: dict, ws: int, p: int, offset: int, out: Outputs) -> None:
        """An event later than the state retention: one-event rollup, merged by the sink once."""
        self.counters.late_beyond_retention += 1
        w = [ev["department"], 1, int(ev["status_code"] >= 400), ev["input_tokens"], ev["output_tokens"],
             ev["total_tokens"], ev["latency_ms"], ev["latency_ms"], ev["input_tokens"], int(bool(ev["truncated"])),
             offset, 1, -1, 0.0, 0, 0]
        out.rollups.append(self._rollup(ev["client_id"], ev["model"], ws, w, delta_id=f"{self.s.topic_usage}:{p}:{offset}"))

    # --- window anomaly rules ------------------------------------------------------------------
    def _window_rules(self, client: str, model: str, ws: int, w: list, p: int, out: Outputs, closing: bool) -> None:
        ckey = f"c{SEP}{client}"
        c = self.state.data.get(ckey)
        dept = w[DEPT]
        tokens = w[TOT]
        if c is not None and c[C_N] >= self.spike_min_history:
            sigma = max(math.sqrt(max(c[C_VAR], 0.0)), 0.1 * c[C_MEAN], 1.0)
            thr = max(self.spike_floor, c[C_MEAN] + self.spike_k * sigma)
            if tokens > thr:
                out.anomalies.append(self._anomaly(
                    "token_spike", client, dept, model, ws, tokens, thr,
                    f"{tokens} tokens in the window vs a baseline of {c[C_MEAN]:.0f} (band {thr:.0f})"))
        if w[REQ] >= self.error_min_requests and w[ERR] / w[REQ] >= self.error_rate:
            rate = w[ERR] / w[REQ]
            out.anomalies.append(self._anomaly(
                "error_rate", client, dept, model, ws, rate, self.error_rate,
                f"{w[ERR]} of {w[REQ]} requests failed ({rate:.0%})"))
        if (len(w) > NCNT and w[NCNT] >= self.latency_min_requests and w[NIN] > 0 and w[IN] > 0
                and w[REQ] >= 3):
            model_ratio = w[NLAT] / w[NIN]
            ratio = w[LSUM] / w[IN]
            if ratio > self.latency_factor * model_ratio:
                out.anomalies.append(self._anomaly(
                    "latency_per_token", client, dept, model, ws, ratio, model_ratio,
                    f"{ratio:.3f} ms per input token vs {model_ratio:.3f} for {model}"))
        if c is not None and c[C_N] == 0 and c[C_FIRST] == ws and tokens >= self.new_client_tokens:
            out.anomalies.append(self._anomaly(
                "new_client_volume", client, dept, model, ws, tokens, self.new_client_tokens,
                f"never-seen client used {tokens} tokens in its first window"))
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
                 message: str, request_id: str | None = None, ts: Any = None) -> dict:
        self.counters.anomalies += 1
        severity = "critical" if thr > 0 and observed >= 2 * thr else "warning"
        return {
            "anomaly_id": anomaly_id(rule, client, model, ws), "ts": ts if ts is not None else ws + self.window_ms,
            "client_id": client, "department": dept, "model": model, "rule": rule, "severity": severity,
            "observed": float(observed), "threshold": float(thr), "window_start": ws,
            "request_id": request_id, "message": message,
        }

    def _sampled(self, ev: dict, reason: str, thr: float) -> dict:
        self.counters.sampled += 1
        return {
            "request_id": ev["request_id"], "ts": ev["ts"], "client_id": ev["client_id"],
            "department": ev["department"], "model": ev["model"], "input_tokens": ev["input_tokens"],
            "output_tokens": ev["output_tokens"], "total_tokens": ev["total_tokens"],
            "latency_ms": ev["latency_ms"], "status_code": ev["status_code"], "sample_reason": reason,
            "threshold": thr, "untruncated_input_tokens": ev["untruncated_input_tokens"],
            "truncated": bool(ev["truncated"]), "queue_ms": ev["queue_ms"], "inference_ms": ev["inference_ms"],
            "path": ev["path"], "error_type": ev["error_type"] or "", "batch_size": ev["batch_size"],
            "device": ev["device"], "prompt_digest": ev["prompt_digest"] or "",
        }
