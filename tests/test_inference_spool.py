"""The on-disk spool (framing, resync, torn tails, quarantine, resume points, legacy segments,
the unauthenticated share, the directory lock, a real full filesystem), the publisher's
failure accounting without a broker, prompt digests and `keys add`. No broker here."""

from __future__ import annotations

import logging
import os
from datetime import UTC
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.support.waiting import wait_for
from tokenaudit.inference.audit import AuditContext, PromptDigester
from tokenaudit.inference.identity import UNAUTHENTICATED
from tokenaudit.inference.publisher import EventPublisher
from tokenaudit.inference.spool import ACK_SUFFIX, Appended, Spool, SpoolLocked
from tokenaudit.inference.spool_format import encode_legacy_record, encode_record
from tokenaudit.infra.keys import KeyRegistry
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import EVENT, decode


class Losses:
    """Collects what the spool reports through ``on_loss``."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def __call__(self, kind: str, records: int) -> None:
        self.seen.append((kind, records))


def _drain(spool: Spool) -> list[tuple[bytes, bytes, list | None]]:
    got = []
    while (seg := spool.oldest_segment()) is not None:
        got.extend((r.key, r.value, r.headers) for r in spool.pending(seg))
        spool.remove(seg)
    return got


def _sealed(tmp_path: Path, records, **kw) -> tuple[Path, list[int]]:
    """A closed spool holding ``records`` in one segment; returns the segment and record offsets."""
    spool = Spool(tmp_path, max_bytes=1 << 24, **kw)
    offsets, pos = [], 0
    for key, value in records:
        assert spool.append(key, value) is Appended.STORED
        offsets.append(pos)
        pos += len(encode_record(key, value))
    spool.close()
    [segment] = spool.segments()
    return segment, offsets


def test_records_keep_key_value_headers_and_order_across_segments_and_reopen(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    records = [
        (
            f"c{i % 3}".encode(),
            f"value-{i}".encode() * 5,
            [("ce_id", f"id-{i}".encode()), ("empty", b""), ("null", None)] if i % 2 else None,
        )
        for i in range(40)
    ]
    for k, v, h in records:
        assert spool.append(k, v, h) is Appended.STORED
    assert spool.append(b"k", b"v", [("text", "é")]) is Appended.STORED, "str header values are stored as UTF-8"
    records.append((b"k", b"v", [("text", "é".encode())]))
    spool.close()
    assert len(spool.segments()) > 5
    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    assert reopened.bytes == spool.bytes == sum(p.stat().st_size for p in tmp_path.glob("*.seg")) > 0
    names = [p.name for p in reopened.segments()]
    assert _drain(reopened) == records
    assert reopened.empty() and reopened.bytes == 0 and not list(tmp_path.glob("*.seg"))
    assert reopened.append(b"k", b"v") is Appended.STORED
    assert reopened.segments()[0].name > max(names), "segment names are never reused (quarantine names carry them)"


def test_full_spool_refuses_newest_records(tmp_path):
    spool = Spool(tmp_path, max_bytes=400)
    stored = [spool.append(b"k", b"x" * 50) for _ in range(10)]
    assert stored[:5] == [Appended.STORED] * 5 and set(stored[6:]) == {Appended.FULL}, "drop newest"
    assert spool.bytes <= 400 and spool.count() == stored.count(Appended.STORED)


def test_torn_tail_is_truncated_at_start_up_reported_and_kept_in_quarantine(tmp_path, caplog):
    segment, offsets = _sealed(tmp_path, [(b"k", f"event-{i}".encode() * 10) for i in range(20)])
    whole = segment.read_bytes()
    segment.write_bytes(whole[:-7])  # a crash in the middle of the last write
    losses = Losses()
    with caplog.at_level(logging.WARNING):
        spool = Spool(tmp_path, max_bytes=1 << 24, on_loss=losses)
    assert losses.seen == [("torn_tail", 1)] and "torn last record" in caplog.text
    assert segment.stat().st_size == offsets[-1] == spool.bytes, "cut back to the last whole record"
    [kept] = (tmp_path / "quarantine").iterdir()
    assert kept.name.endswith(".torn") and kept.read_bytes() == whole[offsets[-1] : -7]
    assert [r.value for r in spool.pending(segment)] == [f"event-{i}".encode() * 10 for i in range(19)]
    spool.close()
    again = Losses()
    Spool(tmp_path, max_bytes=1 << 24, on_loss=again).close()
    assert again.seen == [], "nothing left to report after the truncation"


def test_corrupt_records_mid_segment_are_skipped_quarantined_and_counted_once(tmp_path, caplog):
    records = [(f"client-{i % 7}".encode(), f"event {i} ".encode() * 12) for i in range(1000)]
    segment, offsets = _sealed(tmp_path, records)
    data = bytearray(segment.read_bytes())
    data[offsets[300] + 40] ^= 0x01  # a flipped bit in a value
    data[offsets[600] + 3] ^= 0xFF  # a broken sync marker
    data[offsets[900] + 9] ^= 0x40  # a broken length field
    segment.write_bytes(bytes(data))
    losses = Losses()
    with caplog.at_level(logging.ERROR):
        spool = Spool(tmp_path, max_bytes=1 << 24, on_loss=losses)
    assert losses.seen == [("quarantined", 1)] * 3 and "unreadable bytes" in caplog.text
    got = [(r.key, r.value) for r in spool.pending(segment)]
    assert got == [rec for i, rec in enumerate(records) if i not in (300, 600, 900)], "every other record is read"
    quarantined = sorted((tmp_path / "quarantine").iterdir())
    assert [q.read_bytes() for q in quarantined] == [bytes(data[offsets[i] : offsets[i + 1]]) for i in (300, 600, 900)]
    assert losses.seen == [("quarantined", 1)] * 3, "reading again reports nothing twice"
    spool.remove(segment)
    spool.close()
    Spool(tmp_path, max_bytes=1 << 24, on_loss=losses).close()
    assert losses.seen == [("quarantined", 1)] * 3
    assert sorted((tmp_path / "quarantine").iterdir()) == quarantined, "quarantine is never deleted"


def test_replay_resumes_after_the_records_kafka_confirmed(tmp_path):
    segment, offsets = _sealed(tmp_path, [(b"k", f"event-{i}".encode()) for i in range(10)])
    spool = Spool(tmp_path, max_bytes=1 << 24)
    spool.confirm(segment, [offsets[i] for i in (0, 1, 2, 3)])
    spool.confirm(segment, [offsets[6]])  # out of order: another partition's report came first
    spool.close()
    with open(segment.with_suffix(ACK_SUFFIX), "ab") as fh:
        fh.write(b"\x00\x00\x00\x00\x07")  # a torn confirmation entry (crash mid-write) is ignored
    reopened = Spool(tmp_path, max_bytes=1 << 24)
    assert [r.value for r in reopened.pending(segment)] == [f"event-{i}".encode() for i in (4, 5, 7, 8, 9)]
    assert reopened.count() == 5
    reopened.confirm(segment, [offsets[i] for i in (4, 5, 7, 8, 9)])
    assert list(reopened.pending(segment)) == []
    reopened.remove(segment)
    assert not segment.exists() and not segment.with_suffix(ACK_SUFFIX).exists()
    reopened.close()
    stale = tmp_path / f"{'7'.zfill(16)}{ACK_SUFFIX}"
    stale.write_bytes(b"x" * 12)  # a log whose segment is gone (removal stopped between the two unlinks)
    Spool(tmp_path, max_bytes=1 << 24).close()
    assert not stale.exists()


def test_segments_of_the_previous_release_are_replayed_first(tmp_path):
    legacy = [(b"acme", f"old-{i}".encode()) for i in range(3)]
    (tmp_path / f"{'5'.zfill(16)}.spool").write_bytes(b"".join(encode_legacy_record(k, v) for k, v in legacy))
    torn = b"".join(encode_legacy_record(b"acme", f"torn-{i}".encode()) for i in range(2))
    (tmp_path / f"{'6'.zfill(16)}.spool").write_bytes(torn[:-3])
    losses = Losses()
    spool = Spool(tmp_path, max_bytes=1 << 24, on_loss=losses)
    assert losses.seen == [("torn_tail", 1)]
    assert spool.append(b"acme", b"new") is Appended.STORED
    names = [p.name for p in spool.segments()]
    assert names[:2] == [f"{'5'.zfill(16)}.spool", f"{'6'.zfill(16)}.spool"] and names[2].endswith(".seg")
    assert len(names) == 3 and int(names[2][:-4]) > 6, "new segments sort after the old ones"
    assert [(k, v) for k, v, _ in _drain(spool)] == [*legacy, (b"acme", b"torn-0"), (b"acme", b"new")]


def test_unauthenticated_records_are_capped_to_their_share_across_restarts(tmp_path):
    cap = dict(capped_key=UNAUTHENTICATED.encode(), capped_share=0.1)
    spool = Spool(tmp_path, max_bytes=20_000, **cap)
    size = len(encode_record(UNAUTHENTICATED.encode(), b"x" * 80))
    flood = [spool.append(UNAUTHENTICATED.encode(), b"x" * 80) for _ in range(100)]
    assert flood.count(Appended.STORED) == 2000 // size and set(flood[2000 // size :]) == {Appended.CAPPED}
    assert spool.capped_bytes <= 2000
    paid = [spool.append(b"acme", b"y" * 80) for _ in range(300)]
    paid_size = len(encode_record(b"acme", b"y" * 80))
    assert paid.count(Appended.STORED) == (20_000 - spool.capped_bytes) // paid_size, "paid events get the rest"
    assert set(paid[paid.count(Appended.STORED) :]) == {Appended.FULL}
    spool.close()
    reopened = Spool(tmp_path, max_bytes=40_000, **cap)
    assert reopened.capped_bytes == spool.capped_bytes, "the share is recounted from disk at start-up"
    assert reopened.append(UNAUTHENTICATED.encode(), b"x" * 80) is Appended.STORED  # the bound doubled
    reopened.close()


def test_a_second_process_on_the_same_directory_is_refused(tmp_path):
    first = Spool(tmp_path, max_bytes=1 << 20)
    with pytest.raises(SpoolLocked) as err:
        Spool(tmp_path, max_bytes=1 << 20)
    assert str(tmp_path) in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    first.close()
    Spool(tmp_path, max_bytes=1 << 20).close()


def test_full_filesystem_writes_are_all_or_nothing(tmp_path, small_disk):
    d = small_disk(tmp_path / "small", "64k")
    spool = Spool(d, max_bytes=1 << 30)
    values = [os.urandom(700) for _ in range(200)]
    results = [spool.append(b"acme", v) for v in values]
    stored = results.count(Appended.STORED)
    assert 0 < stored < 200 and results[:stored] == [Appended.STORED] * stored
    assert set(results[stored:]) == {Appended.FAILED}, "no exception, and no write after the first failure fits"
    assert "disk full" in spool.last_error or "No space left" in spool.last_error
    [segment] = spool.segments()
    assert segment.stat().st_size == spool.bytes == stored * len(encode_record(b"acme", values[0])), (
        "no partial record on disk"
    )
    spool.close()
    losses = Losses()
    reopened = Spool(d, max_bytes=1 << 30, on_loss=losses)
    assert losses.seen == [] and [r.value for r in reopened.pending(segment)] == values[:stored]
    reopened.close()


def _event(i: int, client_id: str = "acme") -> dict:
    ctx = AuditContext.new(f"req-{i}")
    ctx.client_id, ctx.model = client_id, "t5-tiny"
    return ctx.to_event("POST", "/v1/generate", 200)


def _offline_publisher(spool_dir: Path, **kw) -> EventPublisher:
    """A publisher whose broker never answers: everything goes to the spool."""
    return EventPublisher(
        f"127.0.0.1:{free_port()}", "nowhere", spool_dir, message_timeout_ms=1000, retry_seconds=0.3, **kw
    ).start()


def test_publisher_without_broker_spools_then_drops_newest_and_says_so(tmp_path, caplog):
    pub = _offline_publisher(tmp_path / "spool", spool_max_bytes=3000)
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(20):  # a keyless flood mixed with paid traffic
                pub.publish(_event(i))
                pub.publish(_event(100 + i, UNAUTHENTICATED))
            wait_for(lambda: pub.stats.spooled + pub.stats.dropped == 40)
        assert pub.produced == 0 and pub.state == "spooling"
        assert pub.stats.dropped_unauthenticated > 0 and pub.stats.dropped > pub.stats.dropped_unauthenticated
        assert pub.spool.count() == pub.stats.spooled and pub.spool.bytes <= 3000 and pub.spool.capped_bytes <= 300
        assert "spool is full" in caplog.text and "dropping newest" in caplog.text
        assert "unauthenticated events fill their share" in caplog.text
        kept = [decode(r.value, EVENT) for seg in pub.spool.segments() for r in pub.spool.pending(seg)]
        assert len(kept) == pub.stats.spooled and {k["request_id"] for k in kept} <= {f"req-{i}" for i in range(120)}
        assert sum(k["client_id"] == "acme" for k in kept) > 10, "paid events keep the spool"
        assert pub.problem() is None, "a full spool is a policy, not a broken publisher"
    finally:
        pub.close(timeout=1)


def test_publisher_on_a_full_filesystem_counts_drops_keeps_running_and_says_why(tmp_path, small_disk):
    d = small_disk(tmp_path / "small", "64k")
    pub = _offline_publisher(d)
    try:
        for i in range(600):
            pub.publish(_event(i))  # never raises
        wait_for(lambda: pub.stats.spooled + pub.stats.dropped == 600)
        assert pub.stats.write_failures == pub.stats.dropped > 0 and pub.stats.spooled > 0
        assert pub.spool.count() == pub.stats.spooled, "every event counted as spooled is on disk, whole"
        assert "event spool unwritable" in pub.problem()
        assert pub._thread.is_alive()
    finally:
        pub.close(timeout=1)


class _DyingPublisher(EventPublisher):
    """A publisher thread that meets a bug: /readyz must learn of it."""

    def _ensure_topic(self) -> None:
        raise SystemExit("simulated bug in the publisher thread")


class _FlakyPublisher(EventPublisher):
    """Every broker probe raises: the thread must survive it."""

    def _broker_up(self) -> bool:
        self.probes = getattr(self, "probes", 0) + 1
        raise RuntimeError("simulated probe failure")


def test_publisher_thread_survives_errors_and_reports_its_death(tmp_path):
    flaky = _FlakyPublisher(
        f"127.0.0.1:{free_port()}", "nowhere", tmp_path / "a", message_timeout_ms=1000, retry_seconds=0.05
    ).start()
    dying = _DyingPublisher(f"127.0.0.1:{free_port()}", "nowhere", tmp_path / "b").start()
    try:
        flaky.publish_encoded(b"acme", b"x")
        wait_for(lambda: getattr(flaky, "probes", 0) >= 3)
        assert flaky._thread.is_alive() and flaky.problem() is None
        wait_for(lambda: not dying._thread.is_alive())
        assert dying.problem() == "event publisher thread died: SystemExit: simulated bug in the publisher thread"
        dying.publish(_event(7))  # nobody would serve its delivery report: it goes to the spool instead
        assert dying.stats.spooled == 1 and dying.spool.count() == 1
    finally:
        flaky.close(timeout=1)
        dying.close(timeout=1)
    closed = _offline_publisher(tmp_path / "c")
    closed.close(timeout=1)
    closed.publish(_event(1))  # after close: the spool refuses; counted, never raised
    closed.publish({"client_id": None})
    assert closed.stats.dropped == 2


def test_prompt_digest_is_keyed_and_the_secret_is_kept(tmp_path):
    first = PromptDigester.from_settings("", tmp_path)
    again = PromptDigester.from_settings("", tmp_path)
    other = PromptDigester.from_settings("", tmp_path / "elsewhere")
    assert first("hello") == again("hello") != other("hello"), "one secret per deployment, generated once"
    assert len(first("hello")) == 64 and first("hello") != first("hello!")
    assert (tmp_path / "prompt_digest.key").stat().st_mode & 0o077 == 0
    assert PromptDigester.from_settings("s3cret", tmp_path)("x") != first("x")


def test_keys_add_prints_a_key_once_and_the_app_uses_the_default_registry(data_dir):
    from tokenaudit.cli import main
    from tokenaudit.settings import get_settings

    assert get_settings().effective_api_keys_file is None, "no registry: development mode"
    out = CliRunner().invoke(main, ["keys", "add", "--client", "acme", "--department", "research"])
    admin = CliRunner().invoke(main, ["keys", "add", "--client", "ops", "--admin"])
    assert out.exit_code == 0 and admin.exit_code == 0, out.output
    raw, raw_admin = out.stdout.strip().splitlines()[0], admin.stdout.strip().splitlines()[0]
    path = data_dir / "api_keys.toml"
    assert raw not in path.read_text(), "only the hash is stored"
    registry = KeyRegistry.load(path)
    key = registry.lookup(raw)
    assert (key.client_id, key.department, key.role) == ("acme", "research", "client")
    assert registry.lookup(raw_admin).is_admin
    get_settings.cache_clear()
    assert get_settings().effective_api_keys_file == path
    bad = CliRunner().invoke(main, ["keys", "add", "--client", "a\x07b"])  # quotes are fine now (escaped)
    assert bad.exit_code == 1 and "invalid client_id" in bad.output


def test_fast_event_encoder_is_byte_identical_to_the_schemas_codec():
    import random
    from datetime import datetime

    from tokenaudit.schemas import encode
    from tokenaudit.schemas.compiled import compile_encoder

    fast = compile_encoder(EVENT)
    assert fast is not None
    rng = random.Random(7)
    texts = ["", "acme", "ünïcödé ✓ 日本", "x" * 300, "a\x00b"]
    ints = [0, 1, 63, 64, 127, 128, 16383, 16384, -1, -64, -65, 2**31 - 1, -(2**31)]
    for i in range(400):
        e = _event(i)
        for name, value in list(e.items()):
            if isinstance(value, bool):
                e[name] = rng.random() < 0.5
            elif isinstance(value, int):
                e[name] = rng.choice(ints) if name != "ts" else rng.choice([0, 1_795_000_000_000, -5])
            elif isinstance(value, float):
                e[name] = rng.choice([0.0, -1.5, 1e300, 3.14159, 7])
            elif name in ("api_key_id", "error_type", "batch_id", "prompt_digest", "finish_reason"):
                e[name] = rng.choice([None, *texts])
            elif isinstance(value, str):
                e[name] = rng.choice(texts)
        assert fast(e) == encode(EVENT, e), e
        assert decode(fast(e), EVENT)["request_id"] == e["request_id"]
    # values outside the fast path (a datetime ts, an int32 overflow) defer to the generic codec
    e = _event(1)
    e["ts"] = datetime(2026, 1, 2, tzinfo=UTC)
    assert fast(e) == encode(EVENT, e)
    e = _event(2)
    e["input_tokens"] = 2**31
    assert fast(e) == encode(EVENT, e)
