"""A bounded, append-only, on-disk spool of encoded events, replayed oldest first.

Hand-written because no maintained library offers this small a thing (a crash-safe FIFO of
byte records with a size bound) without a server. Layout: numbered segment files
``<seq>.spool``; each record is ``len(u32) crc32(u32) key_len(u16) key value``. Records are
written with one ``os.write`` on an unbuffered descriptor, so they sit in the kernel's page
cache the moment ``append`` returns and survive the process being killed (SIGKILL); a torn
last record (power loss mid-write) fails its CRC and is skipped with a warning.

Full-spool policy: **drop newest**. When the bound is reached, new records are refused (and
counted by the caller), so the spool always holds the oldest, contiguous history.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIH")
SEGMENT_BYTES = 4 << 20


class Spool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._active: Path | None = None
        self._active_size = 0
        self._bytes = sum(p.stat().st_size for p in self._segments())

    # --- bookkeeping ------------------------------------------------------------------------
    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.spool"))

    def _next_path(self) -> Path:
        segs = self._segments()
        seq = int(segs[-1].stem) + 1 if segs else 1
        return self.dir / f"{seq:016d}.spool"

    @property
    def bytes(self) -> int:
        return self._bytes

    def empty(self) -> bool:
        with self._lock:
            return self._bytes == 0

    # --- writing ------------------------------------------------------------------------------
    def append(self, key: bytes, value: bytes) -> bool:
        """Store one record; False when the spool is full (the record is not stored)."""
        record = HEADER.pack(len(key) + len(value) + 2, zlib.crc32(key + value), len(key)) + key + value
        with self._lock:
            if self._bytes + len(record) > self.max_bytes:
                return False
            if self._fd is None or self._active_size >= self.segment_bytes:
                self._open_new()
            os.write(self._fd, record)
            self._active_size += len(record)
            self._bytes += len(record)
            return True

    def _open_new(self) -> None:
        self._close_active()
        self._active = self._next_path()
        self._fd = os.open(self._active, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active_size = 0

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._active = None


    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
            self._close_active()

    # --- reading ------------------------------------------------------------------------------
    def oldest_segment(self) -> Path | None:
        """The oldest segment, sealed first if it is the one being written (so appends made
        during its replay go to a new segment and keep their order behind it)."""
        with self._lock:
            segs = self._segments()
            if not segs:
                return None
            if self._active is not None and segs[0] == self._active:
                self._close_active()
            return segs[0]

    @staticmethod
    def read(segment: Path) -> Iterator[tuple[bytes, bytes]]:
        data = segment.read_bytes()
        pos = 0
        while pos + HEADER.size <= len(data):
            length, crc, klen = HEADER.unpack_from(data, pos)
            body = data[pos + HEADER.size: pos + HEADER.size + length - 2]
            if len(body) != length - 2 or zlib.crc32(body) != crc:
                log.warning("spool %s: torn or corrupt record at byte %d skipped (%d bytes left)",
                            segment.name, pos, len(data) - pos)
                return
            yield body[:klen], body[klen:]
            pos += HEADER.size + length - 2

    def remove(self, segment: Path) -> None:
        with self._lock:
            try:
                size = segment.stat().st_size
                segment.unlink()
            except FileNotFoundError:
                return
            self._bytes = max(0, self._bytes - size)

    def count(self) -> int:
        """Records now spooled (reads the files: for tests and diagnostics, not the hot path)."""
        with self._lock:
            segs = self._segments()
        return sum(1 for s in segs for _ in self.read(s))
