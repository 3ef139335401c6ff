"""A fixed stream through the worker's processor, and the changelog it writes: what
tests/data/changelog-0.1.0.jsonl holds, as the release before typed window state wrote it.

Run as a script to print the changelog records (JSON lines: partition, key text, value text
or null), with ``PYTHONHASHSEED=0`` (set iteration decides the order windows closing at the
same offset are emitted, and so their client's baseline):

    PYTHONHASHSEED=0 python -m tests.support.changelog_stream > changelog.jsonl

Imports fall back to the 0.1.0 layout so the same script regenerates the fixture from that code.
"""

from __future__ import annotations

import json
import sys
import zlib

from tokenaudit.settings import load_settings
from tokenaudit.streams.processor import Outputs, Processor
from tokenaudit.streams.state import MemoryState

try:
    from tests.support import synth
except ImportError:  # 0.1.0
    from tokenaudit.streams import synth  # type: ignore[no-redef]
try:
    from tokenaudit.streams.changelog import changelog_record
except ImportError:  # 0.1.0
    from tokenaudit.streams.app import _json_bytes, _json_key

    def changelog_record(partition, key, value):
        return partition, _json_key(key).encode(), None if value is None else _json_bytes(value)


T0 = 1_750_000_000_000
PARTS = 2
BATCH = 150
CUT = 900  # records processed into the fixture's changelog; the rest of the stream follows it


def settings():
    return load_settings(
        window_seconds=2, grace_seconds=1, late_retention_seconds=4, idle_timeout_seconds=1.0, sample_warmup=50
    )


def stream() -> tuple[list[dict], list[tuple[int, int, bytes, bytes]]]:
    """The events (with copies and late ones), and (partition, offset, key, value) in the
    interleaved order a consumer sees them."""
    events = synth.mixed_stream(
        1500, clients=8, models=2, start_ms=T0, span_ms=20_000, seed=11, late_share=0.05, late_ms=6_000, jitter_ms=400
    )
    events, _ = synth.with_copies(events, 0.03, seed=5, max_delay=30)
    logs: dict[int, list] = {p: [] for p in range(PARTS)}
    for key, value in synth.encoded(events):
        p = zlib.crc32(key) % PARTS
        logs[p].append((p, len(logs[p]), key, value))
    msgs = [logs[p][i] for i in range(max(map(len, logs.values()))) for p in range(PARTS) if i < len(logs[p])]
    return events, msgs


def processor(state, committed: dict[int, int]) -> Processor:
    """The processor both runs use: fixed clocks, the given committed offsets."""
    return Processor(settings(), state, committed=committed.get, clock=lambda: 0.0, wall_clock=lambda: T0 / 1000 + 3600)


def run(proc: Processor, msgs, committed: dict[int, int], apply=None) -> None:
    """Batches of BATCH records, each committed once handled (as the worker commits)."""
    for i in range(0, len(msgs), BATCH):
        out = Outputs()
        for p, off, key, value in msgs[i : i + BATCH]:
            proc.process(p, off, key, value, out)
        proc.end_batch(out)
        if apply is not None:
            apply(out)
        for p, off, _, _ in msgs[i : i + BATCH]:
            committed[p] = off + 1


def changelog_lines(state) -> list[str]:
    out = []
    for partition, key, value in state.writes:
        p, k, v = changelog_record(partition, key, value)
        out.append(json.dumps([p, k.decode(), None if v is None else v.decode()]))
    return out


def main() -> None:
    _, msgs = stream()
    state = MemoryState()
    run(processor(state, committed := {}), msgs[:CUT], committed)
    sys.stdout.write("\n".join(changelog_lines(state)) + "\n")


if __name__ == "__main__":
    main()
