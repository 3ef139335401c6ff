"""The on-disk spool, the publisher's full-spool policy, prompt digests and `keys add`."""

from __future__ import annotations

import logging
import time

from click.testing import CliRunner

from tokenaudit.inference.api_keys import KeyRegistry
from tokenaudit.inference.audit import AuditContext, PromptDigester
from tokenaudit.inference.publisher import EventPublisher
from tokenaudit.inference.spool import Spool
from tokenaudit.infra.procutil import free_port
from tokenaudit.schemas import EVENT, decode


def test_spool_keeps_order_across_segments_and_reopen(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    records = [(f"c{i % 3}".encode(), f"value-{i}".encode() * 5) for i in range(40)]
    for k, v in records:
        assert spool.append(k, v)
    spool.close()
    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    assert reopened.bytes == spool.bytes > 0
    got = []
    while (seg := reopened.oldest_segment()) is not None:
        got.extend(Spool.read(seg))
        reopened.remove(seg)
    assert got == records and reopened.empty() and reopened.bytes == 0


def test_spool_is_bounded_and_skips_a_torn_tail(tmp_path, caplog):
    spool = Spool(tmp_path, max_bytes=300)
    stored = [spool.append(b"k", b"x" * 50) for _ in range(10)]
    assert stored[:4] == [True] * 4 and not any(stored[5:]), "refuses records once full (drop newest)"
    assert spool.bytes <= 300 and spool.count() == sum(stored)
    spool.close()
    seg = sorted(tmp_path.glob("*.spool"))[0]
    seg.write_bytes(seg.read_bytes()[:-7])  # a crash in the middle of the last write
    with caplog.at_level(logging.WARNING):
        assert len(list(Spool.read(seg))) == sum(stored) - 1
    assert "torn or corrupt" in caplog.text


def _event(i: int) -> dict:
    ctx = AuditContext.new(f"req-{i}")
    ctx.client_id, ctx.model = "acme", "t5-tiny"
    return ctx.to_event("POST", "/v1/generate", 200)


def test_publisher_without_broker_spools_then_drops_newest_and_says_so(tmp_path, caplog):
    pub = EventPublisher(f"127.0.0.1:{free_port()}", "nowhere", tmp_path / "spool", spool_max_bytes=1500,
                         message_timeout_ms=1000, retry_seconds=0.3).start()
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(20):
                pub.publish(_event(i))
            deadline = time.monotonic() + 30
            while pub.stats.spooled + pub.stats.dropped < 20 and time.monotonic() < deadline:
                time.sleep(0.1)
        assert pub.stats.spooled + pub.stats.dropped == 20 and pub.produced == 0
        assert pub.stats.dropped > 0 and pub.state == "spooling"
        assert pub.spool.count() == pub.stats.spooled and pub.spool.bytes <= 1500
        assert "spool is full" in caplog.text and "dropping newest" in caplog.text
        seg = pub.spool.oldest_segment()
        kept = [decode(v, EVENT) for _, v in Spool.read(seg)]
        assert all(k["client_id"] == "acme" for k in kept)
    finally:
        pub.close(timeout=1)


def test_prompt_digest_is_keyed_and_the_secret_is_kept(tmp_path):
    first = PromptDigester.from_settings("", tmp_path)
    again = PromptDigester.from_settings("", tmp_path)
    other = PromptDigester.from_settings("", tmp_path / "elsewhere")
    assert first("hello") == again("hello") != other("hello"), "one secret per deployment, generated once"
    assert len(first("hello")) == 64 and first("hello") != first("hello!")
    assert (tmp_path / "prompt_digest.key").stat().st_mode & 0o077 == 0
    assert PromptDigester.from_settings("s3cret", tmp_path)("x") != first("x")


def test_keys_add_prints_a_key_once_and_the_app_uses_the_default_registry(data_dir):
    from tokenaudit.infra.cli import main
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
    from datetime import datetime, timezone

    from tokenaudit.schemas.compiled import compile_encoder
    from tokenaudit.schemas import encode

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
    e["ts"] = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert fast(e) == encode(EVENT, e)
    e = _event(2)
    e["input_tokens"] = 2**31
    assert fast(e) == encode(EVENT, e)
