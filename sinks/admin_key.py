"""The key the CLI presents to the usage API, and the admin key `up` creates for it.

In embedded mode the CLI cannot open the chDB store the sink holds, so it asks the sink's
usage API, which wants a Bearer key from the API-key registry. ``TOKENAUDIT_API_KEY`` names
one explicitly; otherwise the CLI reads ``<data_dir>/admin.key``, which `up` writes once
(mode 0600) with :func:`ensure_admin_key`.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    from tokenaudit.inference.api_keys import KeyRegistry, KeyRegistryError, add_key

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
