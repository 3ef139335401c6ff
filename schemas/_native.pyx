# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The flat-record Avro codec of :mod:`tokenaudit.schemas.compiled`, in C (Cython).

Why: the stream worker decodes every event and encodes every output on one core; in pure
Python the generated straight-line decoder still costs ~7 us an event (a fifth of the
worker's CPU on the emission-heavy backfill shape) and the rollup encoder ~2.5 us. The
same field program run in C costs well under 1 us. No maintained library does this (see
compiled.py). Semantics are exactly those of the generated Python code, which stays the
fallback when this extension is not built (no C compiler): compiled.py's tests run both.

A codec is a field program: per field its name, its type code, whether it is a
``["null", T]`` union. Timestamps are int epoch ms, as the rest of the project uses them.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_FromDouble
from cpython.long cimport PyLong_FromLongLong
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

# Bump on any change of behaviour (and in compiled.py): a build left over from another version
# is then not used. `make` rebuilds the extension whenever this file or setup.py changes.
ABI_VERSION = 2

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL

cdef enum:
    MAX_FIELDS = 128

cdef enum Kind:
    K_BOOLEAN = 1
    K_INT = 2
    K_LONG = 3
    K_DOUBLE = 4
    K_STRING = 5

KINDS = {"boolean": K_BOOLEAN, "int": K_INT, "long": K_LONG, "double": K_DOUBLE, "string": K_STRING}


class Unsupported(Exception):
    """A value the codec does not write (wrong type, out of range, not UTF-8 encodable)."""


cdef inline Py_ssize_t read_long(const unsigned char* p, Py_ssize_t L, Py_ssize_t i, int64_t* out, object bad) except -1:
    """A zig-zag varint at ``i``; returns the index after it. Truncation: IndexError."""
    cdef uint64_t n = 0, b
    cdef int shift = 0
    while True:
        if i >= L:
            raise IndexError("truncated varint")
        b = p[i]
        i += 1
        if shift == 63 and (b & 0x7F) > 1:
            raise bad("varint overflows 64 bits")
        n |= (b & 0x7F) << shift
        if b < 0x80:
            out[0] = <int64_t>((n >> 1) ^ (0 - (n & 1)))
            return i
        shift += 7
        if shift > 63:
            raise bad("varint longer than 10 bytes")


cdef struct Buffer:
    unsigned char* data
    Py_ssize_t size
    Py_ssize_t cap


cdef inline int reserve(Buffer* buf, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef unsigned char* grown
    if buf.size + extra <= buf.cap:
        return 0
    cap = max(buf.cap * 2, buf.size + extra)
    grown = <unsigned char*>realloc(buf.data, cap)
    if grown == NULL:
        raise MemoryError()
    buf.data = grown
    buf.cap = cap
    return 0


cdef inline int write_long(Buffer* buf, int64_t value) except -1:
    cdef uint64_t z = (<uint64_t>value << 1) ^ <uint64_t>(value >> 63)
    reserve(buf, 10)
    while z > 0x7F:
        buf.data[buf.size] = <unsigned char>((z & 0x7F) | 0x80)
        buf.size += 1
        z >>= 7
    buf.data[buf.size] = <unsigned char>z
    buf.size += 1
    return 0


cdef inline int write_bytes(Buffer* buf, const char* data, Py_ssize_t n) except -1:
    reserve(buf, n)
    memcpy(buf.data + buf.size, data, n)
    buf.size += n
    return 0


cdef class FlatCodec:
    """Encoder and decoder of one flat record schema version (single-object encoding)."""

    cdef tuple names
    cdef Py_ssize_t n
    cdef unsigned char kinds[MAX_FIELDS]
    cdef unsigned char nullable[MAX_FIELDS]
    cdef bytes header
    cdef Py_ssize_t header_len
    cdef object bad
    cdef object fallback

    def __init__(self, list fields, bytes header, object bad, object fallback):
        """``fields``: (name, kind, nullable) tuples in schema order; ``bad``:
        the exception type raised for values no valid writer produces; ``fallback(record)``:
        the generic encoder, for records this codec does not write."""
        if len(fields) > MAX_FIELDS:
            raise ValueError(f"more than {MAX_FIELDS} fields")
        self.n = len(fields)
        self.names = tuple(name for name, _, _ in fields)
        for k, (name, kind, nullable) in enumerate(fields):
            if kind not in KINDS:
                raise ValueError(f"unsupported field type {kind!r}")
            self.kinds[k] = KINDS[kind]
            self.nullable[k] = bool(nullable)
        self.header = header
        self.header_len = len(header)
        self.bad = bad
        self.fallback = fallback

    def decode_body(self, bytes d):
        """The record after the (already checked) header; IndexError when truncated."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(d)
        cdef Py_ssize_t L = PyBytes_GET_SIZE(d)
        cdef Py_ssize_t i = self.header_len
        cdef Py_ssize_t k
        cdef int64_t v
        cdef uint64_t bits
        cdef double dv
        cdef unsigned char b, kind
        cdef dict out = {}
        cdef object value
        for k in range(self.n):
            if self.nullable[k]:
                if i >= L:
                    raise IndexError("truncated union")
                b = p[i]
                i += 1
                if b == 0:
                    out[self.names[k]] = None
                    continue
                if b != 2:
                    raise self.bad("union index %d out of range" % b)
            kind = self.kinds[k]
            if kind == K_STRING:
                i = read_long(p, L, i, &v, self.bad)
                if v < 0:
                    raise self.bad("negative string length %d" % v)
                if v > L - i:
                    raise IndexError("truncated string")
                value = PyUnicode_DecodeUTF8(<const char*>p + i, <Py_ssize_t>v, NULL)
                i += <Py_ssize_t>v
            elif kind == K_INT or kind == K_LONG:
                i = read_long(p, L, i, &v, self.bad)
                value = PyLong_FromLongLong(v)
            elif kind == K_DOUBLE:
                if L - i < 8:
                    raise IndexError("truncated double")
                # little-endian on the wire, whatever the host's byte order
                bits = (<uint64_t>p[i] | <uint64_t>p[i + 1] << 8 | <uint64_t>p[i + 2] << 16
                        | <uint64_t>p[i + 3] << 24 | <uint64_t>p[i + 4] << 32 | <uint64_t>p[i + 5] << 40
                        | <uint64_t>p[i + 6] << 48 | <uint64_t>p[i + 7] << 56)
                memcpy(&dv, &bits, 8)
                value = PyFloat_FromDouble(dv)
                i += 8
            else:  # K_BOOLEAN: as fastavro reads it, any non-zero byte is true
                if i >= L:
                    raise IndexError("truncated boolean")
                value = p[i] != 0
                i += 1
            out[self.names[k]] = value
        if i != L:
            raise self.bad("%d trailing bytes after the record" % (L - i))
        return out

    def encode(self, record):
        """The message (header and body), byte-identical to the generic codec's, which is
        called instead for a record this codec does not write (a value of another type or
        out of range, a string that is not UTF-8 encodable, a missing field)."""
        try:
            return self._encode(record)
        except (Unsupported, KeyError):
            return self.fallback(record)

    cdef bytes _encode(self, record):
        cdef Buffer buf
        cdef Py_ssize_t k, size
        cdef const char* utf8
        cdef object value
        cdef double dv
        cdef uint64_t bits
        cdef int64_t iv
        cdef unsigned char kind
        cdef int j
        buf.cap = 256
        buf.size = 0
        buf.data = <unsigned char*>malloc(buf.cap)
        if buf.data == NULL:
            raise MemoryError()
        try:
            write_bytes(&buf, PyBytes_AS_STRING(self.header), self.header_len)
            for k in range(self.n):
                value = record[self.names[k]]
                if self.nullable[k]:
                    reserve(&buf, 1)
                    if value is None:
                        buf.data[buf.size] = 0
                        buf.size += 1
                        continue
                    buf.data[buf.size] = 2
                    buf.size += 1
                kind = self.kinds[k]
                if kind == K_STRING:
                    if type(value) is not str:
                        raise Unsupported
                    try:
                        utf8 = PyUnicode_AsUTF8AndSize(value, &size)
                    except UnicodeEncodeError:
                        raise Unsupported
                    write_long(&buf, size)
                    write_bytes(&buf, utf8, size)
                elif kind == K_INT or kind == K_LONG:
                    if type(value) is not int:
                        raise Unsupported
                    try:
                        iv = value
                    except OverflowError:
                        raise Unsupported
                    if kind == K_INT and not -2147483648 <= iv <= 2147483647:
                        raise Unsupported
                    write_long(&buf, iv)
                elif kind == K_DOUBLE:
                    if type(value) is not float and type(value) is not int:
                        raise Unsupported
                    dv = value  # an int too large for a double raises OverflowError, as struct.pack does
                    memcpy(&bits, &dv, 8)
                    reserve(&buf, 8)
                    for j in range(8):
                        buf.data[buf.size + j] = <unsigned char>((bits >> (8 * j)) & 0xFF)
                    buf.size += 8
                else:  # K_BOOLEAN
                    reserve(&buf, 1)
                    if value is True:
                        buf.data[buf.size] = 1
                    elif value is False:
                        buf.data[buf.size] = 0
                    else:
                        raise Unsupported
                    buf.size += 1
            return PyBytes_FromStringAndSize(<const char*>buf.data, buf.size)
        finally:
            free(buf.data)
