"""A bounded, append-only, on-disk spool of Kafka records (key, value, headers), replayed oldest
first, that survives its own faults.

Hand-written because no maintained library offers this small a thing (a crash-safe FIFO of
byte records with a size bound, resumable per record) without a server.

Layout of the spool directory::

    lock                      flock held by the one process using the directory (holds its pid)
    <seq>.seg                 segment: framed records (below), appended by one writer
    <seq>.ack                 confirmation log of that segment: offsets Kafka acknowledged
    <seq>.spool               segment of the first release (legacy framing), replayed once
    quarantine/<seq>-<offset>.bad|torn   bytes of records that could not be read; never deleted

Record framing (:mod:`tokenaudit.inference.spool_format`): a sync marker, the length and a
CRC, then the body (key, value, headers); a reader skips a corrupt record by scanning for the
next marker whose length and CRC check out (the bad bytes go to quarantine).

Why these choices:

- *One ``os.write`` per record* on an unbuffered descriptor: the record is in the page cache
  when ``append`` returns, so it survives SIGKILL. The byte count is checked; a failed or
  short write (ENOSPC, EIO) is truncated back to the record start, so a record is on disk
  whole or not at all, and the caller counts the event as dropped.
- *Resume points, not whole-segment replays*: the replay appends the offsets of records Kafka
  confirmed to ``<seq>.ack`` (one write per batch of confirmations) and a later replay, in
  this process or after a crash, skips them. Copies remain possible (a delivery that timed
  out after the broker wrote it), which is why events carry an ``event_id``; records Kafka
  confirmed are not sent again.
- *Start-up recovery*: every segment is read once when the spool opens; a torn tail (the last
  record cut short by a crash mid-write) is copied to quarantine, truncated and reported;
  corrupt records are copied to quarantine and reported. This costs 17-26 ms per MiB on the
  shared 2-core dev box (bench/bench_spool.py): a full default spool (256 MiB) delays start-up
  by 4-7 s, an empty one by nothing.
- *A lock per directory*: two processes appending to one directory would interleave segment
  numbers and replay each other's records; the second one is refused.

Full-spool policy: **drop newest**. When the bound is reached, new records are refused (and
counted by the caller), so the spool always holds the oldest, contiguous history. Records
under ``capped_key`` (unauthenticated events) may use at most ``capped_share`` of the bound,
so a flood of them can never push out the others.
"""

from __future__ import annotations

import builtins
import enum
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenaudit.errors import SpoolLocked
from tokenaudit.inference.spool_format import (
    BadRegion,
    Headers,
    SpoolRecord,
    encode_record,
    parse_legacy_segment,
    parse_segment,
)

log = logging.getLogger(__name__)

SEGMENT_BYTES = 4 << 20
SEGMENT_SUFFIX = ".seg"
LEGACY_SUFFIX = ".spool"
ACK_SUFFIX = ".ack"
LOCK_NAME = "lock"
QUARANTINE_DIR = "quarantine"

ACK = struct.Struct(">QI")  # record offset, crc32 of the offset bytes


class Appended(enum.Enum):
    """What :meth:`Spool.append` did with a record (all but STORED mean: not stored)."""

    STORED = "stored"
    FULL = "full"  # the spool's byte bound is reached (drop newest)
    CAPPED = "capped"  # the capped key's share of the bound is used up
    FAILED = "failed"  # the write failed or was short (ENOSPC, EIO); see Spool.last_error


@dataclass(slots=True)
class _Segment:
    seq: int
    path: Path
    legacy: bool
    size: int = 0
    capped_bytes: int = 0
    confirmed: set[int] = field(default_factory=set)
    ack_fd: int | None = None
    keep_bad_bytes: bool = False  # a quarantine copy failed: move the file there instead of deleting


# --- the directory lock ---------------------------------------------------------------------------
def _lock_directory(directory: Path) -> int:
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise SpoolLocked(
            f"spool directory {directory} is in use by another process (pid {holder}); each "
            f"inference process needs its own TOKENAUDIT_SPOOL_DIR"
        ) from None
    try:  # the pid only makes the refusal message better: a full disk must not stop a start
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        log.warning("spool %s: could not write the lock holder's pid (%s)", directory, exc)
    return fd


# --- the spool ------------------------------------------------------------------------------------
class Spool:
    """``on_loss(kind, records)`` is told about records that can no longer be delivered: kind
    ``"torn_tail"`` or ``"quarantined"``."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        segment_bytes: int = SEGMENT_BYTES,
        *,
        capped_key: bytes | None = None,
        capped_share: float = 1.0,
        on_loss: Callable[[str, int], None] | None = None,
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.capped_key = capped_key
        self.capped_limit = int(max_bytes * capped_share)
        self.quarantine_dir = self.dir / QUARANTINE_DIR
        self.last_error: str | None = None
        self._on_loss = on_loss or (lambda kind, n: None)
        self._lock = threading.Lock()
        self._lock_fd: int | None = _lock_directory(self.dir)
        self._segments: dict[Path, _Segment] = {}
        self._fd: int | None = None
        self._active: _Segment | None = None
        self._bytes = 0
        self._capped_bytes = 0
        self._bad_seen: set[tuple[Path, int]] = set()
        self._last_seq = 0
        self._ack_error_logged_at = 0.0
        try:
            self._recover()
        except BaseException:
            self._unlock()
            raise

    # --- start-up --------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Read every segment once: truncate torn tails, quarantine corrupt records, load the
        confirmation logs, and account bytes (also the capped key's)."""
        found = []
        for path in self.dir.iterdir():
            if path.suffix in (SEGMENT_SUFFIX, LEGACY_SUFFIX) and path.stem.isdigit() and path.is_file():
                found.append(_Segment(int(path.stem), path, path.suffix == LEGACY_SUFFIX))
        self._last_seq = max((seg.seq for seg in found), default=0)  # unreadable ones included
        for seg in sorted(found, key=lambda s: (s.seq, not s.legacy)):
            try:
                data = seg.path.read_bytes()
            except OSError as exc:  # a failing disk: leave the file for a later start or a person
                log.error("spool %s cannot be read (%s): left in place, not replayed now", seg.path, exc)
                continue
            size = len(data)
            for item in self._parse(seg, data):
                if isinstance(item, SpoolRecord):
                    if item.key == self.capped_key:
                        seg.capped_bytes += item.end - item.offset
                elif item.torn and not seg.keep_bad_bytes:  # cut-short last record, now in quarantine: cut it off
                    try:
                        os.truncate(seg.path, item.start)
                        size = item.start
                    except OSError as exc:
                        log.warning("spool %s: could not truncate the torn record (%s); it is skipped", seg.path, exc)
            seg.size = size
            seg.confirmed = self._read_acks(seg)
            self._segments[seg.path] = seg
            self._bytes += seg.size
            self._capped_bytes += seg.capped_bytes
        logs_in_use = {seg.path.with_suffix(ACK_SUFFIX) for seg in found}
        for ack in self.dir.glob(f"*{ACK_SUFFIX}"):
            if ack not in logs_in_use:
                ack.unlink(missing_ok=True)  # its segment was fully replayed; removal stopped halfway
        if self._segments:
            log.info(
                "spool %s holds %d segments (%d bytes) from a previous run", self.dir, len(self._segments), self._bytes
            )

    def _read_acks(self, seg: _Segment) -> set[int]:
        try:
            data = seg.path.with_suffix(ACK_SUFFIX).read_bytes()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            log.warning(
                "spool %s: confirmations unreadable (%s): its records are all sent again (same event_id)",
                seg.path.name,
                exc,
            )
            return set()
        confirmed = set()
        for pos in range(0, len(data) - ACK.size + 1, ACK.size):  # a torn last entry is ignored
            offset, crc = ACK.unpack_from(data, pos)
            if zlib.crc32(data[pos : pos + 8]) == crc:
                confirmed.add(offset)
        return confirmed

    # --- bookkeeping -----------------------------------------------------------------------------
    def _next_seq(self) -> int:
        """Increasing and never reused, also after the spool emptied or the process restarted
        (quarantine file names carry the segment's name): the wall clock in microseconds, or
        one more than the newest segment if that is higher."""
        newest = max((s.seq for s in self._segments.values()), default=0)
        self._last_seq = max(newest + 1, self._last_seq + 1, time.time_ns() // 1000)
        return self._last_seq

    @property
    def bytes(self) -> int:
        """Bytes of segment files (confirmed records included until their segment is removed)."""
        return self._bytes

    @property
    def capped_bytes(self) -> int:
        return self._capped_bytes

    def empty(self) -> bool:
        with self._lock:
            return not self._segments

    def segments(self) -> list[Path]:
        with self._lock:
            return [s.path for s in sorted(self._segments.values(), key=lambda s: s.seq)]

    # --- writing ---------------------------------------------------------------------------------
    # builtins.bytes: in this class, `bytes` names the property above
    def append(self, key: builtins.bytes, value: builtins.bytes, headers: Headers | None = None) -> Appended:
        """Store one record whole, or not at all; never raises for I/O errors (see ``last_error``)."""
        record = encode_record(key, value, headers)
        size = len(record)
        capped = self.capped_key is not None and key == self.capped_key
        with self._lock:
            if self._lock_fd is None:
                self.last_error = "the spool is closed"
                return Appended.FAILED
            if self._bytes + size > self.max_bytes:
                return Appended.FULL
            if capped and self._capped_bytes + size > self.capped_limit:
                return Appended.CAPPED
            try:
                if self._fd is None or self._active is None or self._active.size >= self.segment_bytes:
                    self._open_new()
                written = os.write(self._fd, record)  # type: ignore[arg-type]
            except OSError as exc:
                self._undo_partial_write()
                self.last_error = f"{exc.strerror or exc} (errno {exc.errno})"
                return Appended.FAILED
            if written != size:
                self._undo_partial_write()
                self.last_error = f"short write: {written} of {size} bytes (disk full?)"
                return Appended.FAILED
            seg = self._active
            seg.size += size  # type: ignore[union-attr]
            self._bytes += size
            if capped:
                seg.capped_bytes += size  # type: ignore[union-attr]
                self._capped_bytes += size
            self.last_error = None
            return Appended.STORED

    def _undo_partial_write(self) -> None:
        """Cut the active segment back to its last whole record; if even that fails, seal it
        (the partial record is then a torn tail that start-up recovery quarantines)."""
        if self._fd is None or self._active is None:
            return
        try:
            os.ftruncate(self._fd, self._active.size)
        except OSError as exc:
            log.error("spool %s: could not cut a partial record (%s); sealing the segment", self._active.path.name, exc)
            self._close_active()

    def _open_new(self) -> None:
        self._close_active()
        seq = self._next_seq()
        path = self.dir / f"{seq:016d}{SEGMENT_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._active = self._segments[path] = _Segment(seq, path, legacy=False)

    def _close_active(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._active = None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    log.warning("spool: fsync on close failed: %s", exc)
            self._close_active()
            for seg in self._segments.values():
                self._close_ack(seg)
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- reading ---------------------------------------------------------------------------------
    def oldest_segment(self) -> Path | None:
        """The oldest segment, sealed first if it is the one being written (so appends made
        during its replay go to a new segment and keep their order behind it)."""
        with self._lock:
            if not self._segments:
                return None
            oldest = min(self._segments.values(), key=lambda s: (s.seq, not s.legacy))
            if oldest is self._active:
                self._close_active()
            return oldest.path

    def segment_count(self) -> int:
        with self._lock:
            return len(self._segments)

    def records(self, segment: Path) -> Iterator[SpoolRecord]:
        """The readable records of a sealed segment, oldest first, confirmed ones included.
        Bad regions met on the way are copied to quarantine and reported (once)."""
        with self._lock:
            seg = self._segments.get(segment)
        if seg is None:
            return
        data = segment.read_bytes()
        for item in self._parse(seg, data):
            if isinstance(item, SpoolRecord):
                yield item

    def pending(self, segment: Path) -> Iterator[SpoolRecord]:
        """The records of a segment Kafka has not confirmed yet."""
        confirmed = self.confirmed(segment)
        return (r for r in self.records(segment) if r.offset not in confirmed)

    def _parse(self, seg: _Segment, data: builtins.bytes) -> Iterator[SpoolRecord | BadRegion]:
        for item in (parse_legacy_segment if seg.legacy else parse_segment)(data):
            if isinstance(item, BadRegion):
                self._quarantine(seg, data, item)
            yield item

    def _quarantine(self, seg: _Segment, data: builtins.bytes, bad: BadRegion) -> None:
        """Copy a bad region to quarantine (atomically, never overwriting) and report it once."""
        if (seg.path, bad.start) in self._bad_seen:
            return
        self._bad_seen.add((seg.path, bad.start))
        self.quarantine_dir.mkdir(exist_ok=True)
        target = self.quarantine_dir / f"{seg.path.name}-{bad.start:010d}.{'torn' if bad.torn else 'bad'}"
        if target.exists():
            return  # quarantined (and reported) by an earlier run
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data[bad.start : bad.end])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            seg.keep_bad_bytes = True
            log.error(
                "spool %s: could not copy %d unreadable bytes to quarantine (%s); the whole segment will be "
                "moved there once replayed",
                seg.path.name,
                bad.end - bad.start,
                exc,
            )
        if bad.torn:
            log.warning(
                "spool %s: torn last record (%d bytes at offset %d, a crash mid-write) skipped; kept in %s",
                seg.path.name,
                bad.end - bad.start,
                bad.start,
                target,
            )
        else:
            log.error(
                "spool %s: %d unreadable bytes at offset %d (about %d records) skipped; kept in %s",
                seg.path.name,
                bad.end - bad.start,
                bad.start,
                bad.records,
                target,
            )
        self._on_loss("torn_tail" if bad.torn else "quarantined", bad.records)

    # --- confirmations ---------------------------------------------------------------------------
    def confirmed(self, segment: Path) -> set[int]:
        with self._lock:
            seg = self._segments.get(segment)
            return set(seg.confirmed) if seg else set()

    def confirm(self, segment: Path, offsets: Sequence[int]) -> None:
        """Record that Kafka acknowledged the records at ``offsets``: one append to the
        segment's confirmation log (in the page cache when this returns: survives SIGKILL).
        A failed write is logged; the confirmations still hold for this process."""
        if not offsets:
            return
        with self._lock:
            seg = self._segments.get(segment)
            if seg is None:
                return
            seg.confirmed.update(offsets)
            entries = b"".join(ACK.pack(o, zlib.crc32(o.to_bytes(8, "big"))) for o in offsets)
            try:
                if seg.ack_fd is None:
                    seg.ack_fd = os.open(
                        seg.path.with_suffix(ACK_SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
                    )
                written = os.write(seg.ack_fd, entries)
                if written != len(entries):
                    raise OSError(errno.ENOSPC, f"short write ({written} of {len(entries)} bytes)")
            except OSError as exc:
                now = time.monotonic()
                if now - self._ack_error_logged_at > 10:
                    self._ack_error_logged_at = now
                    log.warning(
                        "spool %s: confirmations not persisted (%s): a crash now would send those records "
                        "again (same event_id)",
                        seg.path.name,
                        exc,
                    )

    def _close_ack(self, seg: _Segment) -> None:
        if seg.ack_fd is not None:
            os.close(seg.ack_fd)
            seg.ack_fd = None

    def remove(self, segment: Path) -> None:
        """Drop a fully replayed segment (and its confirmation log, after it: a crash between
        the two leaves a stale log, which start-up deletes)."""
        with self._lock:
            seg = self._segments.pop(segment, None)
            if seg is None:
                return
            self._close_ack(seg)
            self._bytes = max(0, self._bytes - seg.size)
            self._capped_bytes = max(0, self._capped_bytes - seg.capped_bytes)
            try:
                if seg.keep_bad_bytes:
                    self.quarantine_dir.mkdir(exist_ok=True)
                    os.replace(segment, self.quarantine_dir / f"{segment.name}.whole")
                else:
                    segment.unlink()
            except FileNotFoundError:
                pass
            segment.with_suffix(ACK_SUFFIX).unlink(missing_ok=True)

    def count(self) -> int:
        """Records not yet confirmed (reads the files: for tests and diagnostics, not the hot path)."""
        return sum(1 for seg in self.segments() for _ in self.pending(seg))
