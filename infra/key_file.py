"""The API-key registry on disk: the TOML it is written as and the atomic, locked rewrite.

Split from :mod:`tokenaudit.infra.keys` (which reads, follows and changes the registry) so
each module stays small; only that module writes through these.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tokenaudit.errors import KeyRegistryError

if TYPE_CHECKING:
    from tokenaudit.infra.keys import ApiKey


def toml_string(value: str) -> str:
    """A TOML basic string. Hand-written (the standard library reads TOML but cannot write it):
    backslash, quote and every control character escaped; values are identifiers already."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise KeyRegistryError(f"cannot store a lone surrogate in {value!r:.40}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_time(value: datetime) -> str:
    return value.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_registry(entries: list[tuple[str, ApiKey]]) -> str:
    lines = [
        "# tokenaudit API keys: SHA-256 hashes only. Written by `tokenaudit keys add|revoke`",
        "# (each write replaces the whole file atomically).",
    ]
    for digest, key in entries:
        lines += [
            "",
            "[[keys]]",
            f'hash = "sha256:{digest}"',
            f"client_id = {toml_string(key.client_id)}",
            f"department = {toml_string(key.department)}",
            f'role = "{key.role}"',
        ]
        if key.created is not None:
            lines.append(f"created = {toml_time(key.created)}")
        if key.expires is not None:
            lines.append(f"expires = {toml_time(key.expires)}")
        lines += [f"{name} = {value}" for name, value in (("rpm", key.rpm), ("tpm", key.tpm)) if value is not None]
    return "\n".join(lines) + "\n"


@contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """One writer at a time (read, change, rename): two `keys add` at once both land."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to a new file (mode 0600), fsync it, rename it over ``path``, fsync the dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
