"""The ClickHouse sink: consume rollups, sampled records, anomalies and (for the ledger) the
token-usage events themselves; batch; insert; commit.

The flush is a numbered protocol (batch, deduplicate, insert, commit):

1. consume into a batch, deduplicated by key (highest rollup version wins); ledger rows, each
   event id once, count against a larger bound of their own (``sink_ledger_batch_rows``) and are
   inserted as one Arrow table (:mod:`tokenaudit.sinks.ledger_batch` says why);
2. insert each table's rows, then merge the late deltas in bulk (one query for the stored
   rows they belong to, one insert of the merged rows): a delta is skipped when its delta id
   is in the row's ``late_ids`` (replayed) or its event id in the row's ``event_ids`` (a copy
   of an event the row counts);
3. a batch ClickHouse refuses as data (a value out of range for its column, a violated
   constraint) is split in halves until the refused rows are isolated: they go to
   ``rejected_rows`` with the reason, the rest is stored; a store that is down (connection
   errors, anything not recognised as a data error) is retried whole with exponential backoff,
   which a stop request ends within the backoff's sleep;
4. commit offsets only after everything was stored. A stopping sink tries its last batch for
   at most ``sink_shutdown_seconds``, and otherwise exits without committing it.

So a crash replays at most the last batch, and a replayed row changes no query result (every
table is a ReplacingMergeTree on its natural key; rollups carry a version that only grows).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    sleep_using_event,
    stop_after_delay,
    stop_any,
    stop_when_event_set,
    wait_exponential_jitter,
)

from tokenaudit.infra.kafka_clients import kafka_config, producer_config
from tokenaudit.infra.store import Store
from tokenaudit.schemas import ANOMALY, EVENT, ROLLUP, SAMPLED, AvroDecodeError
from tokenaudit.schemas.compiled import Decoder, compile_decoder
from tokenaudit.schemas.event_ids import id_bytes
from tokenaudit.schemas.validation import event_problem
from tokenaudit.sinks import rows as R
from tokenaudit.sinks.ledger import LedgerRows, ip_policy, ip_secret
from tokenaudit.sinks.ledger_batch import LedgerBatch, Row, arrow_table, record_of
from tokenaudit.sinks.rejected import is_data_error, rejected_row

if TYPE_CHECKING:
    from tenacity.stop import stop_base

    from tokenaudit.settings import Settings

#: a table's natural key, as the column getters of sinks/rows.py return it
RowKey = tuple[Any, ...]

log = logging.getLogger("tokenaudit.sink")
INF = float("inf")


#: the ledger's insert: its batch holds each event id once, so ClickHouse's insert-time
#: deduplication (of a ReplacingMergeTree block) finds nothing to collapse, and skipping it
#: halves the store's cost per row (bench/bench_ledger.py)
LEDGER_INSERT_SETTINGS = {"optimize_on_insert": 0}


def _same(record: Any) -> Any:
    return record


@dataclass
class SinkCounters:
    """A counter per step of the flush protocol (exported on the sink's /metrics)."""

    # 1. batch
    messages: int = 0
    undecodable: int = 0
    # 2. deduplicate: records a later one of the same key replaced within a batch
    batch_duplicates: int = 0
    # 3. insert (and isolate the rows ClickHouse refuses)
    inserted_rollups: int = 0
    inserted_sampled: int = 0
    inserted_anomalies: int = 0
    inserted_requests: int = 0  # ledger rows (usage_requests)
    ledger_invalid: int = 0  # events the worker dead-letters: no ledger row
    rejected_rows: int = 0
    deltas_merged: int = 0
    deltas_replayed: int = 0
    deltas_duplicate: int = 0
    insert_errors: int = 0
    # 4. commit
    batches: int = 0  # batches stored and committed (or with nothing left to commit)
    commits_skipped: int = 0  # commit refused (a rebalance in flight): the rows are idempotent


@dataclass
class Batch:
    rollups: dict[RowKey, R.Record] = field(default_factory=dict)
    sampled: dict[RowKey, R.Record] = field(default_factory=dict)
    anomalies: dict[RowKey, R.Record] = field(default_factory=dict)
    deltas: list[R.Record] = field(default_factory=list)
    requests: LedgerBatch = field(default_factory=LedgerBatch)  # ledger rows, each event_id once
    messages: int = 0
    started: float = 0.0

    def rows(self) -> int:
        """Rows of every table but the ledger, whose batches are larger (``sink_ledger_batch_rows``)."""
        return len(self.rollups) + len(self.sampled) + len(self.anomalies) + len(self.deltas)


class Sink:
    """``consumer`` (of the output topics) and ``dlq_producer`` are confluent-kafka clients,
    made from the settings unless given (tests hand in-memory ones); ``store``: where rows go."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        group_id: str | None = None,
        *,
        consumer: Consumer | None = None,
        dlq_producer: Producer | None = None,
    ) -> None:
        self.s = settings
        self.store = store
        self.counters = SinkCounters()
        self.topics = {
            settings.topic_rollups: ROLLUP,
            settings.topic_sampled: SAMPLED,
            settings.topic_anomalies: ANOMALY,
        }
        # Generated decoders with timestamps as int epoch ms, which clickhouse-connect writes
        # to DateTime64(3) columns as they are (no datetime objects made and taken apart per
        # row): ~5x less CPU per record than fastavro with datetimes, which matters when the
        # sink shares the worker's host.
        self._decoders: dict[str, Decoder] = {}
        for name in (ROLLUP, SAMPLED, ANOMALY, EVENT):
            decoder = compile_decoder(name)
            if decoder is None:
                raise AssertionError("the output schemas are flat by contract")
            self._decoders[name] = decoder
        self.ledger: LedgerRows | None = None
        if settings.ledger:  # the ledger: the token-usage topic too (sinks/ledger.py says why here)
            self.topics[settings.topic_usage] = EVENT
            secret = (
                ip_secret(settings.ledger_client_ip_secret, settings.data_dir)
                if settings.ledger_client_ip == "hashed"
                else b""
            )
            self.ledger = LedgerRows(ip_policy(settings.ledger_client_ip, secret))
        self._max_tokens = settings.max_tokens_per_event
        self._valid_ids: set[tuple[Any, ...]] = set()  # identifier combinations event_problem() passed
        self.consumer = (
            consumer
            if consumer is not None
            else Consumer(
                kafka_config(
                    settings,
                    {
                        "group.id": group_id or settings.sink_group_id,
                        "enable.auto.commit": False,
                        "auto.offset.reset": "earliest",
                        "enable.partition.eof": False,
                    },
                )
            )
        )
        self._dlq: Producer | None = dlq_producer  # made on the first dead letter otherwise
        self.batch = Batch()
        self.ready = threading.Event()
        self._stop: threading.Event | None = None
        # clickhouse-connect logs a traceback for every row it cannot encode before raising; the
        # split below meets each bad row several times and logs it itself, once, when isolated
        logging.getLogger("clickhouse_connect.driver.transform").setLevel(logging.CRITICAL)

    # --- loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; then store the batch (for at most
        ``sink_shutdown_seconds`` while the store is down), commit what was stored and close."""
        self._stop = stop
        self.consumer.subscribe(list(self.topics), on_revoke=self._on_revoke)
        self.ready.set()
        try:
            while not stop.is_set():
                self.poll(timeout=0.2, stop=stop)
            if not self.flush(stop=None, within=self.s.sink_shutdown_seconds):
                log.warning(
                    "stopping with %d messages not stored (ClickHouse unreachable): not committed, "
                    "they are read again at the next start",
                    self.batch.messages,
                )
        finally:
            self.consumer.close()
            if self._dlq is not None:
                self._dlq.flush(10)

    def poll(self, timeout: float = 0.2, stop: threading.Event | None = None) -> None:
        msgs = self.consumer.consume(num_messages=min(self.s.sink_batch_rows, 10_000), timeout=timeout)
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            self._add(msg)
        b = self.batch
        if b.messages and (
            b.rows() >= self.s.sink_batch_rows
            or len(b.requests) >= self.s.sink_ledger_batch_rows
            or time.monotonic() - b.started >= self.s.sink_batch_seconds
        ):
            self.flush(stop)

    # --- the flush protocol: 1. batch, 2. deduplicate, 3. insert, 4. commit --------------------
    def _add(self, msg: Message) -> None:
        """1. Batch a consumed record; 2. deduplicate by key (the highest rollup version wins)."""
        b = self.batch
        if not b.messages:
            b.started = time.monotonic()
        b.messages += 1
        self.counters.messages += 1
        name = self.topics[msg.topic() or ""]  # a consumed record names its topic
        value = msg.value()
        try:
            if value is None:
                raise AvroDecodeError("a record without a value (a tombstone)")
            r = self._decoders[name](value)
        except AvroDecodeError as exc:
            if name == EVENT:  # the worker dead-letters it: once on the DLQ, not twice
                self.counters.ledger_invalid += 1
                return
            self._dead(msg, f"sink undecodable: {exc}")
            return
        if name == EVENT:
            self._add_request(r)
            return
        if name == ROLLUP:
            if r.get("delta_id"):
                b.deltas.append(r)
                return
            key = R.rollup_key(r)
            cur = b.rollups.get(key)
            if cur is not None:
                self.counters.batch_duplicates += 1
            if cur is None or cur["version"] <= r["version"]:
                b.rollups[key] = r
        else:
            keyed: dict[RowKey, R.Record]
            keyed, key = (b.sampled, R.sampled_key(r)) if name == SAMPLED else (b.anomalies, R.anomaly_key(r))
            if key in keyed:
                self.counters.batch_duplicates += 1
            keyed[key] = r

    def _add_request(self, ev: R.Record) -> None:
        """A ledger row, once per event_id within the batch (and by the table across batches)."""
        ledger = self.ledger
        if ledger is None:
            return
        # event_problem()'s checks, the identifiers' only for a combination not seen valid
        # before (the per-event path: the full check is most of the sink's time per event)
        ids = (ev["client_id"], ev["department"], ev["api_key_id"], ev["model"])
        max_tokens = self._max_tokens
        if not (
            ids in self._valid_ids
            and 0 <= ev["input_tokens"] <= max_tokens
            and 0 <= ev["output_tokens"] <= max_tokens
            and 0 <= ev["total_tokens"] <= max_tokens
            and 100 <= ev["status_code"] <= 599
            and 0.0 <= ev["latency_ms"] < INF
            and (ev["event_id"] is None or id_bytes(ev["event_id"]) is not None)
        ):
            if event_problem(ev, max_tokens) is not None:
                self.counters.ledger_invalid += 1
                return
            if len(self._valid_ids) >= 100_000:
                self._valid_ids.clear()
            self._valid_ids.add(ids)
        if not self.batch.requests.add(ev, ledger.event_id(ev)):
            self.counters.batch_duplicates += 1

    def _dead(self, msg: Message, reason: str) -> None:
        self.counters.undecodable += 1
        log.warning("%s (%s[%d]@%d)", reason, msg.topic(), msg.partition(), msg.offset())
        if self._dlq is None:
            self._dlq = Producer(producer_config(self.s))
        self._dlq.produce(
            self.s.topic_dlq,
            key=msg.key(),
            value=msg.value(),
            headers=[
                ("reason", reason[:500].encode()),
                ("source_topic", (msg.topic() or "").encode()),
                ("source_partition", str(msg.partition()).encode()),
                ("source_offset", str(msg.offset()).encode()),
            ],
        )
        self._dlq.poll(0)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self.flush(stop=self._stop, within=self.s.sink_shutdown_seconds):
            # Not stored, so not committed: whoever owns the partitions next reads them again
            # (a re-assigned partition restarts at its committed offset).
            log.warning("partitions revoked with %d messages not stored: left to be read again", self.batch.messages)
            self.batch = Batch()

    # --- writes ----------------------------------------------------------------------------
    def flush(self, stop: threading.Event | None = None, within: float | None = None) -> bool:
        """3. Insert the batch, then 4. commit. While the store is down the insert is retried
        with backoff until it works, ``stop`` is set or ``within`` seconds have passed; then
        False (nothing committed)."""
        b = self.batch
        if not b.messages:
            return True
        ends: list[stop_base] = [stop_when_event_set(stop)] if stop is not None else []
        if within is not None:
            ends.append(stop_after_delay(within))
        retrying = Retrying(
            retry=retry_if_exception(lambda exc: True),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            stop=stop_any(*ends) if ends else (lambda state: False),
            sleep=sleep_using_event(stop) if stop is not None else time.sleep,
            before_sleep=self._insert_failed,
            reraise=True,
        )
        try:
            retrying(self._insert, b)
        except Exception as exc:  # gave up (stopping or out of time): keep the offsets
            self.counters.insert_errors += 1
            log.error("insert failed, giving up for now: %s", str(exc).splitlines()[0][:300] if str(exc) else repr(exc))
            return False
        self._commit()
        self.batch = Batch()
        return True

    def _commit(self) -> None:
        """4. Commit the consumed offsets: only ever after everything before them is stored."""
        try:
            self.consumer.commit(asynchronous=False)
        except Exception as exc:  # nothing to commit, or a rebalance in flight: the rows are idempotent
            self.counters.commits_skipped += 1
            log.info("commit skipped: %s", exc)
        self.counters.batches += 1

    def _insert_failed(self, retry_state: RetryCallState) -> None:
        self.counters.insert_errors += 1
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        text = str(exc).splitlines()[0][:300] if str(exc) else repr(exc)
        log.error("insert failed (store unavailable?), retrying in %.1f s: %s", retry_state.upcoming_sleep, text)

    def _insert(self, b: Batch) -> None:
        """3. Each table's rows, then the deltas; a part that was stored is not stored again
        when a later part fails and the batch is retried."""
        if b.rollups:
            self.counters.inserted_rollups += self._store(
                "usage_rollup", list(b.rollups.values()), self._rows("usage_rollup", R.ROLLUP_COLUMNS, R.rollup_row)
            )
            b.rollups = {}
        if b.sampled:
            self.counters.inserted_sampled += self._store(
                "usage_sampled", list(b.sampled.values()), self._rows("usage_sampled", R.SAMPLED_COLUMNS, R.sampled_row)
            )
            b.sampled = {}
        if b.anomalies:
            self.counters.inserted_anomalies += self._store(
                "anomalies", list(b.anomalies.values()), self._rows("anomalies", R.ANOMALY_COLUMNS, R.anomaly_row)
            )
            b.anomalies = {}
        if b.deltas:
            self._merge_deltas(b.deltas)
            b.deltas = []
        if b.requests and self.ledger is not None:
            self.counters.inserted_requests += self._store(
                "usage_requests", b.requests.rows, self._ledger_writer(self.ledger), record_of
            )
            b.requests = LedgerBatch()

    def _rows(self, table: str, columns: Sequence[str], to_row: Callable[[Any], Any]) -> Callable[[Sequence[Any]], Any]:
        """A writer of records as rows through clickhouse-connect (the tables with few rows)."""
        return lambda records: self.store.insert(table, [to_row(r) for r in records], columns)

    def _ledger_writer(self, ledger: LedgerRows) -> Callable[[Sequence[Row]], Any]:
        """A writer of ledger rows as one Arrow table (sinks/ledger_batch.py says why)."""
        types = self.store.arrow_types("usage_requests")  # outside the split: not a data error
        return lambda rows: self.store.insert_arrow(
            "usage_requests", arrow_table(rows, types, ledger.client_ip), LEDGER_INSERT_SETTINGS
        )

    def _store(
        self,
        table: str,
        records: Sequence[Any],
        write: Callable[[Sequence[Any]], Any],
        as_record: Callable[[Any], R.Record] = _same,
    ) -> int:
        """Write ``records``; when ClickHouse (or the conversion for it) refuses them as data,
        split until the refused rows are isolated (into rejected_rows, as ``as_record`` shows
        them) and store the rest. Returns the rows stored. Other errors (the store is down)
        propagate: the caller retries the batch whole."""
        try:
            write(records)
            return len(records)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(records) == 1:
                self._reject(table, as_record(records[0]), exc)
                return 0
        mid = len(records) // 2
        return self._store(table, records[:mid], write, as_record) + self._store(table, records[mid:], write, as_record)

    def _reject(self, table: str, record: R.Record, exc: BaseException) -> None:
        row = rejected_row(table, record, exc)
        self.store.insert("rejected_rows", [row], R.REJECTED_COLUMNS)
        self.counters.rejected_rows += 1
        log.error("%s refused a row, kept in rejected_rows: %s", table, row[1][:300])

    def _merge_deltas(self, deltas: list[R.Record]) -> None:
        """Late deltas merged into their stored rows: one query for every row they touch, the
        merge in memory (deltas of one window in order), one insert of the merged rows."""
        keys = list({R.rollup_key(d) for d in deltas})
        starts = [k[4] for k in keys]
        # Every stored version of those rows, newest picked here, rather than FINAL: FINAL merges
        # every part that overlaps them at query time (the table takes a part per sink batch),
        # which made this query most of the sink's time; the primary key finds the few versions
        # (window range and clients first: they lead the sorting key).
        found = self.store.query(
            "SELECT *, toUnixTimestamp64Milli(window_start) AS ws_ms FROM {db}.usage_rollup "
            "WHERE window_start BETWEEN fromUnixTimestamp64Milli({lo:Int64}, 'UTC') "
            "AND fromUnixTimestamp64Milli({hi:Int64}, 'UTC') AND client_id IN {clients:Array(String)} "
            "AND (client_id, department, api_key_id, model, toUnixTimestamp64Milli(window_start)) "
            "IN {keys:Array(Tuple(String, String, String, String, Int64))}",
            {"lo": min(starts), "hi": max(starts), "clients": sorted({k[0] for k in keys}), "keys": keys},
        )
        rows: dict[RowKey, R.Record | None] = {}
        for r in found:  # what FINAL keeps: the highest version, the last written among equals
            key = (r["client_id"], r["department"], r["api_key_id"], r["model"], r["ws_ms"])
            cur = rows.get(key)
            if cur is None or (r["version"], r["emitted_at"]) > (cur["version"], cur["emitted_at"]):
                rows[key] = r
        changed: dict[RowKey, R.Record] = {}
        for d in deltas:
            key = R.rollup_key(d)
            current = rows.get(key)
            why = R.delta_skip(current, d)
            if why == "replayed":
                self.counters.deltas_replayed += 1
            elif why == "duplicate":
                self.counters.deltas_duplicate += 1
            else:
                rows[key] = changed[key] = R.merge_delta(current, d)
                self.counters.deltas_merged += 1
        if changed:
            self._store(
                "usage_rollup",
                list(changed.values()),
                self._rows("usage_rollup", R.MERGED_ROLLUP_COLUMNS, R.merged_rollup_row),
            )
