"""Model runner and builder against real tiny TF models (T5 and GPT-2 architectures)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from tests.support.apps import cached_model
from tokenaudit.inference.runner import ModelRunner
from tokenaudit.inference.shapes import as_token_ids, count_generated
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

LONG = "the quick brown fox jumps over the lazy dog " * 40
PROMPTS = ["hello world", "Licence terms and conditions apply.", LONG, "x"]


@pytest.fixture(scope="module")
def t5_path():
    return cached_model("t5", load_settings().cache_dir)


@pytest.fixture(scope="module")
def gpt2_path():
    return cached_model("gpt2", load_settings().cache_dir)


def test_model_init_builds_reloadable_model_and_is_idempotent(data_dir):
    from transformers import AutoTokenizer, TFAutoModelForSeq2SeqLM

    from tokenaudit.cli import main

    first = CliRunner().invoke(main, ["model", "init"])
    assert first.exit_code == 0, first.output
    path = data_dir / "models" / "t5-tiny"
    assert "built" in first.output and (path / "tokenizer.json").is_file()
    model, info = TFAutoModelForSeq2SeqLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.model_type == "t5" and model.config.is_encoder_decoder
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.is_fast and tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok("hello").input_ids[-1] == tok.eos_token_id, "T5 tokenizer appends </s>"
    mtime = (path / "tf_model.h5").stat().st_mtime
    second = CliRunner().invoke(main, ["model", "init"])
    assert second.exit_code == 0 and "already present" in second.output
    assert (path / "tf_model.h5").stat().st_mtime == mtime


def _reference_ids(model, tok, prompt: str, max_len: int, max_new: int, encoder_decoder: bool) -> list[int]:
    """One prompt alone, unpadded, through HF generate: what the batched runner must match."""
    import tensorflow as tf

    ids = tok(prompt, truncation=True, max_length=max_len).input_ids
    out = model.generate(
        input_ids=tf.constant([ids]),
        attention_mask=tf.ones((1, len(ids)), tf.int32),
        max_new_tokens=max_new,
        do_sample=False,
    )
    row = out.numpy()[0][1:] if encoder_decoder else out.numpy()[0][len(ids) :]
    eos = tok.eos_token_id
    kept = []
    for t in row:
        kept.append(int(t))
        if t == eos:
            break
    return kept


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_batched_accounting_matches_tokenizer_and_single_generation(arch, t5_path, gpt2_path):
    path = t5_path if arch == "t5" else gpt2_path
    runner = ModelRunner(str(path), max_input_tokens=48).load()
    assert runner.encoder_decoder is (arch == "t5")
    tok = runner.tokenizer
    limits = [6, 3, 8, 5]
    results = runner.generate(PROMPTS, limits)
    for prompt, limit, r in zip(PROMPTS, limits, results):
        full = tok(prompt).input_ids
        fed = tok(prompt, truncation=True, max_length=48).input_ids
        assert r.untruncated_input_tokens == len(full)
        assert r.input_tokens == len(fed) == min(len(full), 48)
        assert r.truncated is (len(full) > 48)
        ref = _reference_ids(runner.model, tok, prompt, 48, limit, runner.encoder_decoder)
        assert r.output_ids == ref, "batching and padding must not change what a row generates"
        assert r.output_tokens == len(ref) <= limit
        assert r.finish_reason == ("stop" if ref and ref[-1] == tok.eos_token_id else "length")
    assert results[2].truncated and results[2].untruncated_input_tokens > 48


def test_ids_from_logits_sequences_and_plain_ids():
    logits = np.zeros((2, 3, 5), np.float32)
    logits[0, :, 4] = 1.0
    logits[1, :, 2] = 1.0
    assert as_token_ids(logits).tolist() == [[4, 4, 4], [2, 2, 2]]

    class Out:
        sequences = np.array([[0, 7, 1]], np.int64)

    assert as_token_ids(Out()).tolist() == [[0, 7, 1]]
    with pytest.raises(TypeError):
        as_token_ids(np.zeros((2,), np.float32))


def test_count_generated_stops_after_eos_and_drops_padding():
    assert count_generated([5, 6, 1, 0, 0], {1}, 10) == ([5, 6, 1], "stop")
    assert count_generated([5, 6, 7, 8], {1}, 3) == ([5, 6, 7], "length")
    assert count_generated([0, 5], {1}, 2) == ([0, 5], "length"), "a generated pad id before EOS is real output"


def _stepwise_ids(runner: ModelRunner, prompts: list[str], limits: list[int]) -> list[list[int]]:
    encoded = runner.encode(prompts)
    decoding = runner.start_decoding(encoded, limits)
    while not decoding.done:
        decoding.step()
    return [r.output_ids for r in runner.decoded(decoding, encoded)]


def test_xla_bucket_generation_matches_eager(t5_path):
    eager = ModelRunner(str(t5_path), max_input_tokens=16).load()
    xla = ModelRunner(
        str(t5_path),
        max_input_tokens=16,
        xla=True,
        batch_buckets="2",
        length_buckets="16",
        new_token_buckets="4",
        max_batch=2,
        max_new_tokens_limit=4,
    ).load()
    xla.warmup()  # compiles the one (2, 16, 4) bucket: generate, and the step-wise prefill and step
    prompts, limits = ["hello world", "a somewhat longer prompt for the bucket test"], [4, 3]
    got = xla.generate(prompts, limits)
    want = eager.generate(prompts, limits)
    assert [g.output_ids for g in got] == [w.output_ids for w in want]
    assert [g.input_tokens for g in got] == [w.input_tokens for w in want]
    assert xla._compiled_shapes == {(2, 16, 4)}, "a one-row batch is padded into the compiled bucket"
    assert xla._step_shapes == {(2, 16, 4)}
    single = xla.generate(["hello world"], [4])[0]
    assert single.output_ids == want[0].output_ids
    assert _stepwise_ids(xla, prompts, limits) == [w.output_ids for w in want], "the compiled step-wise loop too"
    assert _stepwise_ids(xla, prompts[:1], [4]) == [want[0].output_ids]


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_xla_stepwise_decoding_of_decoder_only_models_matches_eager_generate(arch):
    """The padded static cache of XLA decoding for the other cache layouts: GPT-2 keeps keys and
    values stacked with the batch on axis 1, Mistral has grouped-query heads and rotary positions."""
    path = cached_model(arch, load_settings().cache_dir)
    eager = ModelRunner(str(path), max_input_tokens=16).load()
    xla = ModelRunner(
        str(path),
        max_input_tokens=16,
        xla=True,
        batch_buckets="2",
        length_buckets="16",
        new_token_buckets="6",
        max_batch=2,
        max_new_tokens_limit=6,
    ).load()
    prompts, limits = ["hello world", "a somewhat longer prompt for the bucket test"], [6, 4]
    want = [w.output_ids for w in eager.generate(prompts, limits)]
    assert _stepwise_ids(xla, prompts, limits) == want
    assert _stepwise_ids(xla, prompts[1:], [4]) == want[1:], "a one-row batch in the same compiled bucket"
    assert xla._step_shapes == {(2, 16, 6)} and not xla._compiled_shapes, "generate never compiled for it"


def test_inputs_are_capped_to_the_model_positions(gpt2_path):
    runner = ModelRunner(str(gpt2_path), max_input_tokens=2000, max_new_tokens_limit=256).load()
    assert runner.max_input_tokens == 1024 - 256, "GPT-2 has 1024 positions, 256 kept for generation"
    r = runner.generate(["word " * 1000], [2])[0]
    assert r.truncated and r.input_tokens == 768 and r.untruncated_input_tokens > 768 and 1 <= r.output_tokens <= 2
