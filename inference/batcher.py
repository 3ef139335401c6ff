"""Dynamic micro-batching: concurrent requests share one ``generate`` call.

One worker thread owns the model. It blocks for the first request, then gathers more until the
batch is full (``max_size``) or ``max_wait_ms`` has passed since the first arrived, runs the
batch, and resolves each request's asyncio future. The event loop never runs model code.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from tokenaudit.inference.runner import Generated, ModelRunner

log = logging.getLogger(__name__)


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
class _Pending:
    prompt: str
    max_new_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, runner: ModelRunner, max_size: int = 16, max_wait_ms: float = 5.0):
        self.runner = runner
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self.batches = 0

    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the requests already queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, prompt: str, max_new_tokens: int) -> BatchResult:
        loop = asyncio.get_running_loop()
        pending = _Pending(prompt, max_new_tokens, loop.create_future(), loop)
        self._queue.put(pending)
        # shield: a cancelled request (client gone) still gets its tokens accounted by the caller
        return await asyncio.shield(pending.future)

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
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._gather(first)
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        batch_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        try:
            results = self.runner.generate([p.prompt for p in batch], [p.max_new_tokens for p in batch])
            texts = [self.runner.decode(r.output_ids) for r in results]
        except Exception as exc:  # resolve every waiter; the app turns this into a 500 and an event
            log.exception("generation failed for a batch of %d", len(batch))
            for p in batch:
                p.loop.call_soon_threadsafe(_set_exception, p.future, exc)
            return
        inference_ms = (time.perf_counter() - started) * 1000
        self.batches += 1
        for i, (p, r, text) in enumerate(zip(batch, results, texts)):
            res = BatchResult(r, text, batch_id, len(batch), i, (started - p.enqueued) * 1000, inference_ms,
                              self.runner.device)
            p.loop.call_soon_threadsafe(_set_result, p.future, res)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
