"""`tokenaudit verify`: does ClickHouse hold every event that reached the usage topic?

The usage topic is the source of truth while it retains the events. Per (client, model,
hour) the topic side counts *distinct* events (by :func:`~tokenaudit.schemas.event_ids.event_id_of`,
so producer retries and spool replays count once) and sums their tokens; the store side sums
``usage_rollup`` (read with FINAL; department and api key summed over) and, where the ledger
table ``usage_requests`` exists, counts its distinct event ids. Every difference is reported.

Both sides bucket an event by the hour of its *window start* (``ts - ts % window``), exactly as
the rollups are bucketed; bucketing by the event's own hour would show false drift for windows
that straddle an hour (window lengths that do not divide 3600 s).

What is left out, and said so:

* windows that are not settled yet (window + grace + idle timeout + the sink's batch, see
  :func:`~tokenaudit.reports.queries.settled_until`): the check runs up to that instant;
* buckets holding an event that *arrived* (Kafka timestamp) within that same delay, i.e. a
  late event the stream may still be applying: reported as pending, not as drift;
* records the worker dead-letters (undecodable or invalid): counted and reported;
* the part of the range the topic no longer retains: the check starts at the first full hour
  the topic still holds.

In embedded mode only the sink may open the store, so the store side comes from the sink's
usage API (``GET /v1/admin/verify``, admin keys only); the topic is read by the caller.
Memory: one 64-bit hash per distinct event in range (about 70 bytes each).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from tokenaudit.errors import VerifyError

if TYPE_CHECKING:
    from tokenaudit.infra.store import Store
    from tokenaudit.settings import Settings

HOUR_MS = 3_600_000
FIELDS = ("requests", "input_tokens", "output_tokens", "total_tokens")
# How far a Kafka timestamp may trail an event's own time (both stamped on the producing
# host; this covers a host clock that stepped back and the time between request and produce).
SKEW_MS = 60_000
API_PATH = "admin/verify"

Key = tuple[str, str, int]  # client_id, model, hour start (epoch ms)


# --- the topic side ----------------------------------------------------------------------------
@dataclass
class TopicScan:
    totals: dict[Key, list[int]] = field(default_factory=dict)  # FIELDS, in order
    pending: set[Key] = field(default_factory=set)
    records: int = 0
    duplicates: int = 0
    undecodable: int = 0
    invalid: int = 0
    retained_from_ms: int | None = None  # set when retention cut into the range


def scan_topic(
    settings: Settings, since_ms: int, until_ms: int, arrived_before_ms: int, timeout: float = 30.0
) -> TopicScan:
    """Distinct events with a window start in [since_ms, until_ms) on the usage topic, per bucket."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    from tokenaudit.infra.kafka_clients import admin_config, check_access, kafka_config

    check_access(admin_config(settings), timeout)  # a refused credential fails here, clearly and fast
    topic = settings.topic_usage
    consumer = Consumer(
        kafka_config(
            settings,
            {
                "group.id": f"tokenaudit-verify-{uuid.uuid4().hex[:12]}",  # assign() only: never joins or commits
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                "log_level": 3,
            },
        )
    )
    scan = TopicScan()
    counter = _EventCounter(
        scan, settings.window_seconds * 1000, since_ms, until_ms, arrived_before_ms, settings.max_tokens_per_event
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise VerifyError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap}")
        wanted = [TopicPartition(topic, p, since_ms - SKEW_MS) for p in sorted(meta.partitions)]
        ends: dict[int, int] = {}
        cut: set[int] = set()
        assignment: list[TopicPartition] = []
        for tp in consumer.offsets_for_times(wanted, timeout=timeout):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=timeout)
            start = tp.offset if tp.offset >= 0 else high
            if start < high:
                assignment.append(TopicPartition(topic, tp.partition, start))
                ends[tp.partition] = high
                if start == low and low > 0:  # retention deleted records that may have been in range
                    cut.add(tp.partition)
        consumer.assign(assignment)
        idle_since = time.monotonic()
        while ends:
            msgs = consumer.consume(10_000, timeout=0.5)
            if not msgs and time.monotonic() - idle_since > timeout:
                raise VerifyError(f"reading {topic!r} stalled with partitions {sorted(ends)} unfinished")
            for msg in msgs:
                idle_since = time.monotonic()
                p = msg.partition()
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and p is not None:
                        ends.pop(p, None)
                        continue
                    raise VerifyError(f"reading {topic!r}: {err.str()}")
                offset = msg.offset()
                if p is None or offset is None:  # a record read from a partition carries both
                    continue
                if p not in ends or offset >= ends[p]:
                    continue  # arrived after the scan began: the next verify sees it
                if offset + 1 >= ends[p]:
                    ends.pop(p)
                arrived = msg.timestamp()[1]
                if p in cut:
                    cut.discard(p)
                    scan.retained_from_ms = max(scan.retained_from_ms or 0, arrived + SKEW_MS)
                counter.add(msg.value(), arrived)
    finally:
        consumer.close()
    return scan


class _EventCounter:
    """Adds one usage-topic record to a scan: decoded, validated and deduplicated as the worker does."""

    def __init__(
        self,
        scan: TopicScan,
        window_ms: int,
        since_ms: int,
        until_ms: int,
        arrived_before_ms: int,
        max_tokens: int = 10_000_000,
    ) -> None:
        from tokenaudit.schemas import EVENT, AvroDecodeError
        from tokenaudit.schemas.compiled import compile_decoder
        from tokenaudit.schemas.event_ids import event_id_of, id_hash64
        from tokenaudit.schemas.validation import event_problem

        self.scan, self.window_ms = scan, window_ms
        self.since_ms, self.until_ms, self.arrived_before_ms = since_ms, until_ms, arrived_before_ms
        decode = compile_decoder(EVENT)
        if decode is None:
            raise AssertionError("token_usage_event is a flat record by contract")
        self.decode: Callable[[bytes], dict[str, Any]] = decode
        self.decode_error = AvroDecodeError
        self.max_tokens = max_tokens
        self.event_problem = event_problem  # the worker's own rule, with its limit below
        self.event_id_of, self.id_hash64 = event_id_of, id_hash64
        self.seen: set[int] = set()

    def add(self, value: bytes | None, arrived_ms: int) -> None:
        scan = self.scan
        scan.records += 1
        if value is None:  # a tombstone is no event
            scan.undecodable += 1
            return
        try:
            ev = self.decode(value)
        except self.decode_error:
            scan.undecodable += 1
            return
        if self.event_problem(ev, self.max_tokens) is not None:  # the worker dead-letters it: it is not usage
            scan.invalid += 1
            return
        ts = ev["ts"]
        ws = ts - ts % self.window_ms
        if not self.since_ms <= ws < self.until_ms:
            return
        h = self.id_hash64(self.event_id_of(ev))
        if h in self.seen:
            scan.duplicates += 1
            return
        self.seen.add(h)
        key = (ev["client_id"], ev["model"], ws - ws % HOUR_MS)
        acc = scan.totals.get(key)
        if acc is None:
            acc = scan.totals[key] = [0, 0, 0, 0]
        acc[0] += 1
        acc[1] += ev["input_tokens"]
        acc[2] += ev["output_tokens"]
        acc[3] += ev["total_tokens"]
        if arrived_ms >= self.arrived_before_ms:
            scan.pending.add(key)


# --- the store side ----------------------------------------------------------------------------
def store_totals(
    store: Store, since_ms: int, until_ms: int, window_ms: int, ledger: bool = True
) -> list[dict[str, Any]]:
    """Rollup sums (and ledger event counts, where the ledger exists) per (client, model,
    hour of window start) for window starts in [since_ms, until_ms)."""
    bound = {"since_ms": since_ms, "until_ms": until_ms}
    rows = store.query(
        "SELECT client_id, model, intDiv(toUnixTimestamp64Milli(window_start), 3600000) * 3600000 AS hour_ms, "
        "sum(requests) AS requests, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
        "sum(total_tokens) AS total_tokens FROM {db}.usage_rollup FINAL "
        "WHERE window_start >= fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC') "
        "AND window_start < fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC') "
        "GROUP BY client_id, model, hour_ms SETTINGS prefer_column_name_to_alias = 1",
        bound,
    )
    out = {
        (r["client_id"], r["model"], int(r["hour_ms"])): {**r, "hour_ms": int(r["hour_ms"]), "events": None}
        for r in rows
    }
    if ledger and _has_ledger(store):  # TOKENAUDIT_LEDGER=off: the table may exist, unfed
        ledger_rows = store.query(
            "SELECT client_id, model, intDiv(ws, 3600000) * 3600000 AS hour_ms, uniqExact(hi, lo) AS events "
            "FROM (SELECT client_id, model, event_id_hi AS hi, event_id_lo AS lo, "
            "toUnixTimestamp64Milli(ts) AS t, t - t % {w:Int64} AS ws "
            "FROM {db}.usage_requests WHERE ts >= fromUnixTimestamp64Milli({since_ms:Int64} - {w:Int64}, 'UTC') "
            "AND ts < fromUnixTimestamp64Milli({until_ms:Int64} + {w:Int64}, 'UTC')) "
            "WHERE ws >= {since_ms:Int64} AND ws < {until_ms:Int64} GROUP BY client_id, model, hour_ms",
            {**bound, "w": window_ms},
        )
        for r in ledger_rows:
            key = (r["client_id"], r["model"], int(r["hour_ms"]))
            row = out.setdefault(
                key, {"client_id": key[0], "model": key[1], "hour_ms": key[2], **dict.fromkeys(FIELDS, 0)}
            )
            row["events"] = int(r["events"])
        for row in out.values():
            row["events"] = row["events"] or 0
    return sorted(out.values(), key=lambda r: (r["hour_ms"], r["client_id"], r["model"]))


def _has_ledger(store: Store) -> bool:
    found = store.query(
        "SELECT count() AS n FROM system.tables WHERE database = {d:String} AND name = 'usage_requests'",
        {"d": store.database},
    )
    return bool(found and found[0]["n"])


class DirectTotals:
    """The store side from a Store this process opened."""

    def __init__(self, store: Store, window_ms: int, ledger: bool = True) -> None:
        self.store, self.window_ms, self.ledger = store, window_ms, ledger

    def fetch(self, since_ms: int, until_ms: int) -> list[dict[str, Any]]:
        return store_totals(self.store, since_ms, until_ms, self.window_ms, self.ledger)


class EmbeddedTotals:
    """Embedded mode: the sink's admin route if a sink serves the store, else the (then free) store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def fetch(self, since_ms: int, until_ms: int) -> list[dict[str, Any]]:
        from tokenaudit.errors import UsageApiError, UsageApiUnreachable
        from tokenaudit.infra.keys import read_api_key
        from tokenaudit.reports.usage_client import ApiReports, usage_api_url

        key = read_api_key(self.settings)
        if key is not None:
            try:
                return ApiReports(usage_api_url(self.settings), key, timeout=600).fetch(
                    API_PATH, {"since_ms": str(since_ms), "until_ms": str(until_ms)}
                )
            except UsageApiUnreachable:
                pass
            except UsageApiError as exc:
                raise VerifyError(str(exc)) from None
        from tokenaudit.infra.clickhouse import ClickHouseError
        from tokenaudit.infra.store import Store

        try:
            store = Store.from_settings(self.settings, migrate_schema=False)
        except ClickHouseError as exc:
            raise VerifyError(f"the usage API did not answer and the store cannot be opened directly: {exc}") from None
        try:
            return store_totals(store, since_ms, until_ms, self.settings.window_seconds * 1000, self.settings.ledger)
        finally:
            store.close()


class Totals(Protocol):
    """The store side of a verify: rollup and ledger sums per bucket (see store_totals)."""

    def fetch(self, since_ms: int, until_ms: int) -> list[dict[str, Any]]: ...


def open_totals(settings: Settings) -> Totals:
    if settings.embedded_clickhouse:
        return EmbeddedTotals(settings)
    from tokenaudit.infra.store import Store

    return DirectTotals(
        Store.from_settings(settings, migrate_schema=False), settings.window_seconds * 1000, settings.ledger
    )


# --- reconciliation ----------------------------------------------------------------------------
@dataclass
class VerifyReport:
    since: datetime
    until: datetime
    checked_from: datetime
    checked_until: datetime
    settled_until: datetime
    settle_seconds: float = 0.0
    buckets: int = 0
    drift: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    ledger: bool = False
    scan: TopicScan | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.drift

    def as_json(self) -> dict[str, Any]:
        from tokenaudit.reports.queries import iso_utc

        s = self.scan or TopicScan()
        return {
            "ok": self.ok,
            "since": iso_utc(self.since),
            "until": iso_utc(self.until),
            "checked_from": iso_utc(self.checked_from),
            "checked_until": iso_utc(self.checked_until),
            "settled_until": iso_utc(self.settled_until),
            "settle_seconds": self.settle_seconds,
            "buckets": self.buckets,
            "ledger": self.ledger,
            "topic": {
                "records": s.records,
                "distinct_events": sum(t[0] for t in s.totals.values()),
                "duplicates": s.duplicates,
                "undecodable": s.undecodable,
                "invalid": s.invalid,
            },
            "drift": self.drift,
            "pending": self.pending,
            "notes": self.notes,
        }


def reconcile(
    scan: TopicScan, store_rows: list[dict[str, Any]], since_ms: int, ledger_from_ms: int = 0
) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]], bool]:
    """(buckets compared, drift rows, pending buckets, ledger present) for the buckets of the
    hours from the one holding ``since_ms`` on (both sides were already cut at the window
    start; a partial first hour is compared like any other). Ledger event counts are compared
    for the hours from ``ledger_from_ms`` on: older ones are past the ledger's retention."""
    since_ms -= since_ms % HOUR_MS
    from tokenaudit.reports.queries import iso_utc

    def hour(ms: int) -> str:
        return iso_utc(datetime.fromtimestamp(ms / 1000, UTC))

    stored = {(r["client_id"], r["model"], r["hour_ms"]): r for r in store_rows if r["hour_ms"] >= since_ms}
    ledger = any(r.get("events") is not None for r in store_rows)
    keys = sorted({k for k in scan.totals if k[2] >= since_ms} | set(stored), key=lambda k: (k[2], k[0], k[1]))
    drift: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    compared = 0
    for key in keys:
        if key in scan.pending:
            pending.append({"client_id": key[0], "model": key[1], "hour": hour(key[2])})
            continue
        compared += 1
        topic = dict(zip(FIELDS, scan.totals.get(key, (0, 0, 0, 0))))
        row = stored.get(key)
        store = {f: int(row[f]) for f in FIELDS} if row else dict.fromkeys(FIELDS, 0)
        if ledger and key[2] >= ledger_from_ms:
            topic["events"] = topic["requests"]
            store["events"] = int(row["events"] or 0) if row else 0
        if topic == store:
            continue
        if row is None:
            what = "missing in ClickHouse"
        elif key not in scan.totals:
            what = "in ClickHouse, not on the topic"
        else:
            what = "differs: " + ", ".join(f for f in topic if topic[f] != store[f])
        drift.append(
            {
                "client_id": key[0],
                "model": key[1],
                "hour": hour(key[2]),
                "what": what,
                "topic": topic,
                "clickhouse": store,
            }
        )
    return compared, drift, pending, ledger


def run_verify(
    settings: Settings,
    since: str,
    until: str | None,
    now: datetime | None = None,
    totals: Totals | None = None,
    timeout: float = 30.0,
) -> VerifyReport:
    """Reconcile [since, until) (report time forms: 24h, 7d, ISO) up to the settled instant."""
    from tokenaudit.reports.params import parse_time
    from tokenaudit.reports.queries import iso_utc, settle_seconds, settled_until

    now = now or datetime.now(UTC)
    start = parse_time(since, "since", now)
    end = parse_time(until, "until", now) if until else now
    if end <= start:
        raise VerifyError("until: must be after since")
    settled = settled_until(settings, now)
    from tokenaudit.infra.schema_registry import prepare

    prepare(settings)  # registry ids, so Confluent-framed events resolve
    report = VerifyReport(
        since=start,
        until=end,
        checked_from=start,
        checked_until=min(end, settled),
        settled_until=settled,
        settle_seconds=settle_seconds(settings),
    )
    if report.checked_until <= start:
        report.notes.append(
            f"nothing settled in range yet (windows settle {settle_seconds(settings):g}s after they start)"
        )
        return report
    since_ms, until_ms = _ms(start), _ms(report.checked_until)
    arrived_before = _ms(now) - int(settle_seconds(settings) * 1000)
    scan = scan_topic(settings, since_ms, until_ms, arrived_before, timeout)
    report.scan = scan
    from_ms = since_ms
    if scan.retained_from_ms is not None and scan.retained_from_ms > since_ms:
        from_ms = -(-scan.retained_from_ms // HOUR_MS) * HOUR_MS  # the first full hour still retained
        report.checked_from = datetime.fromtimestamp(from_ms / 1000, UTC)
        report.notes.append(
            "the usage topic no longer retains the start of the range: checked from "
            f"{report.checked_from.isoformat().replace('+00:00', 'Z')}"
        )
        if from_ms >= until_ms:
            return report
    rows = (totals or open_totals(settings)).fetch(from_ms, until_ms)
    ledger_from = ledger_retained_from_ms(settings, now)
    report.buckets, report.drift, report.pending, report.ledger = reconcile(scan, rows, from_ms, ledger_from)
    if report.ledger and ledger_from > from_ms:
        report.notes.append(
            f"ledger events compared from {iso_utc(datetime.fromtimestamp(ledger_from / 1000, UTC))} on "
            f"(TOKENAUDIT_TTL_REQUESTS_DAYS={settings.ttl_requests_days})"
        )
    if scan.undecodable or scan.invalid:
        report.notes.append(
            f"{scan.undecodable} undecodable and {scan.invalid} invalid records on the topic "
            "are dead-lettered by the worker and not counted"
        )
    return report


def ledger_retained_from_ms(settings: Settings, now: datetime) -> int:
    """The first hour whose ledger rows are surely still kept: a day inside the retention (rows
    near its edge go at ClickHouse's next merge, not at a set instant)."""
    days = settings.ttl_requests_days
    if days <= 0:
        return 0
    edge = _ms(now) - (days - 1) * 86_400_000
    return -(-edge // HOUR_MS) * HOUR_MS


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)
