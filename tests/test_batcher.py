"""Tokenization on the ids and the micro-batcher's isolation and back-pressure, without a model
or a broker: the real tokenizers of the tiny T5 and GPT-2 checkpoints, and runner subclasses
whose ``generate_encoded`` fails or blocks on purpose (a unit test of the batcher's logic)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenaudit.inference.batcher import MicroBatcher, QueueFull, QueueTimeout
from tokenaudit.inference.runner import Encoded, Generated, InvalidPrompt, ModelRunner
from tests.support.apps import cached_model
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


WORDS = st.lists(st.sampled_from(["licence", "the", "quick", "fox", "naïve", "日本", "😀", " ", ",", "zz"]),
                 max_size=60).map("".join)


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
