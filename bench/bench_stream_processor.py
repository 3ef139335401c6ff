"""The stream worker's processing alone, in process, without Kafka: events/s of
``Processor.process_records`` + ``end_batch`` (decode, validate, dedup, windows, rules,
sampling, outputs, changelog values JSON-encoded as the worker writes them) on the two shapes
of bench_stream_throughput.py (live: ~25 events per window; backfill: ~1.5, nearly every
event opens, closes and emits a window), batches of 20,000 records over 4 partitions.

Steadier than the end-to-end bench (no broker, no sink, no fetch waits), so it is what tells a
change in the processor's own cost: run it on the code before and after, side by side, in one
session, and compare the ratio; on a shared box compare the events per CPU second (this
process's CPU time), which other processes disturb least. The budget spend counting
(streams/spend.py) is also measured switched off, alternating rounds with it on: its cost as
a ratio in one run. Prints RESULT lines. Usage:
python bench/bench_stream_processor.py [events] [rounds]
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: the suite's helpers

from tokenaudit.settings import load_settings
from tokenaudit.streams.processor import Outputs, Processor
from tokenaudit.streams.state import State

try:
    from tests.support import synth
except ImportError:  # the code before the helpers moved under tests/
    from tokenaudit.streams import synth  # type: ignore[no-redef]
from tokenaudit.streams import app as _app

if hasattr(_app, "_json_bytes"):  # the code before the changelog encoding had a module of its own

    def changelog_record(partition, key, value):
        return partition, _app._json_key(key).encode(), None if value is None else _app._json_bytes(value)
else:
    from tokenaudit.streams.changelog import changelog_record

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
PARTS = 4
BATCH = 20_000
T0 = 1_750_000_000_000
SHAPES = {"live": 1 / 30, "backfill": 2.0}  # event-time ms per event, as in bench_stream_throughput.py


class EncodingState(State):
    """State whose flush encodes every changelog record as the worker does (and drops it)."""

    def __init__(self) -> None:
        super().__init__()
        self.records = 0

    def _write(self, partition, key, value) -> None:
        changelog_record(partition, key, value)
        self.records += 1


class Record:
    __slots__ = ("key", "offset", "value")

    def __init__(self, offset, key, value):
        self.offset, self.key, self.value = offset, key, value


def batches(shape: str) -> list[list[tuple[int, list[Record]]]]:
    events = synth.mixed_stream(
        N,
        clients=2000,
        models=3,
        start_ms=T0,
        span_ms=int(N * SHAPES[shape]),
        seed=1,
        late_share=0.01,
        late_ms=5_000,
        jitter_ms=500,
        dept_switch=0.0,
    )
    stream, _ = synth.with_copies(events, 0.01, seed=2, max_delay=20)
    logs: dict[int, list[Record]] = {p: [] for p in range(PARTS)}
    for key, value in synth.encoded(stream):
        p = zlib.crc32(key) % PARTS
        logs[p].append(Record(len(logs[p]), key, value))
    out = []
    per_part = BATCH // PARTS
    for start in range(0, max(len(v) for v in logs.values()), per_part):
        out.append([(p, logs[p][start : start + per_part]) for p in range(PARTS) if logs[p][start : start + per_part]])
    return out


def run(shape: str, work, spend: bool = True) -> tuple[float, float, int]:
    s = load_settings(window_seconds=10, grace_seconds=2, idle_timeout_seconds=1.0)
    state = EncodingState()
    proc = Processor(s, state, clock=lambda: 0.0, wall_clock=lambda: T0 / 1000 + 86400)
    if not spend and hasattr(proc, "spend"):  # the processor without budget spend counting
        proc.spend.count = proc.spend.count_late = lambda *args: None
    n = sum(len(recs) for batch in work for _, recs in batch)
    started, cpu = time.perf_counter(), time.process_time()
    for batch in work:
        out = Outputs()
        for p, recs in batch:
            proc.process_records(p, recs, out)
        proc.end_batch(out)
    return n / (time.perf_counter() - started), n / (time.process_time() - cpu), state.records


def main() -> None:
    for shape in SHAPES:
        work = batches(shape)
        rates, cpu_rates, off_cpu_rates = [], [], []
        for _ in range(ROUNDS):
            rate, cpu_rate, records = run(shape, work)
            rates.append(rate)
            cpu_rates.append(cpu_rate)
            off_cpu_rates.append(run(shape, work, spend=False)[1])
        print(
            f"RESULT processor_{shape}_events_per_s={max(rates):.0f}  (best of {ROUNDS}; all: "
            f"{', '.join(f'{r:.0f}' for r in rates)}; {records} changelog records)",
            flush=True,
        )
        # per CPU second of this process: what other processes on a shared box disturb least
        print(
            f"RESULT processor_{shape}_events_per_cpu_s={max(cpu_rates):.0f}  (best of {ROUNDS}; all: "
            f"{', '.join(f'{r:.0f}' for r in cpu_rates)})",
            flush=True,
        )
        print(
            f"RESULT processor_{shape}_spend_off_events_per_cpu_s={max(off_cpu_rates):.0f}  (best of {ROUNDS}, "
            f"rounds alternating with spend on; on/off = {max(cpu_rates) / max(off_cpu_rates):.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
