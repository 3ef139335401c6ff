"""Open a clickhouse-connect client from a DSN: ``chdb:///path`` (embedded) or ``http(s)://``.

Both go through clickhouse-connect so every query and insert is the same code in embedded
and server mode. chDB lets one process own a store directory at a time; that case, a
malformed DSN and an unreachable server each raise :class:`ClickHouseError` with one line.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError as _DriverError

from tokenaudit.errors import ClickHouseError

_SCHEMES = ("chdb", "http", "https", "clickhouse", "clickhouses")


def validate_dsn(dsn: str) -> str:
    parsed = urlparse(dsn)
    if parsed.scheme not in _SCHEMES:
        raise ClickHouseError(
            f"TOKENAUDIT_CLICKHOUSE_DSN: unsupported scheme in {redact(dsn)!r}; "
            "use chdb:///path/to/store or http(s)://user:password@host:port"
        )
    if parsed.scheme == "chdb":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ClickHouseError(
                f"TOKENAUDIT_CLICKHOUSE_DSN: a chdb DSN needs an absolute path (chdb:///abs/path), got {dsn!r}"
            )
    elif not parsed.hostname:
        raise ClickHouseError(f"TOKENAUDIT_CLICKHOUSE_DSN: no host in {redact(dsn)!r}")
    else:
        try:
            _ = parsed.port  # urllib parses the port lazily: reading it is the check
        except ValueError:
            raise ClickHouseError(f"TOKENAUDIT_CLICKHOUSE_DSN: malformed port in {redact(dsn)!r}") from None
    return dsn


def redact(dsn: str) -> str:
    return re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", dsn)


def chdb_path(dsn: str) -> Path | None:
    parsed = urlparse(dsn)
    return Path(parsed.path) if parsed.scheme == "chdb" else None


def connect(dsn: str, **kwargs) -> Client:
    """A client for the DSN, checked with a trivial query."""
    validate_dsn(dsn)
    store = chdb_path(dsn)
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    try:
        client = clickhouse_connect.get_client(dsn=dsn, **kwargs)
        client.command("SELECT 1")
        return client
    except _DriverError as exc:
        text = str(exc)
        if store is not None and ("Unable to open the chdb engine" in text or "Cannot lock file" in text):
            owner = _store_owner(store)
            raise ClickHouseError(
                f"chDB store {store} is already open by another process{owner}: only one process may open "
                "an embedded store; query through that process (the usage API) or stop it"
            ) from None
        raise ClickHouseError(f"cannot reach ClickHouse at {redact(dsn)}: {text.splitlines()[0][:300]}") from None
    except OSError as exc:
        raise ClickHouseError(f"cannot reach ClickHouse at {redact(dsn)}: {exc}") from None


def _store_owner(store: Path) -> str:
    try:
        first = (store / "status").read_text().splitlines()[0]
        return f" ({first.strip().lower()})" if first.startswith("PID") else ""
    except (OSError, IndexError):
        return ""
