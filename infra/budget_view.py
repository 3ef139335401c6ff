"""Every process's view of the budgets and of the stream's spend: the two compacted topics read
whole, from the beginning, and followed.

The CLI (`budgets list`), the worker (which budgets to alert on), the inference app (hard
budgets) and the usage API read budgets the same way, so a change made with `budgets set`
applies everywhere within seconds, without restarts. No consumer group: every process reads
every partition itself and commits nothing (a group would split the partitions between
processes, and each needs all of them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from tokenaudit.errors import AvroDecodeError
from tokenaudit.infra import kafka_clients
from tokenaudit.infra.topics import ensure_declared
from tokenaudit.schemas import BUDGET, SPEND, decode
from tokenaudit.schemas.budgets import Budget, BudgetSpend, parse_budget_key, period_bounds

log = logging.getLogger(__name__)

ScopeKey = tuple[str, str]  # (scope, scope_id)


@dataclass(frozen=True)
class Spent:
    """A scope's spend in one period, summed over the usage-topic partitions; ``offsets`` says,
    per partition, the last usage-topic offset included (for the inference app to know which of
    its own settled requests the stream has counted)."""

    period_start: int
    period_end: int
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    unpriced_tokens: int = 0
    events: int = 0
    offsets: tuple[tuple[int, int], ...] = ()

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class BudgetView:
    """The latest budget per scope and the latest spend per (scope, partition), kept current by a
    background thread. Thread-safe reads; :meth:`wait_caught_up` blocks until everything on the
    topics when it started was read."""

    def __init__(self, settings, poll_seconds: float = 0.2) -> None:
        self._settings = settings
        self._topics = (settings.topic_budgets, settings.topic_spend)
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._budgets: dict[ScopeKey, Budget] = {}
        self._spend: dict[ScopeKey, dict[int, BudgetSpend]] = {}  # scope -> partition -> latest record
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.undecodable = 0  # records on the topics this process could not read (logged)

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> BudgetView:
        self._thread = threading.Thread(target=self._run, name="budget-view", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def wait_caught_up(self, timeout: float = 15.0) -> bool:
        return self._caught_up.wait(timeout)

    def caught_up(self) -> bool:
        """Everything on the topics when the view started has been read."""
        return self._caught_up.is_set()

    # --- reads ----------------------------------------------------------------------------------
    def budgets(self) -> dict[ScopeKey, Budget]:
        with self._lock:
            return dict(self._budgets)

    def budget(self, scope: str, scope_id: str) -> Budget | None:
        with self._lock:
            return self._budgets.get((scope, scope_id))

    def spent(self, scope: str, scope_id: str, period: str, now_ms: int | None = None) -> Spent:
        """The scope's spend in the period holding ``now_ms`` (default: now), from the stream."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        start, end = period_bounds(now, period, self._settings.budget_period_seconds)
        with self._lock:
            rows = list(self._spend.get((scope, scope_id), {}).values())
        rows = [s for s in rows if s["period_start"] == start]
        return Spent(
            start,
            end,
            sum(s["input_tokens"] for s in rows),
            sum(s["output_tokens"] for s in rows),
            sum(s["cost"] for s in rows),
            sum(s["unpriced_tokens"] for s in rows),
            sum(s["events"] for s in rows),
            tuple(sorted((s["partition"], s["offset"]) for s in rows)),
        )

    # --- the follower ---------------------------------------------------------------------------
    def _run(self) -> None:
        consumer = Consumer(
            kafka_clients.kafka_config(
                self._settings,
                {
                    "group.id": "tokenaudit-budget-view",  # required by librdkafka; never joined or committed
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    # librdkafka's own lines off: with the broker down it logs a failed connect
                    # every few ms, for as long as the process waits. The state is reported by
                    # the view's readers instead (the API's 503, the publisher's broker-down log).
                    "log_level": 0,
                },
            )
        )
        try:
            pending = self._assign(consumer)
            while not self._stop.is_set():
                msg = consumer.poll(self._poll)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard((msg.topic(), msg.partition()))
                        if not pending:
                            self._caught_up.set()
                    else:
                        log.warning("budget view: %s", err.str())
                    continue
                self._apply(msg.topic() or "", msg.key(), msg.value())
        except Exception:  # the view must never take its process down; readers see stale data
            log.exception("budget view stopped")
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer) -> set[tuple[str, int]]:
        """Wait until both topics exist, for as long as it takes (broker down at start, topics
        not created yet), then follow them whole. Until then the view is not caught up: the
        inference app enforces nothing, the usage API answers 503."""
        next_ensure = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_ensure:  # as declared (compacted, one partition)
                next_ensure = time.monotonic() + 10
                try:
                    ensure_declared(self._settings, ("budgets", "spend"), timeout=10)
                except Exception as exc:  # the broker may be down now: try again in a while
                    log.info("budget view: could not ensure the budget topics now (%s)", exc)
            try:
                md = consumer.list_topics(timeout=5)
            except KafkaException:  # broker unreachable: retry rather than stop following for good
                self._stop.wait(0.5)
                continue
            parts = [
                TopicPartition(t, p, OFFSET_BEGINNING)
                for t in self._topics
                if t in md.topics and md.topics[t].error is None
                for p in md.topics[t].partitions
            ]
            if {tp.topic for tp in parts} == set(self._topics):
                consumer.assign(parts)
                return {(tp.topic, tp.partition) for tp in parts}
            self._stop.wait(0.5)
        return set()

    def _apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        try:
            if topic == self._topics[0]:
                scope_key = parse_budget_key(key)
                with self._lock:
                    if value is None:  # a tombstone: the budget was removed
                        self._budgets.pop(scope_key, None)
                    else:
                        self._budgets[scope_key] = decode(value, BUDGET)  # type: ignore[assignment]
            elif value is not None:
                spend: BudgetSpend = decode(value, SPEND)  # type: ignore[assignment]
                with self._lock:
                    by_partition = self._spend.setdefault((spend["scope"], spend["scope_id"]), {})
                    held = by_partition.get(spend["partition"])
                    # A worker that took a partition over after a crash may publish its restored,
                    # older count once: within a period a scope's spend never goes back.
                    if (
                        held is None
                        or held["period_start"] != spend["period_start"]
                        or held["offset"] <= spend["offset"]
                    ):
                        by_partition[spend["partition"]] = spend
        except (AvroDecodeError, UnicodeDecodeError) as exc:
            self.undecodable += 1
            log.warning("budget view: unreadable record on %s: %s", topic, exc)


def scopes_of(client_id: str, department: str) -> Iterable[ScopeKey]:
    """The budget scopes a request counts against."""
    if client_id:
        yield ("client", client_id)
    if department:
        yield ("department", department)
