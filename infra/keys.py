"""API keys: the registry file, its life cycle, bearer authentication for every HTTP service,
and the admin key the CLI presents to the usage API.

The one module that parses ``Authorization: Bearer`` headers and follows the registry, used by
the inference app (``inference/identity.py``) and the usage API alike, so both accept, expire
and revoke exactly the same keys. It lives in the platform layer because both services (and
``up``, which creates the admin key) stand on it.

The registry is a TOML file of key hashes, each mapping to a client, department and role, with
its creation and optional expiry time. Keys are random 256-bit tokens, so a plain SHA-256 is a
safe one-way store (no salt or slow hash needed: there is nothing to brute-force). ``key_id``
(a prefix of the hash) identifies a key in events, logs and ``keys list`` without revealing it.

Writes (``add_key``, ``revoke_key``) rewrite the whole file under a lock: a new file, fsynced,
renamed over the old one, so a reader sees the old registry or the new one, never half of
one. Running processes re-check the file every :data:`RELOAD_CHECK_SECONDS`, so an added,
revoked or expired key takes effect everywhere within about a second (an unknown key makes
the check at once, so a key just added works on its first request).

Fail closed: once a registry has existed (a marker file in the data dir, written by every
writer and every process that loads one), or when ``TOKENAUDIT_API_KEYS_FILE`` names one, a
missing or unreadable registry is *unavailable* (503), never open. Only a deployment that has
never had a registry runs open (development mode). Importing this module does not load
TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tokenaudit.errors import AuthError, KeyRegistryError
from tokenaudit.infra.key_file import render_registry, replace_file, write_lock
from tokenaudit.infra.key_file import toml_string as toml_string  # re-exported: the tests check it
from tokenaudit.schemas.identifiers import identifier_problem

log = logging.getLogger("tokenaudit.api_keys")

ROLES = ("client", "admin")
KEY_PREFIX = "ta_"
MARKER_NAME = "api_keys.required"
RELOAD_CHECK_SECONDS = 0.5
_DURATION = re.compile(r"(\d{1,6})([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    client_id: str
    department: str
    role: str = "client"
    created: datetime | None = None
    expires: datetime | None = None
    expires_at: float = math.inf  # ``expires`` as epoch seconds: one float compare per request
    rpm: int | None = None  # requests per minute (None: no limit), enforced per inference instance
    tpm: int | None = None  # tokens per minute (input + output), likewise

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def rate_limit(value: object, name: str) -> int | None:
    """A per-minute limit as stored and as given to the CLI: None (no limit) or 1..10^12."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10**12:
        raise KeyRegistryError(f"--{name} must be a whole number from 1 to 10^12, got {value!r:.40}")
    return value


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(raw_key: str) -> str:
    return "k_" + hash_key(raw_key)[:12]


def bearer_token(authorization: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if authorization is None:
        return None
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


# --- reading ------------------------------------------------------------------------------------
def _utc(value: object, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{what} must be a TOML date-time with a zone (e.g. 2026-01-31T12:00:00Z)")
    return value.astimezone(UTC)


def parse_registry(path: Path) -> dict[str, ApiKey]:
    """hash -> key for every entry; :class:`KeyRegistryError` naming the file and entry."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyRegistryError(f"API-key registry {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise KeyRegistryError(f"API-key registry {path} is unreadable: {exc}") from None
    entries: dict[str, ApiKey] = {}
    items = data.get("keys", [])
    if not isinstance(items, list):
        raise KeyRegistryError(f"API-key registry {path}: 'keys' must be an array of tables")
    for i, item in enumerate(items):
        try:
            digest = str(item["hash"]).removeprefix("sha256:")
            role = item.get("role", "client")
            if role not in ROLES or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"role must be one of {ROLES} and hash a sha256 hex digest")
            client_id, department = item["client_id"], item.get("department", "")
            for name, value, required in (("client_id", client_id, True), ("department", department, False)):
                problem = identifier_problem(value, required=required)
                if problem:
                    raise ValueError(f"{name} {problem}")
            created, expires = _utc(item.get("created"), "created"), _utc(item.get("expires"), "expires")
            entries[digest] = ApiKey(
                "k_" + digest[:12],
                client_id,
                department,
                role,
                created,
                expires,
                expires.timestamp() if expires else math.inf,
                rate_limit(item.get("rpm"), "rpm"),
                rate_limit(item.get("tpm"), "tpm"),
            )
        except (KeyError, TypeError, ValueError, AttributeError, KeyRegistryError) as exc:
            raise KeyRegistryError(f"API-key registry {path}: entry {i} is invalid ({exc})") from None
    return entries


def list_keys(path: Path) -> list[ApiKey]:
    """Every key in the registry (none when it does not exist), in the order they were added."""
    if not Path(path).exists():
        return []
    return list(parse_registry(path).values())


# --- the registry a running service follows ----------------------------------------------------
class KeyRegistry:
    """The registry as a running process sees it: ``open`` (no registry ever: development
    mode), ``enforced`` or ``unavailable`` (fail closed). Re-checked at most every
    :data:`RELOAD_CHECK_SECONDS` on use: a stat, and a parse only when the file changed (a
    rename gives it a new inode)."""

    RELOAD_CHECK_SECONDS = RELOAD_CHECK_SECONDS

    def __init__(self, path: Path, *, marker: Path | None = None, required: bool = False):
        self.path = Path(path)
        self.marker = marker
        self.required = required
        self.state = "open"
        self.problem = ""
        self._by_hash: dict[str, ApiKey] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -math.inf
        self._refresh(force=True)

    @classmethod
    def load(cls, path: Path) -> KeyRegistry:
        """A registry that must exist and be valid now (:class:`KeyRegistryError` otherwise)."""
        registry = cls(path, required=True)
        if registry.state != "enforced":
            raise KeyRegistryError(registry.problem)
        return registry

    @classmethod
    def from_settings(cls, settings) -> KeyRegistry:
        """The registry of a service: TOKENAUDIT_API_KEYS_FILE (always required), else
        <data_dir>/api_keys.toml, required once the data dir's marker says one existed."""
        return cls(
            settings.default_api_keys_file, marker=marker_path(settings), required=settings.api_keys_file is not None
        )

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp = None
            existed = self.marker is not None and self.marker.exists()
            if self.required or existed:
                why = "one existed before" if existed else "it is configured"
                self._unavailable(
                    f"API-key registry {self.path} is missing ({why}: every key is refused until it is back)"
                )
            elif self.state != "open":
                self.state, self._by_hash = "open", {}
            return
        except OSError as exc:
            self._stamp = None
            self._unavailable(f"API-key registry {self.path} is unreadable: {exc}")
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            entries = parse_registry(self.path)
        except KeyRegistryError as exc:
            self._stamp = stamp
            self._unavailable(str(exc))
            return
        self._by_hash, self._stamp, self.problem = entries, stamp, ""
        if self.state != "enforced":
            log.info("API-key registry %s enforced (%d keys)", self.path, len(entries))
        self.state = "enforced"
        if self.marker is not None and not self.marker.exists():
            write_marker(self.marker, self.path)

    def _unavailable(self, problem: str) -> None:
        if self.state != "unavailable" or problem != self.problem:
            log.error("%s; /v1 answers 503", problem)
        self.state, self.problem, self._by_hash = "unavailable", problem, {}

    def authenticate(self, authorization: str | bytes | None, *, allow_open: bool = True) -> ApiKey | None:
        """The key of an ``Authorization`` header value. None only in open mode (and only with
        ``allow_open``); :class:`AuthError` for a missing, unknown or expired key (401) or an
        unavailable registry (503)."""
        self._refresh()
        if self.state == "unavailable":
            raise AuthError(503, "api_keys_unavailable", "the API-key registry is unavailable; see the server log")
        raw = bearer_token(authorization)
        if self.state == "open" and allow_open:
            return None
        if raw is None:
            raise AuthError(401, "invalid_api_key", "missing API key (send Authorization: Bearer <key>)")
        found = self._find(raw)
        if found is None:
            raise AuthError(401, "invalid_api_key", "unknown API key")
        if found.expired():
            raise AuthError(401, "invalid_api_key", "expired API key")
        return found

    def lookup(self, raw_key: str) -> ApiKey | None:
        """The live key for a raw token, or None (unknown or expired). Raises
        :class:`KeyRegistryError` while the registry is unavailable."""
        self._refresh()
        if self.state == "unavailable":
            raise KeyRegistryError(self.problem)
        found = self._find(raw_key)
        return None if found is None or found.expired() else found

    def _find(self, raw_key: str) -> ApiKey | None:
        digest = hash_key(raw_key)
        found = self._by_hash.get(digest)
        if found is None:  # maybe added a moment ago: look now (a stat, a parse only if it changed)
            self._refresh(force=True)
            found = self._by_hash.get(digest)
        # compare_digest keeps the final check constant-time (the dict lookup is on a hash, not the key)
        if found is not None and hmac.compare_digest(found.key_id, "k_" + digest[:12]):
            return found
        return None

    def __len__(self) -> int:
        return len(self._by_hash)


def marker_path(settings) -> Path:
    return settings.data_dir / MARKER_NAME


def write_marker(marker: Path, registry: Path) -> None:
    """Persist that this deployment has had a registry: from now on a missing one fails closed."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        log.warning("cannot write the API-key marker %s: %s", marker, exc)
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(
            f"An API-key registry ({registry}) exists for this deployment: a missing or unreadable one "
            "makes /v1 answer 503 instead of running open. Delete this file only to return to "
            "development mode on purpose.\n"
        )


# --- writing ------------------------------------------------------------------------------------
def _current(path: Path) -> list[tuple[str, ApiKey]]:
    return list(parse_registry(path).items()) if path.exists() else []


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """``30d``/``12h``/``90m``/``2w`` from now, or an ISO date/time (naive means UTC)."""
    now = now or datetime.now(UTC)
    value = text.strip()
    match = _DURATION.fullmatch(value)
    try:
        if match:
            when = now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        else:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            when = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise KeyRegistryError(
            f"--expires: expected a duration like 90m, 12h, 30d, 2w or an ISO date/time, got {text!r}"
        ) from None
    if when <= now:
        raise KeyRegistryError(f"--expires: {text!r} is not in the future")
    return when


def add_key(
    path: Path,
    client_id: str,
    department: str = "",
    role: str = "client",
    *,
    expires: datetime | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> str:
    """Add a new key to the registry (created 0600 if missing); returns the raw key, shown once.
    A bad client_id or department is refused with the shared identifier rule, nothing written."""
    if role not in ROLES:
        raise KeyRegistryError(f"role must be one of {ROLES}")
    for name, value, required in (("client_id", client_id, True), ("department", department, False)):
        problem = identifier_problem(value, required=required)
        if problem:
            raise KeyRegistryError(f"invalid {name}: {name} {problem}: {value!r:.80}")
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    path = Path(path)
    now = datetime.now(UTC).replace(microsecond=0)
    rpm, tpm = rate_limit(rpm, "rpm"), rate_limit(tpm, "tpm")
    key = ApiKey(key_id_of(raw), client_id, department, role, now, expires, rpm=rpm, tpm=tpm)
    with write_lock(path):
        replace_file(path, render_registry([*_current(path), (hash_key(raw), key)]))
    return raw


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Remove the key with ``key_id`` (rewrites the registry); :class:`KeyRegistryError` if none."""
    path = Path(path)
    with write_lock(path):
        entries = _current(path)
        kept = [(d, k) for d, k in entries if k.key_id != key_id]
        if len(kept) == len(entries):
            raise KeyRegistryError(f"no key {key_id!r} in {path} (see `tokenaudit keys list`)")
        replace_file(path, render_registry(kept))
    return next(k for _, k in entries if k.key_id == key_id)


def update_key_limits(path: Path, key_id: str, *, rpm: int | None, tpm: int | None) -> ApiKey:
    """Set a key's requests and tokens per minute (None: no limit); :class:`KeyRegistryError`
    for an unknown key or a bad value, with nothing written. Running instances apply it within
    about a second, like a revocation."""
    rpm, tpm = rate_limit(rpm, "rpm"), rate_limit(tpm, "tpm")
    path = Path(path)
    with write_lock(path):
        entries = _current(path)
        found = [k for _, k in entries if k.key_id == key_id]
        if not found:
            raise KeyRegistryError(f"no key {key_id!r} in {path} (see `tokenaudit keys list`)")
        updated = dataclasses.replace(found[0], rpm=rpm, tpm=tpm)
        replace_file(path, render_registry([(d, updated if k.key_id == key_id else k) for d, k in entries]))
    return updated


# --- the admin key the CLI presents to the usage API -------------------------------------------
# In embedded mode the CLI cannot open the chDB store the sink holds, so it asks the sink's
# usage API, which wants a Bearer key from the registry. ``TOKENAUDIT_API_KEY`` names one
# explicitly; otherwise the CLI reads ``<data_dir>/admin.key``, which `up` writes once (mode
# 0600) with :func:`ensure_admin_key`.
ADMIN_CLIENT_ID = "tokenaudit-admin"


def registry_path(settings) -> Path:
    """The API-key registry file: TOKENAUDIT_API_KEYS_FILE, else <data_dir>/api_keys.toml."""
    return Path(settings.default_api_keys_file)


def admin_key_path(settings) -> Path:
    return settings.data_dir / "admin.key"


def read_api_key(settings) -> str | None:
    """TOKENAUDIT_API_KEY, else the contents of <data_dir>/admin.key, else None."""
    if settings.api_key:
        return settings.api_key
    return read_file_key(admin_key_path(settings))


def ensure_admin_key(settings) -> str:
    """Return a working admin key, creating one (registry entry + admin.key file) if needed.

    Idempotent: an existing admin.key whose key the registry knows as an admin is reused,
    so running `up` twice does not pile up keys.
    """
    registry = registry_path(settings)
    key_file = admin_key_path(settings)
    existing = read_file_key(key_file)
    if existing and registry.exists():
        try:
            found = KeyRegistry.load(registry).lookup(existing)
        except KeyRegistryError:
            found = None
        if found is not None and found.is_admin:
            return existing
    raw = add_key(registry, ADMIN_CLIENT_ID, department="", role="admin")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_file.with_name(key_file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(raw + "\n")
    os.replace(tmp, key_file)  # atomic: a reader sees the old key or the new one, never half
    return raw


def read_file_key(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
