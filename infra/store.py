"""The project's one handle on ClickHouse: parameterised queries and batched inserts.

Wraps a clickhouse-connect client (chDB embedded or an http(s) server) with a lock, because
in embedded mode the sink's insert loop and the usage API's queries share one in-process
engine from different threads.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from clickhouse_connect.driver.client import Client

from tokenaudit.infra.clickhouse import connect
from tokenaudit.infra.migrate import migrate, ttl_days_from_settings

if TYPE_CHECKING:
    import pyarrow as pa


class Store:
    def __init__(self, client: Client, database: str):
        self.client = client
        self.database = database
        self._lock = threading.RLock()
        self._arrow_types: dict[str, dict[str, pa.DataType]] = {}

    @classmethod
    def open(cls, dsn: str, database: str) -> Store:
        return cls(connect(dsn), database)

    @classmethod
    def from_settings(cls, settings, migrate_schema: bool = True) -> Store:
        store = cls.open(settings.effective_clickhouse_dsn, settings.clickhouse_database)
        if migrate_schema:
            store.migrate(ttl_days_from_settings(settings))
        return store

    def migrate(self, ttl_days: dict[str, int] | None = None) -> list[int]:
        with self._lock:
            return migrate(self.client, self.database, ttl_days)

    def table(self, name: str) -> str:
        return f"{self.database}.{name}"

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a SELECT; ``{db}`` in the SQL is the database, values go only through parameters."""
        with self._lock:
            result = self.client.query(sql.replace("{db}", self.database), parameters=parameters or {})
        names = result.column_names
        return [dict(zip(names, row)) for row in result.result_rows]

    def command(self, sql: str, parameters: dict[str, Any] | None = None):
        with self._lock:
            return self.client.command(sql.replace("{db}", self.database), parameters=parameters or {})

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> int:
        if not rows:
            return 0
        with self._lock:
            self.client.insert(self.table(table), list(rows), column_names=list(columns))
        return len(rows)

    def arrow_types(self, table: str) -> dict[str, pa.DataType]:
        """The Arrow type of each column of ``table``, read from the table (once per store)."""
        types = self._arrow_types.get(table)
        if types is None:
            # imported here: only the sink's ledger inserts as Arrow; the CLI's commands start without it
            from tokenaudit.infra.arrow_types import arrow_type

            found = self.query(
                "SELECT name, type FROM system.columns WHERE database = {d:String} AND table = {t:String} "
                "AND default_kind NOT IN ('ALIAS', 'MATERIALIZED')",  # not written by an insert
                {"d": self.database, "t": table},
            )
            types = self._arrow_types[table] = {c["name"]: arrow_type(c["type"]) for c in found}
        return types

    def insert_arrow(self, table: str, data: pa.Table, settings: Mapping[str, Any] | None = None) -> int:
        """Insert an Arrow table (columns by name): ClickHouse parses it, no per-value Python work."""
        if not data.num_rows:
            return 0
        with self._lock:
            self.client.insert_arrow(self.table(table), data, settings=dict(settings or {}))
        return int(data.num_rows)

    def close(self) -> None:
        with self._lock:
            self.client.close()
