"""Fire-and-forget, loss-free publishing of encoded events to Kafka.

The request path calls :meth:`EventPublisher.publish`, which only encodes and enqueues
(``Producer.produce`` is a memory enqueue in librdkafka) and never raises. Everything slow
happens on one background thread: serving delivery reports, spooling failures, replaying
the spool.

States: *direct* (events go to the producer queue) and *spooling* (the broker is down, a
delivery failed or the spool is not yet drained: new events are appended to the spool so they
stay behind older ones). The background thread probes the broker every ``retry_seconds`` while
the spool holds anything, replays segments oldest first, and returns to *direct* when it starts
on the last segment (under steady load new events would otherwise keep refilling the spool
and it would never be seen empty); those events may then reach Kafka a few milliseconds
before the last spooled ones, which event time makes harmless.

Replay uses a producer of its own with a delivery report per record (the direct path's producer
reports only failures, to keep callbacks off the request path) and writes each confirmation to
the segment's resume log, so a replay interrupted by the broker or by a crash sends only what
Kafka has not confirmed. A record Kafka refuses stays spooled and is retried (no loss); the rest
of its segment is delivered meanwhile. Copies remain possible (a delivery timeout after the
broker wrote the record): every event carries an ``event_id`` and the stream counts each once.

Every event ends up on the topic or counted in ``stats.dropped``: a full spool, the
unauthenticated share used up, a failed disk write, a record found corrupt or torn on disk.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Producer

from tokenaudit.inference.cloudevents import CloudEventHeaders
from tokenaudit.inference.identity import UNAUTHENTICATED
from tokenaudit.inference.publisher_stats import PublisherStats
from tokenaudit.inference.quiet_logs import RateLimitedLog, librdkafka_logger
from tokenaudit.inference.reported_delivery import AwaitedEvents, OnDelivered, ReplayBatch, ReportedProducer
from tokenaudit.inference.spool import Appended, Spool
from tokenaudit.inference.spool_format import Headers
from tokenaudit.schemas import EVENT, encode
from tokenaudit.schemas.compiled import compile_encoder
from tokenaudit.schemas.records import TokenUsageEvent

log = logging.getLogger(__name__)

ANY_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner chooses (by key)
STALL_SECONDS = 60.0  # the background thread's loop runs every 0.1 s; this long without it is a hang


class EventPublisher:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        spool_dir: Path,
        *,
        spool_max_bytes: int = 256 << 20,
        queue_max: int = 100_000,
        message_timeout_ms: int = 15_000,
        linger_ms: float = 100.0,
        compression: str = "lz4",
        retry_seconds: float = 2.0,
        partitions: int | None = None,
        unauthenticated_share: float = 0.1,
        client_config: dict | None = None,
        producer_factory: Callable[[dict], Producer] = Producer,
        confluent: bool = False,
        cloudevents_source: str | None = None,
    ):
        """``producer_factory(config)`` makes the confluent-kafka producers (the direct one and,
        while a spool is replayed, the replay one); tests hand an in-memory one. ``confluent``:
        frame events in the Confluent wire format (registry ids bound first), else single-object
        encoding. ``cloudevents_source``: add CloudEvents headers (``ce_source``) to each event."""
        self.topic = topic
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.retry_seconds = retry_seconds
        self.message_timeout_s = message_timeout_ms / 1000
        self.stats = PublisherStats()
        self._stats_lock = threading.Lock()
        self._log = RateLimitedLog(log)
        # byte-identical to schemas.encode (tested); ~5x faster on the hot path
        self._encode = compile_encoder(EVENT, confluent=confluent) or (
            lambda record: encode(EVENT, record, None, confluent)
        )
        self._cloudevents = CloudEventHeaders(cloudevents_source) if cloudevents_source else None
        self._headers_of = self._cloudevents.of_event if self._cloudevents is not None else None
        # first, so a spool directory held by another process stops us before any connection
        self.spool = Spool(
            spool_dir,
            spool_max_bytes,
            capped_key=UNAUTHENTICATED.encode(),
            capped_share=unauthenticated_share,
            on_loss=self._count_spool_loss,
        )
        # bootstrap and security from tokenaudit.infra.kafka_clients (plaintext bootstrap when not given)
        self._client_config = client_config or {"bootstrap.servers": bootstrap}
        self._config = {
            **self._client_config,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": compression,
            "linger.ms": linger_ms,
            "queue.buffering.max.messages": queue_max,
            "message.timeout.ms": message_timeout_ms,
            "error_cb": self._on_error,
            "logger": librdkafka_logger(),
        }
        try:
            self._new_producer = producer_factory
            self._producer = producer_factory(
                {
                    **self._config,
                    "on_delivery": self._on_delivery,
                    # Python callbacks only for failures: a callback per event would cost
                    # the event loop (GIL) several microseconds per request; successes are
                    # counted from the queue.
                    "delivery.report.only.error": True,
                }
            )
        except BaseException:
            self.spool.close()  # release the directory's lock
            raise
        self._replay_producer: Producer | None = None
        self._reported = ReportedProducer(producer_factory, self._config, topic, self._on_delivery)
        self._awaited = AwaitedEvents()  # events whose offset someone waits for, spooled ones too
        self._replay_fatal: str | None = None
        self._spool_lock = threading.Lock()
        self._spooling = not self.spool.empty()  # leftovers from a previous run: replay them first
        self._write_error: str | None = None
        self._fatal_error: str | None = None
        self._thread_error: str | None = None
        self._heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-publisher", daemon=True)
        self._next_probe = 0.0

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> EventPublisher:
        if self._spooling:
            log.info("spool holds %d bytes from a previous run; replaying when the broker answers", self.spool.bytes)
        self._heartbeat = time.monotonic()
        self._thread.start()
        return self

    @property
    def state(self) -> str:
        return "spooling" if self._spooling else "direct"

    @property
    def queue_depth(self) -> int:
        replay = self._replay_producer
        return len(self._producer) + len(self._reported) + (len(replay) if replay is not None else 0)

    def problem(self) -> str | None:
        """Why this publisher cannot do its work now (for /readyz), or None when it can."""
        if self._fatal_error:
            return f"kafka producer failed fatally: {self._fatal_error}"
        if self._thread.is_alive():
            stalled = time.monotonic() - self._heartbeat
            if stalled > STALL_SECONDS:
                return f"event publisher thread unresponsive for {stalled:.0f}s"
        elif self._thread.ident is not None and not self._stop.is_set():
            return f"event publisher thread died: {self._thread_error or 'unknown error'}"
        error = self._write_error
        if error is not None and self._spooling:
            return f"event spool unwritable ({error}); events are being dropped"
        return None

    def close(self, timeout: float = 10.0) -> None:
        """Flush within ``timeout``; whatever is still unsent is spooled for the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(1.0, self.retry_seconds + 3))
        remaining = self._producer.flush(timeout) if not self._spooling else len(self._producer)
        if remaining:
            # Purged messages come back through _on_delivery with an error and get spooled.
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(1.0)
            log.warning("shutdown: %d events not delivered within %.1fs were spooled", remaining, timeout)
        self._reported.close(timeout if not self._spooling else 0)
        if self._replay_producer is not None:  # unconfirmed records stay in their segment for the next start
            self._replay_producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._replay_producer.flush(0.5)
        self.spool.close()

    # --- hot path -------------------------------------------------------------------------
    def publish(self, event: TokenUsageEvent, on_delivered: OnDelivered | None = None) -> None:
        """Encode and enqueue one event; never blocks on the network, never raises.
        ``on_delivered(partition, offset)``: called once Kafka has it (never for a spooled one)."""
        try:
            value = self._encode(event)
            key = event["client_id"].encode()
            headers = self._headers_of(event) if self._headers_of is not None else None
        except Exception:  # a bug in event building must not fail the request; say so loudly
            log.exception("event %s could not be encoded and is lost", event.get("request_id"))
            self._count(dropped=1)
            return
        if on_delivered is None and not self._spooling:  # the direct case written out: the hot path's budget is 10 us
            try:
                # by position (a keyword costs ~0.5 us), in confluent-kafka's C order: topic, value, key,
                # partition, callback, on_delivery, timestamp (0: now), headers (test_publisher_direct.py)
                self._producer.produce(self.topic, value, key, ANY_PARTITION, None, None, 0, headers)  # type: ignore[arg-type]
            except (BufferError, KafkaException):  # refused: publish_encoded tries again, then spools
                pass
            except Exception:  # a confluent-kafka whose order differs: the keyword call below still works
                self._log("produce", logging.ERROR, "produce() by position failed; by keyword instead", exc_info=True)
            else:
                self.stats.enqueued += 1
                return
        if on_delivered is not None:  # told by the delivery report, or by the spool's replay
            on_delivered = self._awaited.wrap(event["event_id"] or "", on_delivered)
        self.publish_encoded(key, value, headers, rebuildable=True, on_delivered=on_delivered)

    def publish_encoded(
        self,
        key: bytes,
        value: bytes,
        headers: Headers | None = None,
        rebuildable: bool = False,
        on_delivered: OnDelivered | None = None,
    ) -> None:
        """Enqueue one encoded record (spool it while spooling); never raises. ``rebuildable``:
        the headers are the event's CloudEvents headers, which a failed delivery rebuilds from
        the value (a per-message delivery callback would cost ~6 us on every event)."""
        try:
            if self._spooling and self._spool_if_spooling(key, value, headers):
                return
            try:
                if on_delivered is not None:  # the few events that need their offset (hard budgets)
                    self._reported.produce(key, value, headers, on_delivered)
                elif headers is None or rebuildable:
                    # None, or the event's own headers: a list (CloudEventHeaders), as produce() takes
                    self._producer.produce(self.topic, value, key, headers=headers)  # type: ignore[arg-type]
                else:  # delivery reports carry no headers: keep them for a failed delivery's spooling
                    self._producer.produce(
                        self.topic,
                        value,
                        key,
                        headers=list(headers),  # confluent-kafka takes a list (or a dict), not any sequence
                        on_delivery=functools.partial(self._on_delivery_with, headers),
                    )
                self.stats.enqueued += 1
                return
            except (BufferError, KafkaException) as exc:  # local queue full, or producer unusable
                self._log("refused", logging.WARNING, "producer refused an event (%s); spooling", exc)
            self._to_spool(key, value, headers)
        except Exception:
            log.exception("event could not be published or spooled and is lost")
            self._count(dropped=1)

    def _spool_if_spooling(self, key: bytes, value: bytes, headers: Headers | None) -> bool:
        with self._spool_lock:
            if not self._spooling:
                return False
            self._append(key, value, headers)
            return True

    def _to_spool(self, key: bytes, value: bytes, headers: Headers | None) -> None:
        with self._spool_lock:
            self._spooling = True
            self._append(key, value, headers)

    def _append(self, key: bytes, value: bytes, headers: Headers | None) -> None:
        result = self.spool.append(key, value, headers)
        if result is Appended.STORED:
            self._write_error = None
            self._count(spooled=1)
        elif result is Appended.FULL:
            self._count(dropped=1)
            self._log(
                "full",
                logging.ERROR,
                "event spool is full (%d bytes): dropping newest events (%d dropped so far)",
                self.spool.max_bytes,
                self.stats.dropped,
            )
        elif result is Appended.CAPPED:
            self._count(dropped=1, dropped_unauthenticated=1)
            self._log(
                "capped",
                logging.WARNING,
                "unauthenticated events fill their share of the spool (%d bytes): "
                "dropping newest unauthenticated events (%d so far)",
                self.spool.capped_limit,
                self.stats.dropped_unauthenticated,
            )
        else:
            self._write_error = self.spool.last_error
            self._count(dropped=1, write_failures=1)
            self._log(
                "write",
                logging.ERROR,
                "event spool write failed (%s): event dropped (%d write failures so far)",
                self.spool.last_error,
                self.stats.write_failures,
            )

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, n in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def _count_spool_loss(self, kind: str, records: int) -> None:
        """The spool found records it cannot deliver (torn or corrupt on disk)."""
        if kind == "torn_tail":
            self._count(dropped=records, torn_tails=records)
        else:
            self._count(dropped=records, quarantined=records)

    # --- callbacks (background thread) ----------------------------------------------------
    @property
    def produced(self) -> int:
        """Events Kafka acknowledged on the direct path: enqueued, no longer queued, not failed."""
        return max(0, self.stats.enqueued - len(self._producer) - len(self._reported) - self.stats.failed)

    def _on_delivery(self, err, msg, headers: Headers | None = None) -> None:
        """A direct-path delivery failed: spool the event. Never raises (it runs inside poll)."""
        if err is None:
            return
        try:
            self._count(failed=1)
            if headers is None and self._cloudevents is not None:  # delivery reports carry no headers
                headers = self._cloudevents.of_value(msg.value())
            self._to_spool(msg.key() or b"", msg.value(), headers)
        except Exception:
            log.exception("a failed delivery could not be spooled; the event is lost")
            self._count(dropped=1)

    def _on_delivery_with(self, headers: Headers, err, msg) -> None:
        self._on_delivery(err, msg, headers)

    def _on_error(self, err: KafkaError) -> None:
        try:
            if err.code() == KafkaError._ALL_BROKERS_DOWN and not self._spooling:
                log.warning("kafka unreachable (%s): spooling events to disk", err.str())
                with self._spool_lock:
                    self._spooling = True
            elif err.fatal():
                self._fatal_error = err.str()
                log.error("fatal producer error: %s", err.str())
        except Exception:
            log.exception("kafka error callback failed")

    def _on_replay_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._replay_fatal = err.str()
            log.error("fatal error of the replay producer (a new one is made): %s", err.str())

    # --- background loop ------------------------------------------------------------------
    def _ensure_topic(self) -> None:
        """Create the topic with the configured partitions if it is missing (best effort: a
        broker with auto-creation, or an operator, may own topics; events wait in the queue)."""
        if not self.partitions:
            return
        from tokenaudit.infra.topics import ensure_specs, usage_topic

        try:
            ensure_specs(self._client_config, [usage_topic(self.topic, self.partitions)], timeout=5.0)
        except Exception as exc:
            log.info("could not ensure topic %s now (%s); relying on the broker", self.topic, exc)

    def _run(self) -> None:
        try:
            self._ensure_topic()
            self._loop()
        except BaseException as exc:  # only a bug gets here: /readyz reports it
            self._thread_error = f"{type(exc).__name__}: {exc}"
            log.critical(
                "event publisher thread stopped: %s; events are spooled from now on (replayed after a restart)",
                self._thread_error,
                exc_info=True,
            )
            with self._spool_lock:  # nobody serves delivery reports now: keep events where nothing is lost
                self._spooling = True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            try:
                self._producer.poll(0.1)
                self._reported.poll()
                if time.monotonic() >= self._next_probe and (self._spooling or not self.spool.empty()):
                    self._next_probe = time.monotonic() + self.retry_seconds
                    self._replay()
            except Exception:  # keep the thread alive whatever happens; the spool is intact
                self._log(
                    "loop",
                    logging.ERROR,
                    "event publisher step failed; retrying in %.1fs",
                    self.retry_seconds,
                    exc_info=True,
                )
                self._stop.wait(min(1.0, self.retry_seconds))

    def _broker_up(self) -> bool:
        try:
            md = self._producer.list_topics(self.topic, timeout=min(2.0, self.retry_seconds))
        except KafkaException:
            return False
        return bool(md.brokers)

    def _replayer(self) -> Producer:
        if self._replay_fatal is not None and self._replay_producer is not None:
            self._replay_producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._replay_producer = None
        if self._replay_producer is None:
            self._replay_fatal = None
            self._replay_producer = self._new_producer(
                {**self._config, "linger.ms": min(20.0, self._config["linger.ms"]), "error_cb": self._on_replay_error}
            )
        return self._replay_producer

    def _replay(self) -> None:
        if not self._broker_up():
            return
        replayed = self.stats.replayed
        while not self._stop.is_set():
            with self._spool_lock:  # no append can start a new segment meanwhile
                segment = self.spool.oldest_segment()
                if segment is None or self.spool.segment_count() == 1:
                    if self._spooling:
                        log.info(
                            "spool %s; publishing directly again",
                            "drained" if segment is None else "down to its last segment",
                        )
                    self._spooling = False
                    self._write_error = None
            if segment is None:
                log.info("spool replay done: %d events replayed", self.stats.replayed - replayed)
                return
            if not self._replay_segment(segment):
                return

    def _replay_segment(self, segment: Path) -> bool:
        """Send the segment's unconfirmed records; True once all are confirmed and the segment
        is gone. Stops sending at the first failure, waits for what is in flight, keeps every
        confirmation."""
        producer = self._replayer()
        batch = ReplayBatch(on_confirmed=self._awaited.replayed if self._awaited else None)
        complete = True
        sent = 0
        for record in self.spool.pending(segment):
            if batch.failures or self._stop.is_set():
                complete = False
                break
            report = functools.partial(batch.report, record.offset)
            while True:
                try:
                    producer.produce(self.topic, record.value, record.key, headers=record.headers, on_delivery=report)
                    batch.in_flight += 1
                    sent += 1
                    break
                except BufferError:  # the replay producer's queue is full: let it drain
                    producer.poll(0.05)
                    self._persist(segment, batch)
            if sent % 1000 == 0:
                producer.poll(0)
                self._persist(segment, batch)
        deadline = time.monotonic() + self.message_timeout_s + 5
        while batch.in_flight > 0 and time.monotonic() < deadline:
            if self._stop.is_set():  # shutting down: unconfirmed records stay for the next start
                deadline = min(deadline, time.monotonic() + 1.0)
            producer.poll(0.1)
            self._persist(segment, batch)
        self._persist(segment, batch)
        if batch.failures or batch.in_flight or not complete:
            if batch.failures:
                self._count(replay_failed=len(batch.failures))
            reasons = sorted({f.str() for f in batch.failures})
            self._log(
                "replay",
                logging.WARNING,
                "spool replay of %s incomplete (%d failed: %s; %d pending); retrying every %.1fs",
                segment.name,
                len(batch.failures),
                "; ".join(reasons) or "-",
                batch.in_flight,
                self.retry_seconds,
            )
            return False
        self.spool.remove(segment)
        log.debug("replayed spool segment %s", segment.name)
        return True

    def _persist(self, segment: Path, batch: ReplayBatch) -> None:
        """Write the confirmations received so far to the segment's resume log, then count them."""
        self._heartbeat = time.monotonic()
        if batch.confirmed:
            offsets, batch.confirmed = batch.confirmed, []
            self.spool.confirm(segment, offsets)
            self._count(replayed=len(offsets))
