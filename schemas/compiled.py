"""Specialised Avro single-object encoders and decoders for flat records, generated from the
current schema.

Why hand-written: fastavro's generic ``schemaless_writer`` / ``schemaless_reader`` spend most
of their time on per-call set-up, per-field type dispatch and (reading) one ``fo.read()``
Python call per primitive. Measured here on the 25-field token-usage event: encode 6-16 us,
decode 12-18 us; the generated straight-line code below does the same in about 2.5 and 6 us.
That matters on the inference hot path (15 us budget per audit event) and in the stream
worker, which decodes every event and encodes every output (throughput target 30k events/s
on one core). No maintained library does this faster here: cavro (Cython) measured 10 us and
returns its own record objects. When the native twin (schemas/_native.pyx, the same field
program in C) is built, it is used instead: decode ~1.5 us, encode under 1 us.

Scope: flat records of string, int, long (timestamp-millis as int epoch ms), boolean, double
and ``["null", X]`` unions of those. Anything else makes ``compile_*`` return None, and the
callers use :mod:`tokenaudit.schemas.codec`. Correctness is anchored to that codec: encoders
fall back to it for any value they do not handle (output byte-identical, tested); decoders
hand any message that is not written with the current schema to it (older writers are
resolved by fastavro), and raise the same :class:`AvroDecodeError` type on bad bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tokenaudit.errors import AvroDecodeError
from tokenaudit.schemas.codec import CONFLUENT_HEADER_LEN, HEADER_LEN, SchemaVersion, catalog
from tokenaudit.schemas.codec import decode as generic_decode
from tokenaudit.schemas.codec import encode as generic_encode

if TYPE_CHECKING:
    from tokenaudit.schemas._native import FlatCodec

# The same codecs in C (schemas/_native.pyx, built by setup.py with Cython): ~5x faster
# again. Optional: without a C compiler the generated Python below is used.
_NATIVE_ABI = 2
_flat_codec: type[FlatCodec] | None = None
try:
    from tokenaudit.schemas import _native

    if getattr(_native, "ABI_VERSION", None) == _NATIVE_ABI:  # a stale build from another .pyx is not trusted
        _flat_codec = _native.FlatCodec
except ImportError:  # not built
    pass
NATIVE = _flat_codec is not None

#: what compile_encoder returns: any mapping with the schema's fields (a typed record included)
Encoder = Callable[[Mapping[str, Any]], bytes]
#: what compile_decoder returns
Decoder = Callable[[bytes], dict[str, Any]]

_VARINT_CACHE = 1 << 14
_double = struct.Struct("<d").pack
_unpack_double = struct.Struct("<d").unpack_from


def _varint_uncached(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SMALL = tuple(_varint_uncached(i) for i in range(_VARINT_CACHE))
_MEMO: dict[int, bytes] = {}


def _varint_memo(n: int) -> bytes:
    """Varints of large values that repeat (window bounds: every rollup of a window has the
    same two), from a bounded memo: a dict hit instead of a 6-step loop."""
    b = _MEMO.get(n)
    if b is None:
        if len(_MEMO) >= 1 << 16:
            _MEMO.clear()
        b = _MEMO[n] = _varint_uncached(n)
    return b


def _native_codec() -> type[FlatCodec]:
    if _flat_codec is None:
        raise RuntimeError("the native codec (schemas/_native.pyx) is not built, or is a stale build")
    return _flat_codec


class _Unsupported(Exception):
    pass


def _flat_type(ftype: Any) -> Any:
    if isinstance(ftype, dict) and ftype.get("logicalType") == "timestamp-millis" and ftype.get("type") == "long":
        return "long"
    if isinstance(ftype, dict) and ftype.get("logicalType") == "uuid" and ftype.get("type") == "string":
        return "string"  # the canonical text form: what the codec returns for uuid fields too
    return ftype


def _is_timestamp(ftype: Any) -> bool:
    if isinstance(ftype, list) and len(ftype) == 2 and ftype[0] == "null":
        ftype = ftype[1]
    return isinstance(ftype, dict) and ftype.get("logicalType") == "timestamp-millis"


def _timestamp_fields(raw: dict[str, Any]) -> list[str]:
    return [f["name"] for f in raw["fields"] if _is_timestamp(f["type"])]


# --- encoding ----------------------------------------------------------------------------------
# Source snippets per Avro type; {v} is the value expression. Straight-line code (one function
# per schema, no per-field calls) is what makes this ~3x faster than a generic writer.
_ENCODE = {
    "string": ("if {v}.__class__ is not str: raise U\nb = {v}.encode(); n = len(b); a(S[n] if n < C else V(n)); a(b)"),
    "int": (
        "if {v}.__class__ is not int or not -2147483648 <= {v} <= 2147483647: raise U\n"
        "a(S[{v}] if 0 <= {v} < C else V({v}))"
    ),
    "long": (
        "if {v}.__class__ is not int or not -9223372036854775808 <= {v} <= 9223372036854775807: raise U\n"
        "a(S[{v}] if 0 <= {v} < C else V({v}))"
    ),
    "boolean": "if {v} is True: a(b'\\x01')\nelif {v} is False: a(b'\\x00')\nelse: raise U",
    "double": "if {v}.__class__ is not float and {v}.__class__ is not int: raise U\na(D({v}))",
}


def _encode_snippet(ftype: Any, var: str) -> str:
    ftype = _flat_type(ftype)
    if isinstance(ftype, str) and ftype in _ENCODE:
        return _ENCODE[ftype].format(v=var)
    if isinstance(ftype, list) and len(ftype) == 2 and ftype[0] == "null":
        inner = _encode_snippet(ftype[1], var).replace("\n", "\n    ")
        return f"if {var} is None: a(b'\\x00')\nelse:\n    a(b'\\x02')\n    {inner}"
    raise _Unsupported


def _field_program(raw: dict[str, Any]) -> list[tuple[str, str, bool]] | None:
    """(name, type, nullable) per field, for the native codec; None if not flat."""
    program: list[tuple[str, str, bool]] = []
    for f in raw["fields"]:
        ftype, nullable = f["type"], False
        if isinstance(ftype, list) and len(ftype) == 2 and ftype[0] == "null":
            ftype, nullable = ftype[1], True
        ftype = _flat_type(ftype)
        if not isinstance(ftype, str) or ftype not in _DECODE:
            return None
        program.append((f["name"], ftype, nullable))
    return program


def compile_encoder(
    name: str, memo_large: bool = False, native: bool | None = None, confluent: bool = False
) -> Encoder | None:
    """A fast encoder for the current ``name`` schema, or None when the schema is not flat.

    Byte-identical to :func:`tokenaudit.schemas.encode`; a value it does not handle (a
    datetime for a timestamp, a missing field) goes through that function instead.
    ``memo_large``: memoise varints of large values (for records whose large values repeat;
    generated Python only). ``native``: the C codec (default: when built). ``confluent``: the
    Confluent wire format (the registry id is bound first), else single-object encoding; only
    the constant header differs, so both cost the same."""
    sv = catalog.current(name)
    if sv.raw.get("type") != "record":
        return None
    header = catalog.header(sv, confluent)
    if NATIVE if native is None else native:
        program = _field_program(sv.raw)
        if program is None:
            return None
        return _native_codec()(program, header, _BadValue, lambda r: generic_encode(name, r, None, confluent)).encode
    lines = ["def encode(r):", "    o = [H]", "    a = o.append", "    try:"]
    try:
        for i, f in enumerate(sv.raw["fields"]):
            if not str(f["name"]).isidentifier():
                return None
            lines.append(f"        v{i} = r[{f['name']!r}]")
            lines.extend("        " + line for line in _encode_snippet(f["type"], f"v{i}").split("\n"))
    except _Unsupported:
        return None
    lines += [
        "    except (U, KeyError, UnicodeEncodeError):",
        "        return G(NAME, r, None, CONFLUENT)",
        "    return b''.join(o)",
    ]
    namespace: dict[str, Any] = {
        "H": header,
        "CONFLUENT": confluent,
        "S": _SMALL,
        "C": _VARINT_CACHE,
        "D": _double,
        "V": _varint_memo if memo_large else _varint_uncached,
        "U": _Unsupported,
        "G": generic_encode,
        "NAME": name,
    }
    exec(compile("\n".join(lines), f"<avro encoder {name} v{sv.version}>", "exec"), namespace)
    encoder: Encoder = namespace["encode"]  # generated above: exec's namespace is untyped
    return encoder


# --- decoding ----------------------------------------------------------------------------------
class _BadValue(Exception):
    pass


def _varint_tail(d: bytes, i: int, b: int) -> tuple[int, int]:
    """The rest of a zig-zag varint whose first byte ``b`` (>= 0x80) was at ``i - 1``."""
    n = b & 0x7F
    shift = 7
    while True:
        b = d[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), i
        shift += 7
        if shift > 63:
            raise _BadValue("varint longer than 10 bytes")


# One- and two-byte varints (values -8192..8191: token counts, status codes) inline; longer
# ones (timestamps, offsets) through _varint_tail.
_READ_LONG = [
    "b = d[i]; i += 1",
    "if b < 128: {t} = (b >> 1) ^ -(b & 1)",
    "else:",
    "    c = d[i]",
    "    if c < 128: z = (b & 127) | (c << 7); i += 1; {t} = (z >> 1) ^ -(z & 1)",
    "    else: {t}, i = VT(d, i, b)",
]
_DECODE = {
    "int": _READ_LONG,
    "long": _READ_LONG,
    "string": [
        "b = d[i]; i += 1",
        "if b < 128: n = (b >> 1) ^ -(b & 1)",
        "else: n, i = VT(d, i, b)",
        "j = i + n",
        "if j > L: raise IndexError",
        "if n < 0: raise B('negative string length %d' % n)",
        "{t} = d[i:j].decode(); i = j",
    ],
    # as fastavro reads it: any non-zero byte is true
    "boolean": ["{t} = d[i] != 0; i += 1"],
    "double": ["{t}, = DD(d, i); i += 8"],
}


def _decode_snippet(ftype: Any, target: str) -> list[str]:
    ftype = _flat_type(ftype)
    if isinstance(ftype, str) and ftype in _DECODE:
        return [line.format(t=target) for line in _DECODE[ftype]]
    if isinstance(ftype, list) and len(ftype) == 2 and ftype[0] == "null":
        inner = _decode_snippet(ftype[1], target)
        return [
            "b = d[i]; i += 1",
            f"if b == 0: {target} = None",
            "elif b == 2:",
            *("    " + line for line in inner),
            "else: raise B('union index %d out of range' % b)",
        ]
    raise _Unsupported


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _as_epoch_ms(record: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    for name in fields:
        value = record.get(name)
        if isinstance(value, datetime):
            record[name] = (value - _EPOCH) // _MS  # exact (float timestamps can be 1 ms off)
    return record


def compile_decoder(name: str, native: bool | None = None) -> Decoder | None:
    """A fast decoder of single-object messages holding a ``name`` record, or None when the
    schema is not flat. Timestamp-millis fields come back as int epoch ms, whichever path
    read them; bad bytes raise :class:`AvroDecodeError`. ``native``: the C codec (default:
    when built)."""
    sv = catalog.current(name)
    if sv.raw.get("type") != "record":
        return None
    if NATIVE if native is None else native:
        program = _field_program(sv.raw)
        if program is None:
            return None
        codec = _native_codec()
        single = codec(program, sv.header, _BadValue, None).decode_body
        # decode_body starts after the header's length, whatever its bytes: any 5 bytes stand for the id
        confluent = codec(program, bytes(CONFLUENT_HEADER_LEN), _BadValue, None).decode_body
        return _wrap_decoder(name, sv, single, confluent)
    fields = sv.raw["fields"]
    lines = [f"def body(d, i={HEADER_LEN}):", "    L = len(d)"]
    try:
        for k, f in enumerate(fields):
            lines.extend("    " + line for line in _decode_snippet(f["type"], f"v{k}"))
    except _Unsupported:
        return None
    lines.append("    if i != L: raise B('%d trailing bytes after the record' % (L - i))")
    lines.append("    return {" + ", ".join(f"{f['name']!r}: v{k}" for k, f in enumerate(fields)) + "}")
    namespace: dict[str, Any] = {"VT": _varint_tail, "DD": _unpack_double, "B": _BadValue}
    exec(compile("\n".join(lines), f"<avro decoder {name} v{sv.version}>", "exec"), namespace)
    body: Callable[..., dict[str, Any]] = namespace["body"]  # generated above: exec's namespace is untyped
    return _wrap_decoder(name, sv, body, lambda d: body(d, CONFLUENT_HEADER_LEN))


def _body_error(label: str, exc: Exception) -> AvroDecodeError:
    if isinstance(exc, _BadValue):
        return AvroDecodeError(f"corrupt {label} body: {exc}")
    if isinstance(exc, UnicodeDecodeError):
        return AvroDecodeError(f"corrupt {label} body: {exc!r}")
    return AvroDecodeError(f"truncated {label} body")


def _wrap_decoder(name: str, sv: SchemaVersion, body: Decoder, confluent_body: Decoder) -> Decoder:
    """Framing dispatch, other writer versions, and one error type around the body decoders.

    Single-object records of the current version take the path they took before the Confluent
    format existed (one header compare, then the body), so it costs what it did; a Confluent
    record whose id is the current version's (bound at start-up, read from
    ``catalog.current_ids`` at each call so a decoder made before the binding sees it) costs
    one more compare and takes the same body decoder from byte 5."""
    stamps = _timestamp_fields(sv.raw)
    header = sv.header
    label = f"{name} v{sv.version}"
    current_ids = catalog.current_ids

    def decode(data: bytes) -> dict[str, Any]:
        try:
            if data.__class__ is bytes:
                if data[:HEADER_LEN] == header:
                    return body(data)
                if data[:CONFLUENT_HEADER_LEN] == current_ids.get(name):
                    return confluent_body(data)
        except (_BadValue, IndexError, struct.error, UnicodeDecodeError) as exc:
            raise _body_error(label, exc) from None
        # another writer version (resolved by fastavro), or the codec's error for bad bytes
        record = generic_decode(data, name)
        return _as_epoch_ms(record, stamps)

    return decode
