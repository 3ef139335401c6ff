"""Tokenization on the ids and the micro-batcher's isolation and back-pressure, without a model
or a broker: the real tokenizers of the tiny T5 and GPT-2 checkpoints, and runner subclasses
whose ``generate_encoded`` fails or blocks on purpose (a unit test of the batcher's logic)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.apps import cached_model
from tokenaudit.inference.batcher import MicroBatcher, QueueFull, QueueTimeout
from tokenaudit.inference.runner import Encoded, Generated, InvalidPrompt, ModelRunner
from tokenaudit.settings import load_settings

POISON = 666


def _tokenizer_runner(arch: str, max_input_tokens: int) -> ModelRunner:
    from transformers import AutoTokenizer

    path = cached_model(arch, load_settings().cache_dir)
    runner = ModelRunner(str(path), max_input_tokens=max_input_tokens)
    runner.use_tokenizer(AutoTokenizer.from_pretrained(path))
    return runner


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def tok_runner(request):
    return _tokenizer_runner(request.param, 24)


WORDS = st.lists(
    st.sampled_from(["licence", "the", "quick", "fox", "naïve", "日本", "😀", " ", ",", "zz"]), max_size=60
).map("".join)


@pytest.mark.model  # the tiny models' tokenizers
@settings(max_examples=120, deadline=None)
@given(text=WORDS)
def test_truncation_on_ids_matches_the_tokenizers_own(tok_runner, text):
    tok = tok_runner.tokenizer
    full = tok(text).input_ids
    ref = tok(text, truncation=True, max_length=24).input_ids
    got = tok_runner.tokenize(text)
    assert got.ids == ref and got.untruncated == len(full) and got.truncated is (len(full) > 24)


def test_t5_keeps_its_trailing_eos_when_cut():
    runner = _tokenizer_runner("t5", 16)
    long = runner.tokenize("the quick brown fox jumps over the lazy dog " * 20)
    assert len(long.ids) == 16 and long.ids[-1] == runner.tokenizer.eos_token_id and long.truncated


@pytest.mark.model  # the tiny models' tokenizers
def test_a_prompt_the_tokenizer_refuses_is_invalid_prompt(tok_runner):
    with pytest.raises(InvalidPrompt, match="cannot encode"):
        tok_runner.tokenize("fine text \ud800 more")
    assert tok_runner.tokenize("fine text").ids


# --- the batcher, with runners that need no model --------------------------------------------------
class FakeRunner(ModelRunner):
    """Echoes each row's length as its output; a row holding POISON makes the whole call fail,
    as a real model failure on one row does. ``gate`` (when set) holds every call until opened."""

    def __init__(self, gate: threading.Event | None = None):
        super().__init__("fake", max_input_tokens=64)
        self.device, self.gate, self.calls = "/device:CPU:0", gate, []

    def generate_encoded(self, encoded, max_new_tokens):
        self.calls.append([e.ids for e in encoded])
        if self.gate is not None:
            self.gate.wait(10)
        if any(POISON in e.ids for e in encoded):
            raise RuntimeError("model failure on one row")
        return [Generated(len(e.ids), e.untruncated, False, [7] * n, "length") for e, n in zip(encoded, max_new_tokens)]

    def decode(self, ids):
        return f"{len(ids)} ids"


def _enc(*ids: int) -> Encoded:
    return Encoded(list(ids), len(ids))


def test_a_model_failure_fails_only_its_row_the_rest_of_the_batch_is_retried():
    runner = FakeRunner()
    batcher = MicroBatcher(runner, max_size=8, max_wait_ms=200).start()

    async def go():
        rows = [_enc(1, i) for i in range(5)] + [_enc(POISON)] + [_enc(2, i, i) for i in range(2)]
        return await asyncio.gather(*[batcher.submit(e, 3) for e in rows], return_exceptions=True)

    try:
        results = asyncio.run(go())
    finally:
        batcher.stop()
    assert isinstance(results[5], RuntimeError)
    ok = [r for i, r in enumerate(results) if i != 5]
    assert all(r.generated.output_tokens == 3 and r.text == "3 ids" for r in ok)
    assert len(runner.calls[0]) == 8, "all eight shared one generate call first"
    assert sorted(len(c) for c in runner.calls[1:]) == [1] * 8, "then each row alone"
    assert all(r.batch_size == 1 for r in ok) and batcher.retried_rows == 8
    assert len({r.batch_id for r in ok}) == 7


def test_queue_bound_and_deadline_refuse_without_running():
    gate = threading.Event()
    runner = FakeRunner(gate)
    batcher = MicroBatcher(runner, max_size=1, max_wait_ms=0, max_queue=2, queue_timeout=0.3).start()

    async def go():
        first = asyncio.ensure_future(batcher.submit(_enc(1), 1))
        while not runner.calls:  # the model thread holds the first request
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(batcher.submit(_enc(2, i), 1)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="full"):
            await batcher.submit(_enc(3), 1)
        waited = await asyncio.gather(*queued, return_exceptions=True)
        gate.set()
        return await first, waited

    try:
        first, waited = asyncio.run(go())
    finally:
        gate.set()
        batcher.stop()
    assert first.generated.output_tokens == 1
    assert all(isinstance(w, QueueTimeout) and w.queue_ms >= 300 for w in waited)
    assert waited[0].code == "queue_timeout" and QueueFull.code == "queue_full"
    deadline = time.monotonic() + 5
    while batcher.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.calls == [[[1]]], "requests whose deadline passed in the queue never ran"


def test_requests_waiting_for_the_tokenizer_count_against_the_queue_bound(tmp_path):
    from tokenaudit.inference.app import AppState

    gate = threading.Event()

    class SlowTokenizer(FakeRunner):
        def tokenize(self, prompt):
            gate.wait(10)
            return _enc(1)

    state = AppState(load_settings(data_dir=tmp_path, max_queue=2, tokenizer_threads=1), SlowTokenizer())

    async def go():
        waiting = [asyncio.ensure_future(state.tokenize(f"p{i}")) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="tokenized"):
            await state.tokenize("one too many")
        gate.set()
        return await asyncio.gather(*waiting)

    try:
        assert [e.ids for e in asyncio.run(go())] == [[1], [1]]
    finally:
        gate.set()
        state.tokenizer_pool.shutdown()


# --- step-wise batches (streaming), with the real Decoding over a step function that needs no model --
EOS = 1


class FakeSteps:
    """Row i's k-th token is ``10 * (i + 1) + k``; a row whose prompt holds 5 emits EOS at its
    second token. Each step after the prefill waits for ``gate`` (a semaphore the test releases);
    ``fail_at`` makes that step raise, as a model failure mid-decode would."""

    def __init__(self, gate: threading.Semaphore | None = None, fail_at: int | None = None):
        self.gate, self.fail_at = gate, fail_at
        self.waiting = threading.Event()  # set once a step waits for the gate

    def _tokens(self, ids, k):
        return np.array([EOS if k == 1 and 5 in row else 10 * (i + 1) + k + 1 for i, row in enumerate(ids.tolist())])

    def prefill(self, ids, mask, max_new):
        if (ids == POISON).any():
            raise RuntimeError("model failure on one row")
        return {"ids": ids, "k": 0, "next_tokens": self._tokens(ids, 0)}

    def step(self, state):
        if self.gate is not None:
            self.waiting.set()
            assert self.gate.acquire(timeout=10)
        k = state["k"] + 1
        if k == self.fail_at:
            raise RuntimeError("model failure mid-decode")
        return {"ids": state["ids"], "k": k, "next_tokens": self._tokens(state["ids"], k)}


class StepRunner(FakeRunner):
    def __init__(self, steps: FakeSteps):
        super().__init__()
        self.kind, self.pad_id, self.eos_ids, self.stepper = "causal", 0, {EOS}, steps


def test_streamed_rows_get_each_token_as_it_is_decoded_and_a_cancelled_row_stops_there():
    from tokenaudit.inference.streaming import TokenStream

    gate = threading.Semaphore(0)
    steps = FakeSteps(gate)
    runner = StepRunner(steps)
    batcher = MicroBatcher(runner, max_size=8, max_wait_ms=300).start()

    async def go():
        loop = asyncio.get_running_loop()
        a, b = TokenStream(loop), TokenStream(loop)
        jobs = [
            asyncio.ensure_future(batcher.submit(_enc(2, 3), 6, a)),
            asyncio.ensure_future(batcher.submit(_enc(4), 4, b)),
            asyncio.ensure_future(batcher.submit(_enc(6, 7, 8), 5)),  # does not stream: same batch
            asyncio.ensure_future(batcher.submit(_enc(5), 6, TokenStream(loop))),
        ]  # EOS at its 2nd token
        for job, stream in zip(jobs, (a, b)):
            job.add_done_callback(stream.end)
        firsts = [await a.take(), await b.take()]  # the prefill's tokens, before any step was let run
        assert await loop.run_in_executor(None, steps.waiting.wait, 10)
        a.cancelled = True  # a's client left while step 1 runs: that token was made, no other
        for _ in range(10):
            gate.release()
        rest_b = []
        while more := await b.take():
            rest_b += more
        return firsts, rest_b, await a.take(), await asyncio.gather(*jobs)

    try:
        firsts, rest_b, rest_a, results = asyncio.run(go())
    finally:
        for _ in range(10):
            gate.release()
        batcher.stop()
    assert firsts == [[11], [21]], "each stream has its first token while the others are still to come"
    assert rest_b == [22, 23, 24] and rest_a == [12]
    a, b, c, d = (r.generated for r in results)
    assert (a.output_ids, a.finish_reason) == ([11, 12], "cancelled")
    assert (b.output_ids, b.finish_reason) == ([21, 22, 23, 24], "length")
    assert (c.output_ids, c.finish_reason) == ([31, 32, 33, 34, 35], "length")
    assert (d.output_ids, d.finish_reason) == ([41, EOS], "stop")
    assert len({r.batch_id for r in results}) == 1 and results[0].batch_size == 4
    assert a.first_token_at <= b.first_token_at <= b.last_token_at
    assert runner.calls == [], "a batch with a streamed row never goes through generate"


def test_a_step_that_fails_fails_the_streamed_rows_and_runs_the_others_again_alone():
    from tokenaudit.inference.streaming import TokenStream

    runner = StepRunner(FakeSteps(fail_at=2))
    batcher = MicroBatcher(runner, max_size=8, max_wait_ms=200).start()

    async def go():
        stream = TokenStream(asyncio.get_running_loop())
        jobs = [
            batcher.submit(_enc(2), 6, stream),
            batcher.submit(_enc(3, 4), 6),
            batcher.submit(_enc(POISON), 3, None),
        ]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        stream.end()
        got = []
        while more := await stream.take():
            got += more
        return results, got

    try:
        (streamed, plain, poison), got = asyncio.run(go())
    finally:
        batcher.stop()
    assert isinstance(poison, RuntimeError) and "one row" in str(poison), "a failed prefill: each row alone"
    assert isinstance(streamed, RuntimeError) and "mid-decode" in str(streamed)
    assert got == [11, 12], "what was streamed before the failure stays streamed (the route bills it)"
    assert plain.generated.output_tokens == 6 and plain.batch_size == 1, "the row that did not stream, again alone"
