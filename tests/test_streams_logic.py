"""The stream job's logic without Kafka: windows against exact ground truth (copies of events
counted once), crash replays from persisted state, the top-fraction sampler against exact
quantiles, anomaly rules, dead letters. (The same code runs inside the faust worker; see
test_streams_exact.py.)"""

from __future__ import annotations

import random
import time
import zlib

import pytest

from tests.support import synth
from tokenaudit.schemas import EVENT, encode
from tokenaudit.settings import load_settings
from tokenaudit.sinks import rows as R
from tokenaudit.streams import sampler
from tokenaudit.streams.processor import Outputs, Processor
from tokenaudit.streams.state import MemoryState

T0 = 1_750_000_000_000
PARTS = 4


def settings(**kw):
    base = dict(window_seconds=2, grace_seconds=1, late_retention_seconds=6, idle_timeout_seconds=1.0, sample_warmup=50)
    base.update(kw)
    return load_settings(**base)


class Table:
    """What the ReplacingMergeTree + the sink's delta merge leave visible to FINAL queries."""

    def __init__(self):
        self.rows: dict = {}
        self.anomalies: dict = {}
        self.sampled: dict = {}
        self.duplicate_deltas = 0

    def apply(self, out: Outputs) -> None:
        for r in out.rollups:
            k = R.rollup_key(r)
            if r["delta_id"]:
                cur = self.rows.get(k)
                why = R.delta_skip(cur, r)
                if why is None:
                    self.rows[k] = R.merge_delta(cur, r)
                self.duplicate_deltas += why == "duplicate"
            elif k not in self.rows or self.rows[k]["version"] <= r["version"]:
                self.rows[k] = dict(r, late_ids=[])
        for a in out.anomalies:
            self.anomalies[R.anomaly_key(a)] = a
        for s in out.sampled:
            self.sampled[R.sampled_key(s)] = s

    def totals(self) -> dict:
        return {
            k: (
                v["requests"],
                v["errors"],
                v["input_tokens"],
                v["output_tokens"],
                v["total_tokens"],
                round(v["latency_ms_sum"], 3),
                v["latency_ms_max"],
                v["max_input_tokens"],
                v["truncated"],
            )
            for k, v in self.rows.items()
        }

    def hists(self) -> dict:
        """Each window's latency histogram as the sink stores it (the merged deltas' added in)."""
        return {k: R.rollup_row(v)[R.ROLLUP_COLUMNS.index("latency_hist")] for k, v in self.rows.items()}


def partitioned(events):
    """(partition, offset, key, value) in per-partition order, interleaved like a consumer sees them."""
    logs: dict[int, list] = {p: [] for p in range(PARTS)}
    for key, value in synth.encoded(events):
        p = zlib.crc32(key) % PARTS  # deterministic across processes (hash() is salted)
        logs[p].append((p, len(logs[p]), key, value))
    merged = []
    for i in range(max(len(v) for v in logs.values())):
        for p in range(PARTS):
            if i < len(logs[p]):
                merged.append(logs[p][i])
    return merged


def run(proc: Processor, table: Table, msgs, batch: int = 500) -> None:
    for i in range(0, len(msgs), batch):
        out = Outputs()
        for p, off, key, value in msgs[i : i + batch]:
            proc.process(p, off, key, value, out)
        proc.end_batch(out)
        table.apply(out)


def drain_idle(proc: Processor, table: Table) -> None:
    """The stream has ended: let the idle timeout pass and sweep (restored windows included)."""
    out = Outputs()
    proc.idle_sweep(out)  # indexes restored partitions, touched = now
    proc.clock = lambda: 1e12
    proc.idle_sweep(out)
    table.apply(out)


def test_rollups_exact_with_out_of_order_late_and_very_late_events():
    events = synth.mixed_stream(
        12_000,
        clients=120,
        models=3,
        start_ms=T0,
        span_ms=30_000,
        seed=3,
        late_share=0.05,
        late_ms=12_000,
        jitter_ms=900,
    )
    proc, table = Processor(settings(), MemoryState()), Table()
    run(proc, table, partitioned(events))
    drain_idle(proc, table)
    assert proc.counters.late > 0
    truth = synth.ground_truth(events, 2000)
    assert table.totals() == truth
    assert table.hists() == synth.ground_truth_hists(events, 2000)  # late deltas merged in
    # A second worker group replays the topic into the same table with a different
    # retirement history (it retires windows and drops ids as soon as possible): still exact,
    # and every event it sends again is recognised by the sink.
    msgs = partitioned(events)
    eager = Processor(settings(), MemoryState(), committed=lambda p: 1 << 40)
    run(eager, table, msgs)
    drain_idle(eager, table)
    assert eager.counters.late == proc.counters.late
    assert table.totals() == truth
    # ids are held for open windows only (the stream's last windows never close)
    assert eager.ids.window_ids and all(eager.state.get(k).closed_at == -1 for k in eager.ids.window_ids)
    held_chunks = sum(len(c) for c in eager.ids.chunks.values())
    assert 0 < held_chunks <= 4 * 6  # a few batches per partition, not the whole stream


def _crash(state: MemoryState, since: int, rnd: random.Random) -> MemoryState:
    """SIGKILL: writes made since the last commit survive only as a per-partition prefix
    (a changelog partition is appended in order; partitions are independent)."""
    tail = state.writes[since:]
    cut = {p: rnd.randint(0, sum(1 for w in tail if w[0] == p)) for p in range(PARTS)}
    seen: dict[int, int] = {}
    kept = []
    for w in tail:
        seen[w[0]] = seen.get(w[0], 0) + 1
        if seen[w[0]] <= cut[w[0]]:
            kept.append(w)
    state.writes = state.writes[:since] + kept
    return state.persisted()


def _deliver_some(pending: list[Outputs], table: Table, rnd: random.Random) -> None:
    """What a SIGKILL lets through of unacknowledged outputs. Rollups of one window share a
    Kafka key, so they share a partition, where the producer keeps their order and leaves no
    gaps: a per-key *prefix* survives. Anomalies and sampled records are keyed sets (any
    subset may survive)."""
    rollups = [r for o in pending for r in o.rollups]
    by_key: dict = {}
    for r in rollups:
        by_key.setdefault(R.rollup_key(r), []).append(r)
    cut = {k: rnd.randint(0, len(v)) for k, v in by_key.items()}
    seen: dict = {}
    survived = Outputs()
    for r in rollups:
        k = R.rollup_key(r)
        seen[k] = seen.get(k, 0) + 1
        if seen[k] <= cut[k]:
            survived.rollups.append(r)
    for o in pending:
        survived.sampled.extend(r for r in o.sampled if rnd.random() < 0.5)
        survived.anomalies.extend(r for r in o.anomalies if rnd.random() < 0.5)
    table.apply(survived)


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_crash_at_random_points_replays_exactly(seed):
    """Crash = state and outputs since the last commit are partly lost; restart from the
    committed offsets; repeat. Outputs already delivered stay (they are idempotent)."""
    rnd = random.Random(seed)
    events = synth.mixed_stream(
        8_000, clients=80, models=2, start_ms=T0, span_ms=20_000, seed=8, late_share=0.05, late_ms=9_000, jitter_ms=700
    )
    # Copies (producer retries, spool replays): most within a few hundred ms of event time,
    # some ~5-10 s later, after their window closed (sent as deltas, skipped by the sink).
    stream, near = synth.with_copies(events, 0.08, seed=seed, max_delay=40)
    stream, far = synth.with_copies(stream, 0.02, seed=seed + 100, max_delay=2_500)
    msgs = partitioned(stream)
    reference, ref_table = Processor(settings(), MemoryState()), Table()  # the same stream, no crash
    run(reference, ref_table, msgs, batch=300)
    drain_idle(reference, ref_table)
    assert ref_table.totals() == synth.ground_truth(events, 2000)
    # every copy is dropped by the worker (window open) or skipped by the sink (window closed)
    assert reference.duplicates() + ref_table.duplicate_deltas == near + far
    assert reference.duplicates() > 0 and ref_table.duplicate_deltas > 0
    s = settings()
    state, table = MemoryState(), Table()
    offsets: dict[int, int] = {}  # the group's committed offsets (next to read)
    proc = Processor(s, state, committed=offsets.get)
    committed, pos, pending, flushed_writes, replayed = 0, 0, [], 0, 0
    for _ in range(5):
        stop = min(len(msgs), pos + rnd.randint(600, 2400))
        while pos < stop:
            out = Outputs()
            for p, off, key, value in msgs[pos : pos + 300]:
                proc.process(p, off, key, value, out)
            proc.end_batch(out)  # state written (changelog) and outputs sent, not yet acknowledged
            pending.append(out)
            pos = min(pos + 300, len(msgs))
            if rnd.random() < 0.5:  # commit: flush everything first, then commit offsets
                for o in pending:
                    table.apply(o)
                pending, committed, flushed_writes = [], pos, len(state.writes)
                for p, off, _, _ in msgs[:pos]:
                    offsets[p] = off + 1
        _deliver_some(pending, table, rnd)  # some outputs of the unacknowledged batches got through
        pending = []
        state = _crash(state, flushed_writes, rnd)
        replayed += proc.counters.replayed
        proc = Processor(s, state, committed=offsets.get)
        # the restarted worker's idle sweep runs before the replay reaches the restored windows'
        # events (their ids are not all back yet)
        out = Outputs()
        proc.idle_sweep(out)
        proc.clock = lambda: 1e12
        proc.idle_sweep(out)
        proc.clock = time.monotonic
        pending.append(out)
        pos = committed
    for o in pending:  # the live worker's outputs get through
        table.apply(o)
    run(proc, table, msgs[pos:], batch=300)
    drain_idle(proc, table)
    assert replayed + proc.counters.replayed > 0  # replays happened and were absorbed
    assert table.totals() == synth.ground_truth(events, 2000)
    assert table.hists() == synth.ground_truth_hists(events, 2000)
    # the copies dropped, as persisted in the meta records, are exactly the crash-free count
    assert proc.duplicates() == reference.duplicates()


@pytest.mark.parametrize("dist", ["lognormal", "tied"])
def test_sampler_share_and_recall_100k(dist):
    rnd = random.Random(1)
    n, f = 100_000, 0.10
    if dist == "lognormal":
        values = [int(rnd.lognormvariate(5, 1)) for _ in range(n)]
    else:  # 85% at 100, 12% at 200 (the cut falls inside this run), 3% spread above
        values = [
            100 if u < 0.85 else 200 if u < 0.97 else 200 + int(u * 1000) for u in (rnd.random() for _ in range(n))
        ]
    top = sampler.TopSampler(sampler.new_sketch())  # what the worker runs (cached cut)
    sketch = top.sketch
    kept = []
    for i, v in enumerate(values):
        kept.append(top.keep(float(v), f, f"req-{i}", warmup=200))
        top.update(float(v), i)
    # the uncached rule agrees on a sample of the stream
    assert all(
        sampler.keep(sketch, float(v), f, f"req-{i}", 200) == top.keep(float(v), f, f"req-{i}", 200)
        for i, v in list(enumerate(values))[::997]
    )
    warm = 5_000
    share = sum(kept[warm:]) / (n - warm)
    exact_cut = sorted(values[warm:])[int((1 - f) * (n - warm))]
    true_top = [i for i in range(warm, n) if values[i] > exact_cut] or []
    recall = sum(kept[i] for i in true_top) / max(len(true_top), 1)
    print(f"RESULT sampler_{dist}_share={share:.4f} recall_strictly_above_cut={recall:.4f}")
    assert abs(share - f) <= 0.01
    assert recall >= 0.95
    assert len(sketch.serialize()) < 64_000  # bounded memory


def _proc_rules(**kw):
    s = settings(
        window_seconds=1,
        grace_seconds=0,
        anomaly_spike_floor_tokens=3000,
        anomaly_spike_min_history=5,
        anomaly_new_client_tokens=20_000,
        anomaly_latency_min_requests=100,
        anomaly_input_tokens=2048,
        **kw,
    )
    return Processor(s, MemoryState())


def _normal_stream(seed: int, windows: int = 30, clients: int = 40) -> list[dict]:
    rnd = random.Random(seed)
    events, i = [], 0
    for w in range(windows):
        for c in range(clients):
            for _ in range(rnd.randint(3, 6)):
                inp = rnd.randint(20, 300)
                events.append(
                    synth.event(
                        f"n{seed}-{i}",
                        T0 + w * 1000 + rnd.randint(0, 999),
                        f"client-{c}",
                        "model-a",
                        input_tokens=inp,
                        output_tokens=rnd.randint(5, 40),
                        status_code=500 if rnd.random() < 0.02 else 200,
                        latency_ms=4 + 0.05 * inp * rnd.uniform(0.8, 1.25),
                    )
                )
                i += 1
    events.sort(key=lambda e: e["ts"])
    return events


def _rules(events) -> tuple[dict, Table]:
    proc, table = _proc_rules(), Table()
    run(proc, table, partitioned(events), batch=200)
    drain_idle(proc, table)
    return {a["anomaly_id"]: a for a in table.anomalies.values()}, table


def test_anomaly_rules_quiet_on_normal_stream():
    anomalies, _ = _rules(_normal_stream(1))
    assert list(anomalies.values()) == []


def test_each_anomaly_rule_fires_on_its_planted_case_and_replay_dedups():
    events = _normal_stream(2)
    n = len(events)
    late_w = T0 + 20 * 1000
    planted = [
        synth.event("huge-1", late_w + 5, "client-1", "model-b", input_tokens=2100, output_tokens=0),
        # a document the model saw truncated to 512 tokens: the rule reads what was sent
        synth.event(
            "long-1",
            late_w + 6,
            "client-5",
            "model-b",
            input_tokens=512,
            untruncated_input_tokens=4636,
            truncated=True,
            output_tokens=3,
        ),
        *[
            synth.event(f"spike-{i}", late_w + 10 + i, "client-2", "model-a", input_tokens=400, output_tokens=100)
            for i in range(12)
        ],
        *[synth.event(f"err-{i}", late_w + 10 + i, "client-3", "model-a", status_code=503) for i in range(12)],
        *[
            synth.event(f"slow-{i}", late_w + 10 + i, "client-4", "model-a", input_tokens=200, latency_ms=500.0)
            for i in range(4)
        ],
        *[
            synth.event(f"new-{i}", late_w + 10 + i, "stranger", "model-a", input_tokens=2000, output_tokens=500)
            for i in range(10)
        ],
    ]
    events = sorted(events + planted, key=lambda e: e["ts"])
    anomalies, table = _rules(events)
    fired = {(a["rule"], a["client_id"]) for a in anomalies.values()}
    assert fired == {
        ("input_tokens", "client-1"),
        ("input_tokens", "client-5"),
        ("token_spike", "client-2"),
        ("error_rate", "client-3"),
        ("latency_per_token", "client-4"),
        ("new_client_volume", "stranger"),
    }, (fired, n)
    by_request = {a["request_id"]: a for a in anomalies.values() if a["rule"] == "input_tokens"}
    huge, long_doc = by_request["huge-1"], by_request["long-1"]
    assert huge["observed"] == 2100 and huge["message"]
    assert long_doc["observed"] == 4636 and "truncated to 512" in long_doc["message"]
    assert table.sampled[("client-1", "huge-1")]["sample_reason"] == "anomaly:input_tokens"
    assert table.sampled[("client-5", "long-1")]["sample_reason"] == "anomaly:input_tokens"
    # truncation is counted per window whether or not its rule is on
    assert sum(r["truncated"] for k, r in table.rows.items() if k[0] == "client-5") == 1
    # A second run over the same topic (fresh state: a replay) yields the same ids, so the
    # ReplacingMergeTree keeps one row per anomaly.
    again, _ = _rules(events)
    assert set(again) == set(anomalies)


def test_truncated_inputs_rule_fires_only_when_switched_on():
    events = _normal_stream(3, windows=8, clients=5)
    w = T0 + 4 * 1000
    cut = [
        synth.event(f"cut-{i}", w + 10 + i, "client-1", "model-a", input_tokens=512, truncated=True) for i in range(3)
    ]
    events = sorted(events + cut, key=lambda e: e["ts"])
    off, _ = _rules(events)
    assert [a for a in off.values() if a["rule"] == "truncated_inputs"] == []
    proc, table = _proc_rules(anomaly_truncated_requests=3), Table()
    run(proc, table, partitioned(events), batch=200)
    drain_idle(proc, table)
    fired = [a for a in table.anomalies.values() if a["rule"] == "truncated_inputs"]
    assert [(a["client_id"], a["observed"], a["window_start"]) for a in fired] == [("client-1", 3, w)]


def test_dead_letters_for_poison_and_invalid_events():
    """Each kind of poison goes to the dead-letter output with its reason; the valid events
    after it are counted exactly, and none of it moves the watermark."""
    now_ms = T0 + 60_000
    proc = Processor(
        settings(max_clock_skew_seconds=300, max_tokens_per_event=1_000_000),
        MemoryState(),
        wall_clock=lambda: now_ms / 1000,
    )
    good = synth.event("ok", T0, "c1")
    valid = encode(EVENT, good)
    poison = {
        b"random": b"\x8a\x00\xff garbage",
        b"truncated": valid[: len(valid) // 2],
        b"fingerprint": b"\xc3\x01" + b"\x42" * 8 + valid[10:],
        b"empty": encode(EVENT, dict(good, client_id="")),
        b"separator": encode(EVENT, dict(good, client_id="c\x1fx")),  # once crashed the emit path
        b"long": encode(EVENT, dict(good, model="m" * 129)),
        b"department": encode(EVENT, dict(good, department="sales\n")),
        b"key": encode(EVENT, dict(good, api_key_id="k\x00")),
        b"negative": encode(EVENT, dict(good, output_tokens=-3)),
        b"huge": encode(EVENT, dict(good, total_tokens=1_000_001)),
        b"event_id": encode(EVENT, dict(good, event_id="not-a-uuid")),
        b"future": encode(EVENT, dict(good, ts=now_ms + 301_000)),  # 301 s ahead of the clock
    }
    out = Outputs()
    for i, (key, value) in enumerate(poison.items()):
        proc.process(0, i, key, value, out)
    after = [synth.event(f"after-{i}", T0 + 10 * i, "c1") for i in range(5)]  # on time: none is late
    for i, e in enumerate(after):
        proc.process(0, 100 + i, b"c1", encode(EVENT, e), out)
    proc.end_batch(out)
    reasons = {key: reason for key, _, reason, _, _ in out.dlq}
    assert set(reasons) == set(poison)
    assert reasons[b"fingerprint"].startswith("undecodable: unknown writer schema fingerprint")
    assert reasons[b"empty"] == "invalid: client_id must not be empty"
    assert "control" in reasons[b"separator"] and reasons[b"separator"].startswith("invalid: client_id")
    assert reasons[b"department"].startswith("invalid: department") and reasons[b"key"].startswith(
        "invalid: api_key_id"
    )
    assert reasons[b"long"] == "invalid: model is 129 characters long (at most 128)"
    assert reasons[b"negative"] == "invalid: negative output_tokens"
    assert reasons[b"huge"] == "invalid: total_tokens 1000001 above the limit of 1000000"
    assert reasons[b"event_id"].startswith("invalid: event_id is not UUID text")
    assert reasons[b"future"].startswith("invalid: event time") and "301 s ahead" in reasons[b"future"]
    assert [v for _, v, _, _, _ in out.dlq] == list(poison.values())  # bytes kept as they came
    assert proc.counters.dead_lettered == len(poison) and proc.counters.events == 5
    assert proc.counters.late == 0  # the future-dated event did not move the watermark
    assert proc.state.get("p\x1f0")[0] == T0 + 40
    table = Table()
    table.apply(out)
    drain_idle(proc, table)
    assert table.totals() == synth.ground_truth(after, 2000)


def test_clock_skew_decision_replays_the_same_after_a_crash():
    """The future-dated event was dead-lettered; after a crash the replay happens when the clock
    has caught up, and still dead-letters it (the decision is kept until committed)."""
    clock = [T0 / 1000]
    state = MemoryState()
    proc = Processor(settings(), state, wall_clock=lambda: clock[0])
    events = [synth.event("a", T0, "c1"), synth.event("b", T0 + 400_000, "c1"), synth.event("c", T0 + 5, "c1")]
    out = Outputs()
    for i, e in enumerate(events):
        proc.process(0, i, b"c1", encode(EVENT, e), out)
    proc.end_batch(out)
    assert next(r for _, _, r, _, _ in out.dlq).startswith("invalid: event time")
    clock[0] = (T0 + 500_000) / 1000  # much later: "b" is no longer in the future
    again = Processor(settings(), state.persisted(), wall_clock=lambda: clock[0])
    out2 = Outputs()
    for i, e in enumerate(events):
        again.process(0, i, b"c1", encode(EVENT, e), out2)
    again.end_batch(out2)
    assert len(out2.dlq) == 1 and again.state.get("p\x1f0")[0] == T0 + 5


def test_a_client_changing_department_mid_window_is_charged_to_each():
    proc, table = Processor(settings(), MemoryState()), Table()
    events = [
        synth.event("r1", T0 + 10, "c1", department="sales", input_tokens=10, output_tokens=1),
        synth.event("r2", T0 + 20, "c1", department="research", input_tokens=20, output_tokens=2),
        synth.event("r3", T0 + 30, "c1", department="sales", input_tokens=30, output_tokens=3, api_key_id="k9"),
        synth.event("r4", T0 + 40, "c1", department="sales", input_tokens=40, output_tokens=4),
    ]
    run(proc, table, partitioned(events))
    drain_idle(proc, table)
    got = {(k[1], k[2]): v[0:3] for k, v in table.totals().items()}
    assert got == {("sales", ""): (2, 0, 50), ("research", ""): (1, 0, 20), ("sales", "k9"): (1, 0, 30)}
    assert table.totals() == synth.ground_truth(events, 2000)
    assert table.hists() == synth.ground_truth_hists(events, 2000)


def test_old_writer_versions_get_derived_ids_so_their_copies_count_once():
    """A v2 record (no event_id) sent twice, and the same event as v3 without event_id: one id."""
    from tokenaudit.schemas import catalog

    proc, table = Processor(settings(), MemoryState()), Table()
    e = synth.event("old-1", T0 + 5, "c1")
    bare = {k: v for k, v in e.items() if k not in ("event_id", "instance")}
    v2 = catalog.encode(EVENT, bare, version=2)
    v3 = encode(EVENT, dict(bare, event_id=None))
    other = synth.event("new-1", T0 + 6, "c1")
    out = Outputs()
    for i, value in enumerate([v2, v2, v3, encode(EVENT, other), encode(EVENT, other)]):
        proc.process(0, i, b"c1", value, out)
    proc.end_batch(out)
    table.apply(out)
    drain_idle(proc, table)
    assert [v[0] for v in table.totals().values()] == [2] and proc.duplicates() == 3


def test_id_chunks_stay_bounded_and_copies_after_the_window_go_to_the_sink():
    """Ids are held only while their window is open: with committed offsets advancing, chunks
    are tombstoned and window ids dropped; a copy after its window closed is a delta the sink
    recognises."""
    events = synth.mixed_stream(6_000, clients=30, models=1, start_ms=T0, span_ms=60_000, seed=4, late_share=0.0)
    msgs = partitioned(events)
    proc, table = Processor(settings(), MemoryState(), committed=lambda p: 1 << 40), Table()
    held = []
    for i in range(0, len(msgs), 200):
        out = Outputs()
        for p, off, key, value in msgs[i : i + 200]:
            proc.process(p, off, key, value, out)
        proc.end_batch(out)
        table.apply(out)
        held.append(sum(len(v) for v in proc.ids.window_ids.values()) // 8)
    assert max(held) < 6_000 * 3 / 60 * 2  # ~ (window + grace) of events, not the stream
    live_chunks = [k for k in proc.state.data if k.startswith("d\x1f")]
    assert 0 < len(live_chunks) <= 4 * 4
    assert sum(1 for _, k, v in proc.state.writes if k.startswith("d\x1f") and v is None) > 20  # tombstoned
    copy = dict(events[10])  # its window closed long ago
    out = Outputs()
    p = partitioned([copy])[0][0]
    proc.process(p, 10_000, copy["client_id"].encode(), encode(EVENT, copy), out)
    proc.end_batch(out)
    assert [r["delta_id"] is not None for r in out.rollups] == [True]
    table.apply(out)
    drain_idle(proc, table)
    assert table.duplicate_deltas == 1 and table.totals() == synth.ground_truth(events, 2000)


def _random_json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 7)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 7, 2**31, -(2**63), 2**63 - 1, 2**63, -(2**63) - 1, 10**30, -(10**25)])
    if kind == 2:
        return rng.randrange(-(10**12), 10**12)
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-7, 1e16, 1e22, 2.5e300, 0.1 + 0.2, float("inf"), float("-inf"), float("nan")])
    if kind == 4:
        return rng.uniform(-1e6, 1e6)
    if kind in (5, 6):
        return "".join(
            rng.choice(["a", "Z", " ", "\x1f", "\x00", '"', "\\", "/", "\n", "\x7f", "é", "日", "\U0001f600", "\ud800"])
            for _ in range(rng.randrange(12))
        )
    if kind == 7:
        return [_random_json_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    return (
        {"k": _random_json_value(rng, depth + 1)}
        if rng.random() < 0.2
        else tuple(_random_json_value(rng, depth + 1) for _ in range(rng.randrange(4)))
    )


def test_changelog_records_are_written_as_faust_json_reads_them():
    """Keys and values, from the native writer (when built) and its stdlib twin, are exactly the
    bytes json.dumps (faust's codec) writes, on random nested values, state lists included."""
    import json

    from tokenaudit.streams import changelog as app

    assert app._fastjson is not None, "streams/_fastjson.pyx is not built: see the install output"
    rng = random.Random(3)
    state_like = [
        ["dept-ü", 1, 0, 49, 50, 99, 32.45, 1e-07, 49, 0, 12, -1, -1, 0.1 + 0.2, 2**62, 3],
        [0, 1.0, 2.5e300, -1, 1_795_000_000_000],
        [sampler.dump_sketch(sampler.new_sketch()), 17],
        "w\x1fclient-ü\x1fm\x1f0",
        "p\x1f3",
    ]
    for value in state_like + [_random_json_value(rng) for _ in range(3000)]:
        expected = json.dumps(value, separators=(",", ":")).encode()
        assert app._json_bytes(value) == expected
        assert app._json_bytes_python(value) == expected
    with pytest.raises(TypeError):
        app._json_bytes([object()])
