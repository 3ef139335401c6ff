"""Dynamic micro-batching: concurrent requests share one ``generate`` call.

One worker thread owns the model. It blocks for the first request, then gathers more until the
batch is full (``max_size``) or ``max_wait_ms`` has passed since the first arrived, runs the
batch, and resolves each request's asyncio future. The event loop never runs model code, and
the model thread never tokenizes: requests arrive as ids (``ModelRunner.tokenize`` on the
request side), so a long prompt delays only itself.

Back-pressure: the queue holds at most ``max_queue`` requests (beyond that :class:`QueueFull`
at once) and each waits at most ``queue_timeout`` seconds (then :class:`QueueTimeout`; a
request whose deadline passed is never run). Both become a 503 with ``Retry-After``.

Isolation: when ``generate`` fails for a batch of several rows, each row is run again alone,
so one bad row fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from tokenaudit.inference.runner import Encoded, Generated, ModelRunner

log = logging.getLogger(__name__)

_QUEUED, _TAKEN, _EXPIRED = 0, 1, 2


class Overloaded(Exception):
    """The request was refused for capacity, before the model saw it (a 503 with Retry-After)."""

    code = "overloaded"
    retry_after_seconds = 1

    def __init__(self, message: str, queue_ms: float = 0.0):
        super().__init__(message)
        self.queue_ms = queue_ms


class QueueFull(Overloaded):
    code = "queue_full"


class QueueTimeout(Overloaded):
    code = "queue_timeout"


@dataclass
class BatchResult:
    generated: Generated
    text: str
    batch_id: str
    batch_size: int
    position_in_batch: int
    queue_ms: float
    inference_ms: float
    device: str


@dataclass(slots=True)
class _Pending:
    encoded: Encoded
    max_new_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    state: int = _QUEUED  # _QUEUED -> _TAKEN (the batcher runs it) or _EXPIRED (its deadline won)


class MicroBatcher:
    def __init__(self, runner: ModelRunner, max_size: int = 16, max_wait_ms: float = 5.0, *,
                 max_queue: int = 256, queue_timeout: float = 30.0):
        self.runner = runner
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=max_queue)
        # guards each _Pending.state change: the deadline timer (event loop) and the batcher
        # thread race for a queued request, exactly one of them wins
        self._claim = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self.batches = 0
        self.retried_rows = 0

    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the requests already queued, then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.error("batcher queue still full after %.0fs at shutdown", timeout)
            return
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, encoded: Encoded, max_new_tokens: int) -> BatchResult:
        """Queue one tokenized prompt and wait for its row of a batch."""
        loop = asyncio.get_running_loop()
        pending = _Pending(encoded, max_new_tokens, loop.create_future(), loop)
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            raise QueueFull(f"the batch queue is full ({self.max_queue} requests waiting)") from None
        timer = loop.call_later(self.queue_timeout, self._expire, pending)
        pending.future.add_done_callback(lambda _: timer.cancel())
        # shield: a cancelled request (client gone) still gets its tokens accounted by the caller
        return await asyncio.shield(pending.future)

    # --- deadline (event loop) vs. take (batcher thread) ------------------------------------
    def _expire(self, pending: _Pending) -> None:
        with self._claim:
            if pending.state != _QUEUED:
                return  # already running: its result is on the way
            pending.state = _EXPIRED
        waited = (time.perf_counter() - pending.enqueued) * 1000
        _set_exception(pending.future, QueueTimeout(
            f"waited {waited / 1000:.1f}s in the batch queue (limit {self.queue_timeout:g}s)", waited))

    def _take(self, pending: _Pending) -> bool:
        """Claim a queued request for a batch; False when its deadline already passed."""
        with self._claim:
            if pending.state != _QUEUED:
                return False
            if time.perf_counter() - pending.enqueued <= self.queue_timeout:
                pending.state = _TAKEN
                return True
            pending.state = _EXPIRED  # overdue, its timer just has not fired yet (busy loop)
        waited = (time.perf_counter() - pending.enqueued) * 1000
        pending.loop.call_soon_threadsafe(_set_exception, pending.future, QueueTimeout(
            f"waited {waited / 1000:.1f}s in the batch queue (limit {self.queue_timeout:g}s)", waited))
        return False

    # --- the model thread -------------------------------------------------------------------
    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch = [first]
        deadline = first.enqueued + self.max_wait
        while len(batch) < self.max_size:
            timeout = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if self._take(item):
                batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            if not self._take(first):
                continue
            batch, stopping = self._gather(first)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        batch_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        try:
            results = self.runner.generate_encoded([p.encoded for p in batch], [p.max_new_tokens for p in batch])
        except Exception as exc:
            if len(batch) > 1:  # find the bad row: every row again, alone
                log.warning("generation failed for a batch of %d (%s); running each row alone",
                            len(batch), type(exc).__name__)
                self.retried_rows += len(batch)
                for p in batch:
                    self._run([p])
                return
            log.error("generation failed for one row: %s", type(exc).__name__, exc_info=exc)
            batch[0].loop.call_soon_threadsafe(_set_exception, batch[0].future, exc)
            return
        inference_ms = (time.perf_counter() - started) * 1000
        self.batches += 1
        for i, (p, r) in enumerate(zip(batch, results)):
            try:
                text = self.runner.decode(r.output_ids)
            except Exception as exc:  # one row's output; the others are fine
                log.error("decoding one row failed: %s", type(exc).__name__)
                p.loop.call_soon_threadsafe(_set_exception, p.future, exc)
                continue
            res = BatchResult(r, text, batch_id, len(batch), i, (started - p.enqueued) * 1000, inference_ms,
                              self.runner.device)
            p.loop.call_soon_threadsafe(_set_result, p.future, res)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
