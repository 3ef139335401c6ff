"""Cost of the event spool, the path events take while Kafka is unreachable: append per event
(one framed ``os.write``), start-up recovery per MiB (every segment read and checked once), and
reading records back for replay. Side by side with the first release's framing (length + CRC,
no sync marker, no headers), measured in the same run.

Prints RESULT lines. No broker needed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N = 40_000


def main() -> None:
    from tokenaudit.inference.audit import AuditContext
    from tokenaudit.inference.spool import Spool
    from tokenaudit.inference.spool_format import encode_legacy_record
    from tokenaudit.schemas import EVENT, encode

    def event(i: int) -> bytes:
        ctx = AuditContext.new(f"req-{i:08d}")
        ctx.client_id, ctx.department, ctx.model, ctx.input_tokens, ctx.output_tokens = "acme", "r", "t5", 120, 16
        return encode(EVENT, ctx.to_event("POST", "/v1/generate", 200))

    values = [event(i) for i in range(N)]
    with tempfile.TemporaryDirectory() as tmp:
        # the first release's append: one framed os.write per record, nothing else
        fd = os.open(Path(tmp) / "legacy.spool", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        t0 = time.perf_counter()
        for v in values:
            os.write(fd, encode_legacy_record(b"acme", v))
        legacy_us = (time.perf_counter() - t0) / N * 1e6
        os.close(fd)

        spool = Spool(Path(tmp) / "spool", max_bytes=1 << 30)
        t0 = time.perf_counter()
        for v in values:
            spool.append(b"acme", v)
        append_us = (time.perf_counter() - t0) / N * 1e6
        spool.close()
        mib = spool.bytes / (1 << 20)

        t0 = time.perf_counter()
        reopened = Spool(Path(tmp) / "spool", max_bytes=1 << 30)
        recover_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        read = sum(1 for seg in reopened.segments() for _ in reopened.pending(seg))
        read_us = (time.perf_counter() - t0) / read * 1e6
        reopened.close()

        data = (Path(tmp) / "legacy.spool").read_bytes()
        t0 = time.perf_counter()
        pos = n = 0
        while pos < len(data):  # the first release's reader loop, for scale
            length = int.from_bytes(data[pos : pos + 4], "big")
            body = data[pos + 10 : pos + 10 + length - 2]
            assert zlib.crc32(body) == int.from_bytes(data[pos + 4 : pos + 8], "big")
            pos += 10 + length - 2
            n += 1
        legacy_read_us = (time.perf_counter() - t0) / n * 1e6

    print(f"RESULT spool_event_bytes={len(values[0])}")
    print(f"RESULT spool_append_us={append_us:.2f}")
    print(f"RESULT spool_append_first_release_framing_us={legacy_us:.2f}")
    print(f"RESULT spool_append_vs_first_release_ratio={append_us / legacy_us:.2f}")
    print(f"RESULT spool_recovery_ms_per_mib={recover_s * 1000 / mib:.1f}")
    print(f"RESULT spool_recovery_s_for_full_default_spool_estimate={recover_s / mib * 256:.1f}")
    print(f"RESULT spool_read_us_per_record={read_us:.2f}")
    print(f"RESULT spool_read_first_release_us_per_record={legacy_read_us:.2f}")
    print(f"RESULT spool_read_vs_first_release_ratio={read_us / legacy_read_us:.2f}")


if __name__ == "__main__":
    main()
