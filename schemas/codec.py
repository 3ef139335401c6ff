"""Avro single-object encoding with fastavro.

Wire format (Avro spec, "Single object encoding"): ``C3 01``, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's canonical form, then the binary body. Every
message names its writer schema, so a reader resolves any known older (or newer) writer
version against its own current schema with Avro's resolution rules.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from tokenaudit.errors import AvroDecodeError

MAGIC = b"\xc3\x01"
HEADER_LEN = 10

EVENT = "token_usage_event"
ANOMALY = "anomaly"
ROLLUP = "usage_rollup"
SAMPLED = "sampled_record"


@dataclass(frozen=True)
class SchemaVersion:
    name: str
    version: int
    raw: dict[str, Any]
    parsed: Any
    fingerprint: bytes

    @property
    def header(self) -> bytes:
        return MAGIC + self.fingerprint


def _parse(raw: dict[str, Any]) -> Any:
    # A fresh named-types dict per schema: two versions of the same record must not collide.
    return parse_schema(_uuids_as_text(raw), named_schemas={})


def _uuids_as_text(schema: Any) -> Any:
    """The schema with ``logicalType: uuid`` dropped from its strings, for fastavro only.

    fastavro turns uuid strings into ``uuid.UUID`` objects on read (and raises on text that
    is not a UUID), while the generated and native codecs read plain text; reading them as
    the plain strings they are on the wire gives one record shape on every path. The wire
    format and the fingerprint are unchanged (the canonical form has no logical types), and
    the published ``.avsc`` keeps the logical type for other readers."""
    if isinstance(schema, list):
        return [_uuids_as_text(s) for s in schema]
    if isinstance(schema, dict):
        if schema.get("type") == "string" and schema.get("logicalType") == "uuid":
            return "string"
        return {k: _uuids_as_text(v) if k in ("type", "fields", "items", "values") else v for k, v in schema.items()}
    return schema


def schema_fingerprint(raw: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the canonical form, as the 8 little-endian bytes the wire format carries."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO"))


@dataclass
class SchemaCatalog:
    """Every schema version shipped in ``avsc/``, by name and by fingerprint; the highest
    version of a name is current.

    A local, read-only table of the schemas this package ships: what the single-object
    encoding's fingerprint points into. Not a schema registry (a service that assigns ids and
    checks compatibility as schemas are registered), which a later release adds beside it."""

    by_fingerprint: dict[bytes, SchemaVersion] = field(default_factory=dict)
    by_name: dict[str, list[SchemaVersion]] = field(default_factory=dict)
    _resolved: dict[tuple[bytes, str], Any] = field(default_factory=dict)

    def add(self, name: str, version: int, raw: dict[str, Any]) -> SchemaVersion:
        sv = SchemaVersion(name, version, raw, _parse(raw), schema_fingerprint(raw))
        self.by_fingerprint[sv.fingerprint] = sv
        versions = self.by_name.setdefault(name, [])
        versions.append(sv)
        versions.sort(key=lambda v: v.version)
        return sv

    def current(self, name: str) -> SchemaVersion:
        try:
            return self.by_name[name][-1]
        except KeyError:
            raise KeyError(f"no schema named {name!r}; known: {sorted(self.by_name)}") from None

    def version(self, name: str, version: int) -> SchemaVersion:
        for sv in self.by_name.get(name, []):
            if sv.version == version:
                return sv
        raise KeyError(f"no version {version} of schema {name!r}")

    @classmethod
    def load_builtin(cls) -> SchemaCatalog:
        found = cls()
        folder = resources.files("tokenaudit.schemas").joinpath("avsc")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            match = re.fullmatch(r"(\w+)\.v(\d+)\.avsc", entry.name)
            if match:
                found.add(match.group(1), int(match.group(2)), json.loads(entry.read_text()))
        return found

    # --- encoding --------------------------------------------------------------------------
    def encode(self, name: str, record: Mapping[str, Any], version: int | None = None) -> bytes:
        sv = self.current(name) if version is None else self.version(name, version)
        buf = io.BytesIO()
        buf.write(sv.header)
        schemaless_writer(buf, sv.parsed, record)
        return buf.getvalue()

    def writer_of(self, data: bytes) -> SchemaVersion:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AvroDecodeError(f"expected bytes, got {type(data).__name__}")
        if len(data) < HEADER_LEN:
            raise AvroDecodeError(f"message of {len(data)} bytes is shorter than the 10-byte header")
        if data[:2] != MAGIC:
            raise AvroDecodeError(f"bad magic {bytes(data[:2]).hex()}: not Avro single-object encoding")
        fp = bytes(data[2:HEADER_LEN])
        sv = self.by_fingerprint.get(fp)
        if sv is None:
            raise AvroDecodeError(f"unknown writer schema fingerprint {fp.hex()}")
        return sv

    def decode(self, data: bytes, name: str | None = None) -> dict[str, Any]:
        """Decode against the current reader schema of ``name`` (default: the writer's name)."""
        writer = self.writer_of(data)
        reader_name = name or writer.name
        if writer.name != reader_name:
            raise AvroDecodeError(f"message holds a {writer.name!r} record, expected {reader_name!r}")
        reader = self.current(reader_name)
        body = io.BytesIO(memoryview(data)[HEADER_LEN:])
        try:
            if writer.fingerprint == reader.fingerprint:
                record = schemaless_reader(body, writer.parsed, None)
            else:
                record = schemaless_reader(body, writer.parsed, reader.parsed)
        except (EOFError, StopIteration, IndexError, ValueError, UnicodeDecodeError, OverflowError) as exc:
            raise AvroDecodeError(f"corrupt or truncated {writer.name} v{writer.version} body: {exc!r}") from None
        except Exception as exc:  # fastavro raises assorted types on garbage; normalise them all
            raise AvroDecodeError(f"undecodable {writer.name} v{writer.version} body: {exc!r}") from None
        if not isinstance(record, dict):  # every schema in avsc/ is a record: fastavro reads a dict
            raise AvroDecodeError(f"{writer.name} v{writer.version} is not a record schema")
        if body.tell() != len(data) - HEADER_LEN:
            raise AvroDecodeError(
                f"{len(data) - HEADER_LEN - body.tell()} trailing bytes after the {writer.name} record"
            )
        return record


catalog = SchemaCatalog.load_builtin()


def encode(name: str, record: Mapping[str, Any], version: int | None = None) -> bytes:
    return catalog.encode(name, record, version)


def decode(data: bytes, name: str | None = None) -> dict[str, Any]:
    return catalog.decode(data, name)
