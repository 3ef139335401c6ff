"""The two framings on the topics (Confluent wire format and single-object encoding), pure
logic: every encoder writes both byte-identically to the fastavro codec, every decoder reads
both, an id it has not seen is resolved once, and the CloudEvents headers are well formed.
The registry itself is exercised in tests/test_schema_registry.py."""

from __future__ import annotations

import io
import random
from datetime import UTC, datetime

import pytest
from fastavro import parse_schema, schemaless_writer
from test_schemas_compiled import as_epoch_ms, native, random_record  # noqa: F401 (fixture)

from tests.support import synth
from tokenaudit.inference.cloudevents import CloudEventHeaders
from tokenaudit.schemas import ANOMALY, EVENT, ROLLUP, SAMPLED, AvroDecodeError, catalog, decode, encode
from tokenaudit.schemas.codec import CONFLUENT_HEADER_LEN, confluent_header
from tokenaudit.schemas.compiled import compile_decoder, compile_encoder

NAMES = [EVENT, ROLLUP, SAMPLED, ANOMALY]
T0 = 1_795_000_000_000


@pytest.fixture
def ids():
    """Registry ids bound into the process's catalog for the test, then the catalog restored
    (other tests must not see them). Ids as a registry would give: one per version."""
    saved = (dict(catalog.by_id), dict(catalog.id_of), dict(catalog.current_ids), catalog.resolver)
    bound = {}
    next_id = 7001
    for name in NAMES:
        for sv in catalog.by_name[name]:
            catalog.bind_id(next_id, sv)
            bound[(name, sv.version)] = next_id
            next_id += 1
    yield bound
    catalog.by_id.clear(), catalog.id_of.clear(), catalog.current_ids.clear()
    catalog.by_id.update(saved[0]), catalog.id_of.update(saved[1]), catalog.current_ids.update(saved[2])
    catalog.resolver = saved[3]


@pytest.mark.parametrize("name", NAMES)
def test_both_framings_encode_identically_and_decode_to_the_same_record(name, ids, native):  # noqa: F811
    rng = random.Random(name)
    enc_c = compile_encoder(name, native=native, confluent=True)
    enc_s = compile_encoder(name, native=native)
    dec = compile_decoder(name, native=native)
    current = catalog.current(name).version
    for _ in range(200):
        record = random_record(name, rng)
        confluent, single = enc_c(record), enc_s(record)
        assert confluent == encode(name, record, confluent=True)
        assert (
            confluent[:CONFLUENT_HEADER_LEN]
            == confluent_header(ids[(name, current)])
            == b"\x00" + bytes(confluent[1:5])
        )
        assert confluent[CONFLUENT_HEADER_LEN:] == single[10:]  # the same Avro body
        assert dec(confluent) == dec(single) == as_epoch_ms(decode(confluent, name)) == as_epoch_ms(decode(single))


def test_older_versions_in_the_confluent_format_are_resolved(ids, native):  # noqa: F811
    old = {k: v for k, v in synth.event("r1", T0, "c1").items() if k not in ("ttft_ms", "tpot_ms")}
    for version in (3,):
        data = encode(EVENT, old, version=version, confluent=True)
        assert data[:5] == confluent_header(ids[(EVENT, version)])
        got = compile_decoder(EVENT, native=native)(data)
        assert got["event_id"] == old["event_id"] and got["ttft_ms"] is None  # the v4 default


def test_an_unseen_id_is_asked_of_the_registry_once(ids):
    record = synth.event("r2", T0, "c2")
    data = encode(EVENT, record, confluent=True)
    unseen = 424242
    moved = b"\x00" + unseen.to_bytes(4, "big") + data[5:]
    asked = []
    with pytest.raises(AvroDecodeError, match="unknown writer schema id 424242"):
        decode(moved)
    catalog.resolver = lambda schema_id: asked.append(schema_id) or catalog.current(EVENT).raw
    assert decode(moved, EVENT)["event_id"] == record["event_id"]
    assert decode(moved, EVENT)["event_id"] == record["event_id"]
    assert asked == [unseen]  # cached after the first answer
    catalog.resolver = lambda schema_id: None
    with pytest.raises(AvroDecodeError, match="registry has no such id"):
        decode(b"\x00" + (unseen + 1).to_bytes(4, "big") + data[5:])


def test_a_newer_writer_schema_from_the_registry_is_read_by_resolution(ids):
    newer = dict(catalog.current(ANOMALY).raw)
    newer["fields"] = [*newer["fields"], {"name": "extra", "type": "string", "default": ""}]
    record = random_record(ANOMALY, random.Random(1))
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(newer, named_schemas={}), {**record, "extra": "x" * 5})
    catalog.resolver = lambda schema_id: newer
    got = compile_decoder(ANOMALY)(b"\x00" + (9999).to_bytes(4, "big") + buf.getvalue())
    assert got == as_epoch_ms(decode(encode(ANOMALY, record)))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00\x01", "shorter than the 5-byte Confluent header"),
        (b"\x07" * 12, "neither the Confluent wire format nor Avro single-object"),
    ],
)
def test_bad_framing_is_a_clear_error(data, match, ids):
    with pytest.raises(AvroDecodeError, match=match):
        compile_decoder(EVENT)(data)


def test_truncated_confluent_body_is_a_clear_error(ids, native):  # noqa: F811
    data = encode(EVENT, synth.event("r3", T0, "c3"), confluent=True)
    with pytest.raises(AvroDecodeError, match=r"truncated|corrupt"):
        compile_decoder(EVENT, native=native)(data[:-3])


def test_confluent_needs_bound_ids():
    saved = dict(catalog.id_of)
    catalog.id_of.clear()
    try:
        with pytest.raises(KeyError, match="no registry id"):
            compile_encoder(EVENT, confluent=True)
    finally:
        catalog.id_of.update(saved)


def test_cloudevents_headers():
    event = synth.event("r4", T0 + 123, "c4")
    headers = {k: v.decode() for k, v in CloudEventHeaders("tokenaudit/host-1")(event)}
    assert headers == {
        "ce_specversion": "1.0",
        "ce_id": event["event_id"],
        "ce_source": "tokenaudit/host-1",
        "ce_type": "io.tokenaudit.TokenUsageEvent",
        "ce_time": datetime.fromtimestamp(event["ts"] / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "content-type": "application/avro",
    }
    stamp = CloudEventHeaders("s")
    for ts in (0, 999, 1000, 1_795_000_000_123, 1_795_000_000_999, 1_795_000_001_000):
        expected = datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert stamp.rfc3339(ts).decode() == expected


def test_the_worker_counts_exactly_over_a_topic_holding_both_formats(ids):
    """The first release's single-object records, then Confluent ones, mixed on one topic, and
    copies of events in the other framing (a spool written before the upgrade, replayed after):
    every event counted once, whatever its framing."""
    from test_streams_logic import PARTS, Table, drain_idle, run, settings

    from tokenaudit.streams.processor import Processor
    from tokenaudit.streams.state import MemoryState

    events = synth.mixed_stream(3000, clients=30, models=2, start_ms=T0, span_ms=12_000, seed=5)
    stream, copies = synth.with_copies(events, 0.1)
    assert copies > 100
    rnd = random.Random(9)
    logs: dict[int, list] = {p: [] for p in range(PARTS)}
    framings = {"confluent": 0, "single": 0}
    for i, e in enumerate(stream):
        confluent = i >= len(stream) // 3 and rnd.random() < 0.8  # an upgrade, then mostly the new format
        framings["confluent" if confluent else "single"] += 1
        key = e["client_id"].encode()
        p = sum(key) % PARTS
        logs[p].append((p, len(logs[p]), key, encode(EVENT, e, confluent=confluent)))
    assert min(framings.values()) > 500
    msgs = [logs[p][i] for i in range(max(map(len, logs.values()))) for p in range(PARTS) if i < len(logs[p])]
    proc, table = Processor(settings(), MemoryState()), Table()
    run(proc, table, msgs)
    drain_idle(proc, table)
    assert proc.counters.dead_lettered == 0
    assert table.totals() == synth.ground_truth(events, 2000)


def test_an_unreachable_registry_stops_the_worker_rather_than_dead_letter(ids):
    """A record whose writer id cannot be fetched now is good data: the processor raises (the
    worker exits without committing and replays it), it does not dead-letter it."""
    from test_streams_logic import settings

    from tokenaudit.errors import RegistryError
    from tokenaudit.infra.procutil import free_port
    from tokenaudit.infra.schema_registry import _Resolver
    from tokenaudit.streams.processor import Outputs, Processor
    from tokenaudit.streams.state import MemoryState

    resolver = _Resolver(f"http://127.0.0.1:{free_port()}", patience=0.5)  # nothing listens there
    with pytest.raises(RegistryError, match="unreachable"):
        resolver(1)
    catalog.resolver = resolver
    data = encode(EVENT, synth.event("r5", T0, "c5"), confluent=True)
    unseen = b"\x00" + (777_777).to_bytes(4, "big") + data[5:]
    proc, out = Processor(settings(), MemoryState()), Outputs()
    with pytest.raises(RegistryError):
        proc.process(0, 0, b"c5", unseen, out)
    assert proc.counters.dead_lettered == 0
