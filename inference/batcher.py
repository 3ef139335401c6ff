"""Dynamic micro-batching: concurrent requests share one model call.

One worker thread owns the model. It blocks for the first request, then gathers more until the
batch is full (``max_size`` rows) or ``max_wait_ms`` has passed since the first arrived, runs the
batch, and resolves each request's asyncio future. The event loop never runs model code, and
the model thread never tokenizes: requests arrive as ids (``ModelRunner.tokenize`` on the
request side), so a long prompt delays only itself.

How a batch runs: with no streamed row, one ``generate`` call (the whole loop compiled: the
fastest, see bench/bench_generation.py); with at least one streamed row, the step-wise loop,
pushing each streamed row's tokens to its :class:`~tokenaudit.inference.streaming.TokenStream`
as they are decoded (rows that do not stream still get the same tokens, at the end). A
streamed row whose client left is cancelled between two steps. An encoder's batch is one
embedding call over the rows of all its requests (an embeddings request may hold several).

Back-pressure: the queue holds at most ``max_queue`` requests (beyond that :class:`QueueFull`
at once) and each waits at most ``queue_timeout`` seconds (then :class:`QueueTimeout`; a
request whose deadline passed is never run). Both become a 503 with ``Retry-After``.

Isolation: when ``generate`` fails for a batch of several rows, each row is run again alone,
so one bad row fails only its own request. A step-wise batch that fails after its first tokens
were streamed cannot take them back: its streamed rows fail (their tokens so far stay
accounted by the route), the others are run again alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tokenaudit.inference.runner import Decoded, Encoded, Generated, ModelRunner

if TYPE_CHECKING:
    from tokenaudit.inference.streaming import TokenStream

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


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # (rows, dimensions) float32, in the request's order
    batch_id: str
    batch_size: int  # rows in the model call, all requests together
    position_in_batch: int  # of this request's first row
    queue_ms: float
    inference_ms: float
    device: str


def _prompts(batch: list[_Pending]) -> list[Encoded]:
    """The prompts of a generation batch. A model serves one kind of request (the routes refuse
    the other), so batches do not mix kinds; a mix would fail here, and each request alone."""
    prompts = []
    for p in batch:
        if isinstance(p.encoded, list):
            raise TypeError("an embeddings request in a generation batch")
        prompts.append(p.encoded)
    return prompts


def _embedding_rows(batch: list[_Pending]) -> list[Encoded]:
    """The inputs of an embeddings batch, every request's in order (see :func:`_prompts`)."""
    rows = []
    for p in batch:
        if not isinstance(p.encoded, list):
            raise TypeError("a generation request in an embeddings batch")
        rows.extend(p.encoded)
    return rows


@dataclass(slots=True)
class _Pending:
    encoded: Encoded | list[Encoded]  # one prompt to generate from, or the inputs of one embeddings request
    max_new_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    stream: TokenStream | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    state: int = _QUEUED  # _QUEUED -> _TAKEN (the batcher runs it) or _EXPIRED (its deadline won)

    @property
    def rows(self) -> int:
        return len(self.encoded) if isinstance(self.encoded, list) else 1


class MicroBatcher:
    def __init__(
        self,
        runner: ModelRunner,
        max_size: int = 16,
        max_wait_ms: float = 5.0,
        *,
        max_queue: int = 256,
        queue_timeout: float = 30.0,
    ):
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

    def start(self) -> MicroBatcher:
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

    async def submit(self, encoded: Encoded, max_new_tokens: int, stream: TokenStream | None = None) -> BatchResult:
        """Queue one tokenized prompt and wait for its row of a batch; with ``stream``, its tokens
        are pushed there as they are decoded (the result still comes here, at the end)."""
        return await self._submit(_Pending(encoded, max_new_tokens, *self._future(), stream))

    async def submit_embeddings(self, rows: list[Encoded]) -> EmbeddingResult:
        """Queue the tokenized inputs of one embeddings request (one queue slot, several rows)."""
        return await self._submit(_Pending(list(rows), 0, *self._future()))

    @staticmethod
    def _future() -> tuple[asyncio.Future, asyncio.AbstractEventLoop]:
        loop = asyncio.get_running_loop()
        return loop.create_future(), loop

    async def _submit(self, pending: _Pending):
        loop = pending.loop
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
        _set_exception(
            pending.future,
            QueueTimeout(f"waited {waited / 1000:.1f}s in the batch queue (limit {self.queue_timeout:g}s)", waited),
        )

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
        pending.loop.call_soon_threadsafe(
            _set_exception,
            pending.future,
            QueueTimeout(f"waited {waited / 1000:.1f}s in the batch queue (limit {self.queue_timeout:g}s)", waited),
        )
        return False

    # --- the model thread -------------------------------------------------------------------
    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch = [first]
        rows = first.rows
        deadline = first.enqueued + self.max_wait
        while rows < self.max_size:
            timeout = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if self._take(item):
                batch.append(item)
                rows += item.rows
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
        if isinstance(batch[0].encoded, list):
            self._run_embeddings(batch)
        elif self.runner.stepper is not None and any(p.stream is not None for p in batch):
            self._run_stepwise(batch)
        else:
            self._run_generate(batch)

    def _retry_alone(self, batch: list[_Pending], exc: Exception, what: str) -> bool:
        """After a failed batch of several: each request again, alone (True); a lone one fails."""
        if len(batch) > 1:
            log.warning(
                "%s failed for a batch of %d (%s); running each request alone", what, len(batch), type(exc).__name__
            )
            self.retried_rows += len(batch)
            for p in batch:
                self._run([p])
            return True
        log.error("%s failed for one request: %s", what, type(exc).__name__, exc_info=exc)
        batch[0].loop.call_soon_threadsafe(_set_exception, batch[0].future, exc)
        return False

    def _run_generate(self, batch: list[_Pending]) -> None:
        batch_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        try:
            results = self.runner.generate_encoded(_prompts(batch), [p.max_new_tokens for p in batch])
        except Exception as exc:
            self._retry_alone(batch, exc, "generation")
            return
        inference_ms = (time.perf_counter() - started) * 1000
        self.batches += 1
        for p, r in zip(batch, results):
            if p.stream is not None:  # a model that cannot decode step-wise: every token at once
                for tok in r.output_ids:
                    p.stream.push(tok)
        self._deliver(batch, results, batch_id, started, inference_ms)

    def _run_stepwise(self, batch: list[_Pending]) -> None:
        batch_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        try:
            encoded = _prompts(batch)
            decoding = self.runner.start_decoding(encoded, [p.max_new_tokens for p in batch])
        except Exception as exc:  # nothing was streamed yet: as a failed generate
            self._retry_alone(batch, exc, "step-wise prefill")
            return
        try:
            self._push(batch, decoding.new_tokens)
            while not decoding.done:
                for i, p in enumerate(batch):
                    if p.stream is not None and p.stream.cancelled:
                        decoding.cancel(i)
                if decoding.done:
                    break
                self._push(batch, decoding.step())
        except Exception as exc:
            log.error("step-wise decoding failed after its first tokens: %s", type(exc).__name__, exc_info=exc)
            again = [p for p in batch if p.stream is None]
            for p in batch:
                if p.stream is not None:
                    p.loop.call_soon_threadsafe(_set_exception, p.future, exc)
            self.retried_rows += len(again)
            for p in again:
                self._run([p])
            return
        inference_ms = (time.perf_counter() - started) * 1000
        self.batches += 1
        self._deliver(batch, self.runner.decoded(decoding, encoded), batch_id, started, inference_ms)

    @staticmethod
    def _push(batch: list[_Pending], tokens: list[int | None]) -> None:
        for p, tok in zip(batch, tokens):
            if p.stream is not None and tok is not None:
                p.stream.push(tok)

    def _deliver(
        self,
        batch: list[_Pending],
        results: list[Generated] | list[Decoded],
        batch_id: str,
        started: float,
        inference_ms: float,
    ) -> None:
        for i, (p, r) in enumerate(zip(batch, results)):
            try:
                text = self.runner.decode(r.output_ids)
            except Exception as exc:  # one row's output; the others are fine
                log.error("decoding one row failed: %s", type(exc).__name__)
                p.loop.call_soon_threadsafe(_set_exception, p.future, exc)
                continue
            res = BatchResult(
                r, text, batch_id, len(batch), i, (started - p.enqueued) * 1000, inference_ms, self.runner.device
            )
            p.loop.call_soon_threadsafe(_set_result, p.future, res)

    def _run_embeddings(self, batch: list[_Pending]) -> None:
        batch_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        try:
            rows = _embedding_rows(batch)
            vectors = self.runner.embed_encoded(rows)
        except Exception as exc:
            self._retry_alone(batch, exc, "embedding")
            return
        inference_ms = (time.perf_counter() - started) * 1000
        self.batches += 1
        first = 0
        for p in batch:
            res = EmbeddingResult(
                vectors[first : first + p.rows],
                batch_id,
                len(rows),
                first,
                (started - p.enqueued) * 1000,
                inference_ms,
                self.runner.device,
            )
            first += p.rows
            p.loop.call_soon_threadsafe(_set_result, p.future, res)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
