"""Avro on the wire, with fastavro: two framings, told apart by the first byte.

- The Confluent wire format (the Kafka ecosystem's convention, written when a schema
  registry is configured): byte ``00``, the writer schema's 4-byte big-endian registry id,
  then the binary body. Ids are bound to the shipped versions at start-up
  (:mod:`tokenaudit.infra.schema_registry`); an id this process has not seen is asked of the
  registry once through :attr:`SchemaCatalog.resolver` and cached.
- Avro single-object encoding (the first release's format, readable for good): ``C3 01``,
  the 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's canonical form,
  then the body.

Either way a message names its writer schema, so a reader resolves any known older (or
newer) writer version against its own current schema with Avro's resolution rules.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from tokenaudit.errors import AvroDecodeError

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_LEN = 5

EVENT = "token_usage_event"
ANOMALY = "anomaly"
ROLLUP = "usage_rollup"
SAMPLED = "sampled_record"
BUDGET = "budget"
SPEND = "budget_spend"


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


def confluent_header(schema_id: int) -> bytes:
    """Magic byte 0 and the registry id, as the Confluent wire format frames a record."""
    return CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")


def schema_fingerprint(raw: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the canonical form, as the 8 little-endian bytes the wire format carries."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(raw), "CRC-64-AVRO"))


@dataclass
class SchemaCatalog:
    """Every schema version shipped in ``avsc/``, by name and by fingerprint; the highest
    version of a name is current.

    A local, read-only table of the schemas this package ships: what the single-object
    encoding's fingerprint points into. Not a schema registry (a service that assigns ids and
    checks compatibility as schemas are registered): registry ids are bound to these versions
    (:meth:`bind_id`) by :mod:`tokenaudit.infra.schema_registry`, which also installs the
    :attr:`resolver` that fetches the schema of an id not bound yet."""

    by_fingerprint: dict[bytes, SchemaVersion] = field(default_factory=dict)
    by_name: dict[str, list[SchemaVersion]] = field(default_factory=dict)
    _resolved: dict[tuple[bytes, str], Any] = field(default_factory=dict)
    by_id: dict[int, SchemaVersion] = field(default_factory=dict)
    id_of: dict[bytes, int] = field(default_factory=dict)  # fingerprint -> registry id
    current_ids: dict[str, bytes] = field(default_factory=dict)  # name -> Confluent header of its current version
    # registry id -> the writer schema's JSON (or None when the registry has no such id)
    resolver: Callable[[int], dict[str, Any] | None] | None = None

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

    # --- registry ids ------------------------------------------------------------------------
    def bind_id(self, schema_id: int, sv: SchemaVersion) -> None:
        self.by_id[schema_id] = sv
        self.id_of[sv.fingerprint] = schema_id
        versions = self.by_name.get(sv.name)
        if versions and versions[-1] is sv:
            self.current_ids[sv.name] = confluent_header(schema_id)

    def header(self, sv: SchemaVersion, confluent: bool) -> bytes:
        """The framing of records written with ``sv``: the registry id's, or single-object."""
        if not confluent:
            return sv.header
        schema_id = self.id_of.get(sv.fingerprint)
        if schema_id is None:
            raise KeyError(f"{sv.name} v{sv.version} has no registry id: register the schemas first")
        return confluent_header(schema_id)

    def by_registry_id(self, schema_id: int) -> SchemaVersion:
        sv = self.by_id.get(schema_id)
        if sv is not None:
            return sv
        raw = self.resolver(schema_id) if self.resolver is not None else None
        if raw is None:
            where = "the registry has no such id" if self.resolver else "no schema registry is configured"
            raise AvroDecodeError(f"unknown writer schema id {schema_id} ({where})")
        sv = self.by_fingerprint.get(schema_fingerprint(raw)) or self._foreign(raw)
        self.bind_id(schema_id, sv)
        return sv

    def _foreign(self, raw: dict[str, Any]) -> SchemaVersion:
        """A writer version this package does not ship (a newer release's), matched to ours by
        the record's full name; kept out of ``by_name`` so it never becomes what we write."""
        full = _full_name(raw)
        for name, versions in self.by_name.items():
            if _full_name(versions[-1].raw) == full:
                return SchemaVersion(name, 0, raw, _parse(raw), schema_fingerprint(raw))
        raise AvroDecodeError(f"writer schema {full!r} is none of this package's records")

    @classmethod
    def load_builtin(cls) -> SchemaCatalog:
        return cls.load_dir(resources.files("tokenaudit.schemas").joinpath("avsc"))

    @classmethod
    def load_dir(cls, folder: Any) -> SchemaCatalog:
        """Every ``<name>.v<N>.avsc`` of a folder (a Path or a package resource)."""
        found = cls()
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            match = re.fullmatch(r"(\w+)\.v(\d+)\.avsc", entry.name)
            if match:
                found.add(match.group(1), int(match.group(2)), json.loads(entry.read_text()))
        return found

    # --- encoding --------------------------------------------------------------------------
    def encode(
        self, name: str, record: Mapping[str, Any], version: int | None = None, confluent: bool = False
    ) -> bytes:
        sv = self.current(name) if version is None else self.version(name, version)
        buf = io.BytesIO()
        buf.write(self.header(sv, confluent))
        schemaless_writer(buf, sv.parsed, record)
        return buf.getvalue()

    def writer_of(self, data: bytes) -> SchemaVersion:
        return self.framing(data)[0]

    def framing(self, data: bytes) -> tuple[SchemaVersion, int]:
        """The writer version a message names, and where its body starts."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AvroDecodeError(f"expected bytes, got {type(data).__name__}")
        if data[:1] == CONFLUENT_MAGIC:
            if len(data) < CONFLUENT_HEADER_LEN:
                raise AvroDecodeError(f"message of {len(data)} bytes is shorter than the 5-byte Confluent header")
            return self.by_registry_id(int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big")), CONFLUENT_HEADER_LEN
        if len(data) < HEADER_LEN:
            raise AvroDecodeError(f"message of {len(data)} bytes is shorter than the 10-byte header")
        if data[:2] != MAGIC:
            raise AvroDecodeError(
                f"bad magic {bytes(data[:2]).hex()}: neither the Confluent wire format nor Avro single-object encoding"
            )
        fp = bytes(data[2:HEADER_LEN])
        sv = self.by_fingerprint.get(fp)
        if sv is None:
            raise AvroDecodeError(f"unknown writer schema fingerprint {fp.hex()}")
        return sv, HEADER_LEN

    def decode(self, data: bytes, name: str | None = None) -> dict[str, Any]:
        """Decode against the current reader schema of ``name`` (default: the writer's name)."""
        writer, start = self.framing(data)
        reader_name = name or writer.name
        if writer.name != reader_name:
            raise AvroDecodeError(f"message holds a {writer.name!r} record, expected {reader_name!r}")
        reader = self.current(reader_name)
        body = io.BytesIO(memoryview(data)[start:])
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
        if body.tell() != len(data) - start:
            raise AvroDecodeError(f"{len(data) - start - body.tell()} trailing bytes after the {writer.name} record")
        return record


def _full_name(raw: dict[str, Any]) -> str:
    name = str(raw.get("name", ""))
    namespace = raw.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def full_name(name: str) -> str:
    """The Avro full name of a shipped record (``ce_type`` of the CloudEvents headers)."""
    return _full_name(catalog.current(name).raw)


catalog = SchemaCatalog.load_builtin()


def encode(name: str, record: Mapping[str, Any], version: int | None = None, confluent: bool = False) -> bytes:
    return catalog.encode(name, record, version, confluent)


def decode(data: bytes, name: str | None = None) -> dict[str, Any]:
    return catalog.decode(data, name)
