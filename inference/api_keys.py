"""API-key registry: a TOML file of key hashes, each mapping to a client and department.

Keys are random 256-bit tokens, so a plain SHA-256 is a safe one-way store (no salt or slow
hash needed: there is nothing to brute-force). ``key_id`` (a prefix of the hash) identifies a
key in events and logs without revealing it. Importing this module does not load TensorFlow.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tokenaudit.api_keys")

ROLES = ("client", "admin")
KEY_PREFIX = "ta_"


class KeyRegistryError(ValueError):
    """The registry file is unreadable or malformed; the message names the file and entry."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    client_id: str
    department: str
    role: str = "client"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def key_id_of(raw_key: str) -> str:
    return "k_" + hash_key(raw_key)[:12]


class KeyRegistry:
    """Lookups by key hash. A registry loaded from a file follows it: `keys add` takes effect
    in running processes within about a second, without a restart (a broken edit keeps the
    last good entries and is logged)."""

    RELOAD_CHECK_SECONDS = 1.0

    def __init__(self, entries: dict[str, ApiKey], path: Path | None = None, mtime_ns: int = 0):
        self._by_hash = entries
        self._path = path
        self._mtime_ns = mtime_ns
        self._checked = time.monotonic()

    @classmethod
    def load(cls, path: Path) -> "KeyRegistry":
        path = Path(path)
        try:
            mtime_ns = path.stat().st_mtime_ns
        except OSError:
            mtime_ns = 0
        return cls(cls._parse(path), path, mtime_ns)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._path is None or now - self._checked < self.RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        try:
            mtime_ns = self._path.stat().st_mtime_ns
        except OSError:
            return
        if mtime_ns == self._mtime_ns:
            return
        try:
            self._by_hash = self._parse(self._path)
            self._mtime_ns = mtime_ns
        except KeyRegistryError as exc:
            log.error("keeping the previous API keys: %s", exc)

    @staticmethod
    def _parse(path: Path) -> dict[str, ApiKey]:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise KeyRegistryError(f"API-key registry {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise KeyRegistryError(f"API-key registry {path} is unreadable: {exc}") from None
        entries: dict[str, ApiKey] = {}
        for i, item in enumerate(data.get("keys", [])):
            try:
                digest = str(item["hash"]).removeprefix("sha256:")
                role = item.get("role", "client")
                if role not in ROLES or len(digest) != 64:
                    raise ValueError(f"role must be one of {ROLES} and hash a sha256 hex digest")
                entries[digest] = ApiKey("k_" + digest[:12], str(item["client_id"]), str(item.get("department", "")),
                                         role)
            except (KeyError, TypeError, ValueError) as exc:
                raise KeyRegistryError(f"API-key registry {path}: entry {i} is invalid ({exc})") from None
        return entries

    def lookup(self, raw_key: str) -> ApiKey | None:
        self._maybe_reload()
        digest = hash_key(raw_key)
        found = self._by_hash.get(digest)
        # compare_digest keeps the final check constant-time (the dict lookup is on a hash, not the key)
        if found is not None and hmac.compare_digest(found.key_id, "k_" + digest[:12]):
            return found
        return None

    def __len__(self) -> int:
        return len(self._by_hash)


def add_key(path: Path, client_id: str, department: str = "", role: str = "client") -> str:
    """Append a new key to the registry (created 0600 if missing); returns the raw key, shown once."""
    if role not in ROLES:
        raise KeyRegistryError(f"role must be one of {ROLES}")
    if not client_id or any(c in client_id for c in '"\\\n'):
        raise KeyRegistryError(f"invalid client_id {client_id!r}")
    if any(c in department for c in '"\\\n'):
        raise KeyRegistryError(f"invalid department {department!r}")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = (f'\n[[keys]]\nhash = "sha256:{hash_key(raw)}"\nclient_id = "{client_id}"\n'
             f'department = "{department}"\nrole = "{role}"\n')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(entry)
    return raw
