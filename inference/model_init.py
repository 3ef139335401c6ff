"""Build the offline models: a tiny but real T5 (the default), GPT-2, Mistral (the LLaMA family:
RMSNorm, rotary positions, SwiGLU) or BERT with seeded weights and a tokenizer of its family
trained locally, so the whole pipeline runs with no network and no downloads.

The weights are random (seeded) on purpose: the project audits token usage, and what matters is
that the architecture, tokenizer and `generate` path are the real Hugging Face ones, so the
accounting code is exercised exactly as with a production checkpoint. Dimensions are tiny so
CPU generation takes milliseconds per token.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenaudit.errors import ModelInitError

log = logging.getLogger(__name__)

PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"
VOCAB_SIZE = 2000
MARKER = "tokenaudit_model.json"  # written last: its presence means the build completed


def _corpus_files(limit_bytes: int = 6 << 20) -> list[str]:
    """Plain text already on every machine: licences, docs and the stdlib's own sources."""
    roots = [Path("/usr/share/common-licenses"), Path(os.path.dirname(os.__file__))]
    files: list[str] = []
    total = 0
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if total >= limit_bytes:
                break
            if "site-packages" in path.parts or not path.is_file() or path.suffix not in ("", ".py", ".txt"):
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if 0 < size < 400_000:
                files.append(str(path))
                total += size
    return files


def _fallback_corpus() -> Iterator[str]:
    # Used only if the machine has no readable text at all (a scratch container).
    import codecs
    import this

    yield codecs.decode(this.s, "rot13")
    for name in sorted(sys.modules):
        doc = getattr(sys.modules[name], "__doc__", None)
        if isinstance(doc, str):
            yield doc


#: The families ``model init --arch`` builds: what each can do and the transformers TF class that
#: loads it (the runner picks its class from the config the same way, see runner.model_kind).
ARCHS = {"t5": "generate", "gpt2": "generate", "mistral": "generate", "bert": "embed"}
BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ModelInitError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")


def _train(tok, specials: list[str], vocab_size: int, trainer_cls) -> None:
    from tokenizers import pre_tokenizers

    extra = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()} if trainer_cls.__name__ == "BpeTrainer" else {}
    trainer = trainer_cls(vocab_size=vocab_size, special_tokens=specials, show_progress=False, **extra)
    files = _corpus_files()
    if files:
        tok.train(files, trainer)
    else:
        tok.train_from_iterator(_fallback_corpus(), trainer)


def _train_wordpiece(vocab_size: int):
    """BERT's own scheme: lower-cased WordPiece, ``[CLS] text [SEP]``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = [BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK]
    tok = Tokenizer(models.WordPiece(unk_token=BERT_UNK))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    _train(tok, specials, vocab_size, trainers.WordPieceTrainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BERT_CLS} $A {BERT_SEP}",
        pair=f"{BERT_CLS} $A {BERT_SEP} $B {BERT_SEP}",
        special_tokens=[(t, tok.token_to_id(t)) for t in (BERT_CLS, BERT_SEP)],
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token=BERT_UNK,
        sep_token=BERT_SEP,
        pad_token=BERT_PAD,
        cls_token=BERT_CLS,
        mask_token=BERT_MASK,
        model_max_length=512,
    )


def train_tokenizer(arch: str, vocab_size: int = VOCAB_SIZE):
    """Train a tokenizer of ``arch``'s kind and wrap it in that family's transformers fast class:
    byte-level BPE for T5, GPT-2 and Mistral (T5 appends ``</s>``, Mistral prepends ``<s>`` as
    LLaMA's tokenizer does), WordPiece for BERT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    _check_arch(arch)
    if arch == "bert":
        return _train_wordpiece(vocab_size)
    specials = [PAD, EOS, UNK] if arch == "t5" else [PAD, EOS, UNK, BOS]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _train(tok, specials, vocab_size, trainers.BpeTrainer)
    if arch == "t5":
        # T5 appends </s> to every encoder input; the tokenizer (not our code) does it.
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
        )
        from transformers import T5TokenizerFast

        return T5TokenizerFast(
            tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, extra_ids=0, model_max_length=512
        )
    if arch == "mistral":
        from transformers import LlamaTokenizerFast

        # LLaMA's fast tokenizer writes its own post-processor (BOS first) from add_bos_token.
        return LlamaTokenizerFast(
            tokenizer_object=tok,
            pad_token=PAD,
            eos_token=EOS,
            unk_token=UNK,
            bos_token=BOS,
            add_bos_token=True,
            add_eos_token=False,
            legacy=False,
            model_max_length=512,
        )
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, bos_token=BOS, model_max_length=512
    )


def _build_model(arch: str, tokenizer, seed: int):
    import tensorflow as tf

    _check_arch(arch)
    tf.keras.utils.set_random_seed(seed)
    vocab = len(tokenizer)
    if arch == "t5":
        from transformers import T5Config, TFT5ForConditionalGeneration

        t5_config = T5Config(
            vocab_size=vocab,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=16,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        model = TFT5ForConditionalGeneration(t5_config)
        ids = tf.constant([[5, 6, 7, tokenizer.eos_token_id]])
        model(input_ids=ids, decoder_input_ids=tf.constant([[tokenizer.pad_token_id]]))
    elif arch == "gpt2":
        from transformers import GPT2Config, TFGPT2LMHeadModel

        gpt2_config = GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = TFGPT2LMHeadModel(gpt2_config)
        model(input_ids=tf.constant([[5, 6, 7]]))
    elif arch == "mistral":
        from transformers import MistralConfig, TFMistralForCausalLM

        # grouped-query attention (4 query heads share 2 key/value heads), as Mistral and LLaMA 2+ do
        mistral_config = MistralConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            sliding_window=None,
            attention_dropout=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = TFMistralForCausalLM(mistral_config)
        model(input_ids=tf.constant([[5, 6, 7]]))
    else:  # bert: an encoder, no head; /v1/embeddings pools its last hidden state
        from transformers import BertConfig, TFBertModel

        bert_config = BertConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = TFBertModel(bert_config)
        model(input_ids=tf.constant([[5, 6, 7]]))
        return model
    # Random weights make greedy decoding favour whichever row is largest; a zero row for <pad>
    # (tied input/output embeddings) keeps the model from "generating padding", which would
    # make real output indistinguishable from pad columns when reading the accounting.
    # Mistral's output layer is its own (untied): its <pad> column is zeroed as well.
    if arch == "mistral":  # its main layer has no get_input_embeddings()
        _zero_row(model.model.embed_tokens.embeddings, tokenizer.pad_token_id)
        _zero_row(model.lm_head.kernel, tokenizer.pad_token_id, axis=1)
    else:
        _zero_row(model.get_input_embeddings().weights[0], tokenizer.pad_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _zero_row(weight, index: int, axis: int = 0) -> None:
    values = weight.numpy()
    if axis == 0:
        values[index] = 0.0
    else:
        values[:, index] = 0.0
    weight.assign(values)


def _weights_by_name(model) -> dict:
    # Keras prefixes names with a per-instance scope ("tf_t5..._1/"); compare what follows it.
    return {w.name.split("/", 1)[-1]: w.numpy() for w in model.weights}


def _verify(path: Path, expected: dict) -> None:
    """Reload with from_pretrained and require every weight to load with identical values."""
    import numpy as np
    from transformers import AutoTokenizer, TFAutoModel, TFAutoModelForCausalLM, TFAutoModelForSeq2SeqLM

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.is_fast or tokenizer.pad_token_id is None:
        raise ModelInitError(f"tokenizer in {path} did not reload as a fast tokenizer with a pad token")
    cls = {"t5": TFAutoModelForSeq2SeqLM, "bert": TFAutoModel}.get(expected["arch"], TFAutoModelForCausalLM)
    model, info = cls.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ModelInitError(f"model in {path} did not reload intact: {problems}")
    got = _weights_by_name(model)
    if set(got) != set(expected["weights"]):
        raise ModelInitError(
            f"model in {path}: weight names differ after reload ({sorted(set(got) ^ set(expected['weights']))[:4]})"
        )
    for name, value in expected["weights"].items():
        if not np.array_equal(got[name], value):
            raise ModelInitError(f"model in {path}: weight {name} differs after reload")


def is_built(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def build_default_model(path: str | Path, seed: int = 1234, arch: str = "t5", force: bool = False) -> bool:
    """Build a tiny ``arch`` (a key of :data:`ARCHS`) model with its tokenizer at ``path``.

    Idempotent: returns False (and does nothing) when a complete build is already there. The
    build goes to a temporary sibling folder and is renamed into place, so a crash never
    leaves a half-written model that a later start would try to load.
    """
    import json

    path = Path(path)
    if is_built(path) and not force:
        return False
    _check_arch(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(arch)
    model = _build_model(arch, tokenizer, seed)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        work = Path(tmp) / "model"
        tokenizer.save_pretrained(work)
        model.save_pretrained(work)
        _verify(work, {"arch": arch, "weights": _weights_by_name(model)})
        (work / MARKER).write_text(json.dumps({"arch": arch, "seed": seed, "vocab_size": len(tokenizer)}))
        if path.exists() and force:
            import shutil

            shutil.rmtree(path)
        try:
            os.replace(work, path)
        except OSError:
            if is_built(path):  # another process finished the same build first: use theirs
                return False
            raise ModelInitError(
                f"cannot move the built model into {path}: it exists and is incomplete "
                f"(remove it and run `tokenaudit model init` again)"
            ) from None
    log.info("built %s model at %s", arch, path)
    return True
