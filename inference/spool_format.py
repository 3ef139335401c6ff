"""The spool's on-disk record format: framing, parsing with resynchronisation, and the first
release's legacy framing (read once on upgrade).

Record framing: ``SYNC(8) length(u32) crc32(u32)`` then ``length`` bytes of body, the CRC
covering the length field and the body. Body: ``version(u8) key_len(u32) n_headers(u16)``,
the headers (``name_len(u16) value_len(u32, 0xFFFFFFFF = null) name value``), the key, the
value. The sync marker lets a reader skip a corrupt record: it scans for the next marker
whose length and CRC check out and carries on from there (the spool copies the bad bytes to
quarantine). Pure functions over bytes: the spool (:mod:`tokenaudit.inference.spool`) does the
files, the locking and the bookkeeping.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

SYNC = b"\xa7\x5e\x1d\x0c\x9b\x33\xf2\x61"
FRAME = struct.Struct(">8sII")  # sync marker, body length, crc32(length field + body)
LENGTH = struct.Struct(">I")
BODY = struct.Struct(">BIH")  # format version, key length, header count
HEADER = struct.Struct(">HI")  # header name length, value length (NULL_HEADER: no value)
LEGACY = struct.Struct(">IIH")  # first release: len(u32) crc32(u32) key_len(u16) key value
VERSION = 1
NULL_HEADER = 0xFFFFFFFF
MAX_BODY = 64 << 20  # sanity bound: a "length" beyond it is garbage, not a record

Headers = Sequence[tuple[str, "bytes | str | None"]]


class SpoolRecord(NamedTuple):  # a tuple: made once per record read, a frozen dataclass costs ~1 us more
    offset: int
    end: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes | str | None]] | None  # as confluent-kafka's produce takes them


class BadRegion(NamedTuple):
    """Bytes that are not a readable record: ``torn`` when they are the cut-short last record."""

    start: int
    end: int
    torn: bool
    records: int  # how many records the region held, as far as sync markers tell


def encode_record(key: bytes, value: bytes, headers: Headers | None = None) -> bytes:
    parts = [BODY.pack(VERSION, len(key), len(headers) if headers else 0)]
    for name, raw in headers or ():
        name_bytes = name.encode("utf-8")
        data = raw.encode("utf-8") if isinstance(raw, str) else raw
        parts.append(HEADER.pack(len(name_bytes), NULL_HEADER if data is None else len(data)))
        parts.append(name_bytes)
        if data is not None:
            parts.append(data)
    parts.append(key)
    parts.append(value)
    body = b"".join(parts)
    length = LENGTH.pack(len(body))
    return SYNC + length + LENGTH.pack(zlib.crc32(body, zlib.crc32(length))) + body


def _decode_body(data: bytes, offset: int, start: int, end: int) -> SpoolRecord:
    """The record whose body is ``data[start:end]`` (read in place: no copy of the body)."""
    version, key_len, n_headers = BODY.unpack_from(data, start)
    if version != VERSION:
        raise ValueError(f"unknown record version {version}")
    pos = start + BODY.size
    headers: list[tuple[str, bytes | str | None]] | None = None
    if n_headers:
        headers = []
        for _ in range(n_headers):
            name_len, value_len = HEADER.unpack_from(data, pos)
            pos += HEADER.size
            name = data[pos : pos + name_len].decode("utf-8")
            pos += name_len
            value = None
            if value_len != NULL_HEADER:
                value = data[pos : pos + value_len]
                pos += value_len
            headers.append((name, value))
    if pos + key_len > end:
        raise ValueError("key runs past the record")
    return SpoolRecord(offset, end, data[pos : pos + key_len], data[pos + key_len : end], headers)


def _record_at(data: bytes, pos: int) -> SpoolRecord | None:
    """The valid record starting at ``pos``, or None."""
    if len(data) - pos < FRAME.size:
        return None
    sync, length, crc = FRAME.unpack_from(data, pos)
    end = pos + FRAME.size + length
    if sync != SYNC or length > MAX_BODY or end > len(data):
        return None
    if (
        zlib.crc32(memoryview(data)[pos + FRAME.size : end], zlib.crc32(data[pos + 8 : pos + 12])) != crc
    ):  # no body copy
        return None
    try:
        return _decode_body(data, pos, pos + FRAME.size, end)
    except (ValueError, struct.error, UnicodeDecodeError):
        return None


def _next_record(data: bytes, start: int) -> SpoolRecord | None:
    """The first valid record at or after ``start`` (resynchronisation on the sync marker)."""
    while (pos := data.find(SYNC, start)) >= 0:
        record = _record_at(data, pos)
        if record is not None:
            return record
        start = pos + 1
    return None


def _is_torn(data: bytes, pos: int) -> bool:
    """A record cut short at the end of the file: its frame (or the part of it that exists) is
    intact and the declared length runs past the end."""
    rest = data[pos:]
    if len(rest) < FRAME.size:
        return SYNC.startswith(rest[: len(SYNC)])
    sync, length, _ = FRAME.unpack_from(data, pos)
    return sync == SYNC and pos + FRAME.size + length > len(data)


def parse_segment(data: bytes) -> Iterator[SpoolRecord | BadRegion]:
    """Records and bad regions of a segment, in file order."""
    pos = 0
    while pos < len(data):
        record = _record_at(data, pos)
        if record is not None:
            yield record
            pos = record.end
            continue
        following = _next_record(data, pos + 1)
        if following is None:
            torn = _is_torn(data, pos)
            yield BadRegion(pos, len(data), torn, 1 if torn else 1 + data.count(SYNC, pos + 1))
            return
        yield BadRegion(pos, following.offset, False, 1 + data.count(SYNC, pos + 1, following.offset))
        pos = following.offset


def parse_legacy_segment(data: bytes) -> Iterator[SpoolRecord | BadRegion]:
    """Segments of the first release (no sync marker): records up to the first bad one; the
    rest cannot be resynchronised and is one bad region."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < LEGACY.size:
            yield BadRegion(pos, len(data), True, 1)
            return
        length, crc, key_len = LEGACY.unpack_from(data, pos)
        body = data[pos + LEGACY.size : pos + LEGACY.size + length - 2]
        if length < 2 or key_len > length - 2 or len(body) != length - 2 or zlib.crc32(body) != crc:
            torn = length >= 2 and pos + LEGACY.size + length - 2 > len(data)
            yield BadRegion(pos, len(data), torn, 1)
            return
        end = pos + LEGACY.size + length - 2
        yield SpoolRecord(pos, end, body[:key_len], body[key_len:], None)
        pos = end


def encode_legacy_record(key: bytes, value: bytes) -> bytes:
    """The first release's framing (for tests of the upgrade path)."""
    return LEGACY.pack(len(key) + len(value) + 2, zlib.crc32(key + value), len(key)) + key + value
