"""The model families: the step-wise decoder gives what ``generate`` gives (T5, GPT-2, Mistral),
a tiny Mistral (the LLaMA family) served end to end with exact accounting on the topic, the
builder and its CLI, and docs/models.md kept current with the installed transformers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from tests.support.apps import cached_model, decode_events, read_events, served_app
from tokenaudit.inference.runner import ModelRunner, model_kind
from tokenaudit.settings import load_settings

pytestmark = [pytest.mark.model]

LONG = "the quick brown fox jumps over the lazy dog " * 40
PROMPTS = ["hello world", "Licence terms and conditions apply.", LONG, "x", "naïve café 日本 😀 text"]


def _path(arch: str) -> Path:
    return cached_model(arch, load_settings().cache_dir)


def _stepwise(runner: ModelRunner, prompts: list[str], limits: list[int]):
    encoded = runner.encode(prompts)
    decoding = runner.start_decoding(encoded, limits)
    steps = [list(decoding.new_tokens)]
    while not decoding.done:
        steps.append(list(decoding.step()))
    return runner.decoded(decoding, encoded), steps


@pytest.mark.parametrize("arch", ["t5", "gpt2", "mistral"])
def test_stepwise_decoding_gives_generates_tokens_one_step_at_a_time(arch):
    runner = ModelRunner(str(_path(arch)), max_input_tokens=40).load()
    assert runner.stepper is not None and runner.can_generate and not runner.can_embed
    limits = [7, 1, 12, 4, 9]  # several lengths in one batch: each row ends on its own
    want = runner.generate(PROMPTS, limits)
    got, steps = _stepwise(runner, PROMPTS, limits)
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids, "token for token what generate gives"
        assert (g.finish_reason, g.input_tokens, g.truncated) == (w.finish_reason, w.input_tokens, w.truncated)
        assert g.first_token_at <= g.last_token_at
    assert len(steps) == max(len(w.output_ids) for w in want), "the loop stops when the last row is done"
    for i, w in enumerate(want):  # step k carries row i's k-th token, then None once the row has ended
        column = [s[i] for s in steps]
        assert column[: len(w.output_ids)] == w.output_ids and set(column[len(w.output_ids) :]) <= {None}
    # a cancelled row ends where it was, the others go on
    encoded = runner.encode(PROMPTS[:2])
    decoding = runner.start_decoding(encoded, [12, 12])
    decoding.step()
    decoding.cancel(0)
    while not decoding.done:
        decoding.step()
    rows = runner.decoded(decoding, encoded)
    assert rows[0].finish_reason == "cancelled" and rows[0].output_tokens == 2
    alone = runner.generate(PROMPTS[1:2], [12])[0]
    assert rows[1].output_ids == alone.output_ids


@pytest.mark.parametrize(
    ("arch", "kind", "tokenizer_class", "first_special"),
    [
        ("t5", "seq2seq", "T5TokenizerFast", None),
        ("gpt2", "causal", "GPT2TokenizerFast", None),
        ("mistral", "causal", "LlamaTokenizerFast", "<s>"),
        ("bert", "encoder", "BertTokenizerFast", "[CLS]"),
    ],
)
def test_each_family_builds_with_its_own_tokenizer_and_kind(arch, kind, tokenizer_class, first_special):
    from transformers import AutoConfig, AutoTokenizer

    path = _path(arch)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == arch and model_kind(config) == kind
    tok = AutoTokenizer.from_pretrained(path)
    assert type(tok).__name__ == tokenizer_class and tok.is_fast and tok.pad_token_id is not None
    ids = tok("hello world").input_ids
    if first_special:
        assert tok.convert_ids_to_tokens(ids[0]) == first_special
    runner = ModelRunner(str(path), max_input_tokens=16)
    runner.use_tokenizer(tok)
    assert runner.tokenize(LONG).ids == tok(LONG, truncation=True, max_length=16).input_ids


def test_xla_embeddings_match_eager_in_padded_buckets():
    import numpy as np

    path = str(_path("bert"))
    eager = ModelRunner(path, max_input_tokens=16).load()
    xla = ModelRunner(path, max_input_tokens=16, xla=True, batch_buckets="4", length_buckets="16", max_batch=4).load()
    xla.warmup()
    assert not (eager.can_generate or xla.can_generate) and eager.stepper is None
    encoded = eager.encode(["hello world", "x", "a longer text about licences " * 5, "y", "z", "more"])
    want, got = eager.embed_encoded(encoded), xla.embed_encoded(encoded)
    assert got.shape == (6, eager.model.config.hidden_size) and got.dtype == np.float32
    assert np.allclose(got, want, atol=1e-5), "padding rows and columns change no vector"
    assert xla._embed_shapes == {(4, 16)}, "6 inputs: two calls of the one compiled bucket"
    with pytest.raises(Exception, match="cannot generate"):
        xla.generate(["hello"], [2])


def test_bert_config_that_says_is_decoder_is_a_generator():
    from transformers import BertConfig

    assert model_kind(BertConfig()) == "encoder"
    assert model_kind(BertConfig(is_decoder=True)) == "causal"


def test_model_init_cli_builds_a_family_and_prints_its_path(data_dir):
    from transformers import AutoConfig

    from tokenaudit.cli import main

    result = CliRunner().invoke(main, ["model", "init", "--arch", "bert"])
    assert result.exit_code == 0, result.output
    path = data_dir / "models" / "bert-tiny"
    assert f"TOKENAUDIT_MODEL={path}" in result.output
    assert AutoConfig.from_pretrained(path).model_type == "bert"
    again = CliRunner().invoke(main, ["model", "init", "--arch", "bert"])
    assert again.exit_code == 0 and "already present" in again.output
    wrong = CliRunner().invoke(main, ["model", "init", "--arch", "llama"])
    assert wrong.exit_code != 0 and "llama" in wrong.output


def test_docs_list_the_tensorflow_families_of_the_installed_transformers():
    from tokenaudit.inference.families import models_markdown, tf_families

    doc = Path(__file__).resolve().parents[1] / "docs" / "models.md"
    assert doc.read_text() == models_markdown(), (
        "docs/models.md is stale: python -m tokenaudit.inference.families > docs/models.md"
    )
    rows = {r["model_type"]: r for r in tf_families()}
    assert rows["mistral"]["tf_class"] == "TFMistralForCausalLM" and "llama" not in rows
    assert {k for k, r in rows.items() if r["tested"]} == {"t5", "gpt2", "mistral", "bert"}
    assert rows["bert"]["serves"].startswith("embeddings") and rows["t5"]["serves"].startswith("generate")


# --- a tiny Mistral served end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mistral(tmp_path_factory, kafka_bootstrap):
    tmp = tmp_path_factory.mktemp("mistral")
    with served_app(
        tmp, kafka_bootstrap, _path("mistral"), "llama-fan", "research", max_input_tokens=48, max_new_tokens_limit=16
    ) as server:
        yield server


def test_a_tiny_mistral_serves_streamed_and_whole_answers_with_exact_accounting(mistral, kafka_bootstrap):
    import openai

    runner = mistral.app.state.runner
    tok = runner.tokenizer
    client = openai.OpenAI(base_url=mistral.base_url + "/v1", api_key=mistral.key, max_retries=0)
    prompts = [f"mistral prompt {i} " + "about licences " * (i * 3) for i in range(5)]
    limits = [3 + 3 * i for i in range(5)]

    async def whole():
        async with httpx.AsyncClient(
            base_url=mistral.base_url, timeout=60, headers={"Authorization": f"Bearer {mistral.key}"}
        ) as c:
            return await asyncio.gather(
                *[c.post("/v1/completions", json={"prompt": p, "max_tokens": n}) for p, n in zip(prompts, limits)]
            )

    answers = asyncio.run(whole())
    assert [r.status_code for r in answers] == [200] * len(prompts)
    chunks = list(
        client.completions.create(
            model="mistral-tiny",
            prompt=prompts[4],
            max_tokens=limits[4],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == answers[4].json()["choices"][0]["text"], "pieces add up to the whole (multi-byte too)"
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    ids = [r.json()["id"].removeprefix("cmpl-") for r in answers] + [chunks[0].id.removeprefix("cmpl-")]
    want, events, deadline = set(ids), {}, time.monotonic() + 60
    while not want <= set(events) and time.monotonic() < deadline:
        got = decode_events(read_events(kafka_bootstrap, mistral.topic, expect=len(ids), timeout=10, settle=0.3))
        events = {e["request_id"]: e for e in got if e["request_id"] in want}
        assert len(events) == len([e for e in got if e["request_id"] in want]), "one event per request"
    for prompt, limit, r in zip(prompts, limits, answers):
        e, usage = events[r.json()["id"].removeprefix("cmpl-")], r.json()["usage"]
        fed = tok(prompt, truncation=True, max_length=48).input_ids
        assert fed[0] == tok.bos_token_id, "LLaMA-style: the tokenizer prepends <s>"
        assert e["input_tokens"] == usage["prompt_tokens"] == len(fed)
        assert e["untruncated_input_tokens"] == len(tok(prompt).input_ids) and e["truncated"] is (
            len(fed) < len(tok(prompt).input_ids)
        )
        assert e["output_tokens"] == usage["completion_tokens"] == runner.generate([prompt], [limit])[0].output_tokens
        assert e["ttft_ms"] is None, "set for streamed responses only"
    s = events[ids[-1]]
    assert (
        s["output_tokens"] == chunks[-1].usage.completion_tokens and s["input_tokens"] == chunks[-1].usage.prompt_tokens
    )
    assert 0 < s["ttft_ms"] < s["latency_ms"] and s["model"] == answers[0].json()["model"]
