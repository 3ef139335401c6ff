"""The model runner: one interface over encoder-decoder (T5), decoder-only (GPT-2, Mistral) and
encoder-only (BERT) TF models.

Token accounting lives here because only here are the exact ids known: ``input_tokens`` is the
length of the id list actually fed to the model (after truncation, special tokens included,
padding excluded), ``output_tokens`` the number of ids generated for that row (up to and
including the first EOS, never the prompt, the decoder start token or padding).

Two ways to generate, with the same tokens: ``generate_encoded`` (HF ``generate``, the whole
loop in one XLA call: the fastest for a non-streamed batch) and ``start_decoding`` (the step-wise
loop of :mod:`tokenaudit.inference.stepwise`, one call per token: a streamed row's tokens exist
as soon as they are decoded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tokenaudit.inference.shapes import as_token_ids, bucket_for, count_generated, parse_buckets
from tokenaudit.inference.stepwise import Decoding, StepDecoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded through the TFAuto classes."""


class WrongModelKind(ValueError):
    """The loaded model cannot do what was asked (generate with an encoder, embed with a generator)."""


class InvalidPrompt(ValueError):
    """The tokenizer refused the prompt (a lone surrogate makes the Rust tokenizer raise): a 400
    for that request alone, never an error of the batch it would have joined."""


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    untruncated: int

    @property
    def truncated(self) -> bool:
        return self.untruncated > len(self.ids)


@dataclass(frozen=True)
class Generated:
    input_tokens: int
    untruncated_input_tokens: int
    truncated: bool
    output_ids: list[int]
    finish_reason: str  # "stop" (EOS produced) or "length" (max_new_tokens reached)

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)


@dataclass(frozen=True)
class Decoded(Generated):
    """A row of a step-wise decode: also when its first and last tokens existed (perf_counter)."""

    first_token_at: float | None = None
    last_token_at: float | None = None


def model_kind(config) -> str:
    """ "seq2seq", "causal" or "encoder", from the config and transformers' own TF auto mappings.

    BERT-like families appear in the causal-LM mapping too (as decoders of encoder-decoder
    pairs); they generate only when their config says ``is_decoder``, else loading one as a
    causal LM makes a generator that never emits an end token."""
    from transformers.models.auto.modeling_tf_auto import (
        TF_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        TF_MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    kind = config.model_type
    if kind in TF_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        kind not in TF_MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False)
    ):
        return "causal"
    return "encoder"


def _device_name() -> str:
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name


class ModelRunner:
    """Loads a checkpoint and runs batched greedy generation with exact per-row accounting.

    Not thread-safe by design: the micro-batcher calls it from its one worker thread.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        max_input_tokens: int = 512,
        xla: bool = False,
        batch_buckets: str = "1,16",
        length_buckets: str = "64,512",
        new_token_buckets: str = "16,256",  # noqa: S107 (token counts, not a credential)
        max_batch: int = 16,
        max_new_tokens_limit: int = 256,
        model_name: str | None = None,
    ):
        self.name_or_path = name_or_path
        self.model_name = model_name or _short_name(name_or_path)
        self.max_input_tokens = max_input_tokens
        self.xla = xla
        self.batch_buckets = parse_buckets(batch_buckets, max_batch)
        self.length_buckets = parse_buckets(length_buckets, max_input_tokens)
        self.new_token_buckets = parse_buckets(new_token_buckets, max_new_tokens_limit)
        # transformers' classes are chosen per checkpoint (AutoTokenizer, TFAuto*): typed Any
        self.tokenizer: Any = None
        self._backend: Tokenizer | None = None  # private copy of the fast tokenizer's Rust backend, see tokenize()
        self._specials = 0
        self.model: Any = None
        self.device = ""
        self.kind = ""
        self.encoder_decoder = False
        self.eos_ids: set[int] = set()
        self._compiled: Callable | None = None
        self._compiled_shapes: set[tuple[int, int, int]] = set()
        self.stepper: StepDecoder | None = None  # None: this model cannot decode step-wise (then: generate)
        self._step_shapes: set[tuple[int, int, int]] = set()
        self._embed: Callable | None = None
        self._embed_shapes: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    @property
    def can_generate(self) -> bool:
        return self.kind in ("seq2seq", "causal")

    @property
    def can_embed(self) -> bool:
        return self.kind == "encoder"

    # --- loading ----------------------------------------------------------------------------
    def load(self) -> ModelRunner:
        try:
            from transformers import (
                AutoConfig,
                AutoTokenizer,
                TFAutoModel,
                TFAutoModelForCausalLM,
                TFAutoModelForSeq2SeqLM,
            )

            config = AutoConfig.from_pretrained(self.name_or_path)
            self.kind = model_kind(config)
            self.encoder_decoder = self.kind == "seq2seq"
            cls = {"seq2seq": TFAutoModelForSeq2SeqLM, "causal": TFAutoModelForCausalLM}.get(self.kind, TFAutoModel)
            self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            self.model = cls.from_pretrained(self.name_or_path)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for bad checkpoints
            raise ModelLoadError(f"cannot load model {self.name_or_path!r}: {exc}") from exc
        tok = self.use_tokenizer(self.tokenizer)
        self.pad_id = tok.pad_token_id
        self._fit_positions(config)
        self.device = _device_name()
        import tensorflow as tf

        if self.can_generate:
            gen = self.model.generation_config
            eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
            self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            if self.xla:
                self._compiled = tf.function(self._generate_graph, jit_compile=True)
            try:
                self.stepper = StepDecoder(self.model, xla=self.xla, pad_id=self.pad_id, eos_ids=self.eos_ids)
            except NotImplementedError as exc:
                log.warning("streamed responses of %s arrive in one chunk: %s", self.model_name, exc)
        elif self.xla:
            self._embed = tf.function(self._embed_graph, jit_compile=True)
        log.info("loaded %s (%s) on %s, xla=%s", self.model_name, self.kind, self.device, self.xla)
        return self

    def use_tokenizer(self, tok):
        """Adopt ``tok`` (done by ``load``; tests of tokenization use it without a model)."""
        if tok.pad_token_id is None:  # GPT-2 checkpoints often have none; EOS is the usual stand-in
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self._specials = tok.num_special_tokens_to_add(pair=False)
        self._backend = None
        if tok.is_fast:
            from tokenizers import Tokenizer

            # A copy of our own: HF's __call__ sets truncation and padding on its backend per
            # call (shared state), so other users of ``self.tokenizer`` cannot leak into ours.
            self._backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        return tok

    def _fit_positions(self, config) -> None:
        """Models with absolute position embeddings fail on longer inputs (an opaque 500 per
        request); cap truncation so prompt (+ generated tokens, decoder-only) always fits."""
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if not positions:
            return
        cap = positions if self.kind != "causal" else positions - self.new_token_buckets[-1]
        if cap < 8:
            raise ModelLoadError(
                f"model {self.name_or_path!r} has {positions} positions: too few for "
                f"{self.new_token_buckets[-1]} new tokens (lower TOKENAUDIT_MAX_NEW_TOKENS_LIMIT)"
            )
        if self.max_input_tokens > cap:
            log.warning(
                "max_input_tokens %d exceeds what %s can take; truncating inputs to %d tokens",
                self.max_input_tokens,
                self.model_name,
                cap,
            )
            self.max_input_tokens = cap
            self.length_buckets = sorted({min(b, cap) for b in self.length_buckets})

    def warmup(self, all_buckets: bool = False) -> float:
        """Compile XLA buckets before serving: every batch bucket at the smallest length and
        new-token buckets (what short requests hit), or all of them with ``all_buckets``. A
        generator compiles ``generate`` (non-streamed batches) and the step-wise prefill and
        step (streamed batches) per bucket; an encoder its forward pass per (batch, length).

        Measured on a 2-core CPU box: the first compile ~13-25 s, each further shape 3-20 s, so
        compiling the full grid (default 2 x 2 x 2) before /readyz would hold start-up for
        minutes. Larger buckets compile on first use instead (one stall, logged), and every
        shape is compiled at most once."""
        start = time.perf_counter()
        if not self.xla:
            if self.can_generate:
                self.generate(["warm up"], [2])
            else:
                self.embed_encoded([self.tokenize("warm up")])
            return time.perf_counter() - start
        lengths = self.length_buckets if all_buckets else self.length_buckets[:1]
        news = self.new_token_buckets if all_buckets else self.new_token_buckets[:1]
        for b in self.batch_buckets:
            for length in lengths:
                mask = np.zeros((b, length), np.int32)
                mask[:, 0 if self.kind != "causal" else -1] = 1
                ids = np.full((b, length), self.pad_id, np.int32)
                if not self.can_generate:
                    self._run_embed(ids, mask)
                    continue
                for new in news:
                    self._run(ids, mask, new)
                    if self.stepper is not None:  # a prefill and one step compile both functions
                        t0 = time.perf_counter()
                        self.stepper.step(self.stepper.prefill(ids, mask, new))
                        self._step_shapes.add((b, length, new))
                        log.info(
                            "xla step-wise bucket batch=%d len=%d new=%d compiled in %.1fs",
                            b,
                            length,
                            new,
                            time.perf_counter() - t0,
                        )
        return time.perf_counter() - start

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> Encoded:
        """One prompt's ids, tokenized once, truncated on the ids. Thread-safe; meant for the
        request side (a small thread pool), never the model thread.

        ``encode_batch`` of one text releases the GIL (``encode`` does not: measured, a 1 MB
        prompt held it ~1.9 s), so a long prompt stalls neither the event loop nor the batcher.
        Truncation cuts the content ids to ``max_input_tokens`` minus the special tokens the
        tokenizer adds, then adds them (T5's trailing ``</s>`` stays last), which is what the
        tokenizer's own ``truncation=True`` does (tested for T5 and GPT-2), without encoding the
        text a second time."""
        backend = self._backend
        if backend is None:
            return self._tokenize_slow(prompt)
        try:
            (content,) = backend.encode_batch([prompt], add_special_tokens=False)
        except Exception as exc:  # TypeError for a lone surrogate; whatever else the tokenizer refuses
            raise InvalidPrompt(f"the tokenizer cannot encode this prompt ({type(exc).__name__})") from None
        untruncated = len(content.ids) + self._specials
        if untruncated > self.max_input_tokens:
            content.truncate(max(0, self.max_input_tokens - self._specials))
        return Encoded(backend.post_process(content, None, True).ids, untruncated)

    def _tokenize_slow(self, prompt: str) -> Encoded:
        """The same rule for tokenizers without a Rust backend."""
        tok = self.tokenizer
        try:
            content = tok(prompt, add_special_tokens=False)["input_ids"]
        except Exception as exc:
            raise InvalidPrompt(f"the tokenizer cannot encode this prompt ({type(exc).__name__})") from None
        untruncated = len(content) + self._specials
        if untruncated > self.max_input_tokens:
            content = content[: max(0, self.max_input_tokens - self._specials)]
        return Encoded(list(tok.build_inputs_with_special_tokens(content)), untruncated)

    def encode(self, prompts: Sequence[str]) -> list[Encoded]:
        return [self.tokenize(p) for p in prompts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids. With a Rust backend, its own decode without the Python
        side's optional space clean-up: the same text a client reassembles from a stream
        (:class:`tokenaudit.inference.streaming.TextDeltas` decodes with the same backend)."""
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text_deltas(self):
        """An incremental decoder for one stream of ids (see :mod:`tokenaudit.inference.streaming`)."""
        from tokenaudit.inference.streaming import TextDeltas

        return TextDeltas(self._backend, self.tokenizer)

    # --- generation ---------------------------------------------------------------------------
    def _generate_graph(self, input_ids, attention_mask, max_new_tokens: int):
        return self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False
        )

    def _run(self, ids: np.ndarray, mask: np.ndarray, max_new: int) -> np.ndarray:
        import tensorflow as tf

        args = (tf.constant(ids), tf.constant(mask))
        if self._compiled is not None:
            shape = (ids.shape[0], ids.shape[1], max_new)
            if shape not in self._compiled_shapes:
                t0 = time.perf_counter()
                out = as_token_ids(self._compiled(*args, max_new_tokens=max_new))
                self._compiled_shapes.add(shape)
                log.info("xla bucket batch=%d len=%d new=%d compiled in %.1fs", *shape, time.perf_counter() - t0)
                return out
            return as_token_ids(self._compiled(*args, max_new_tokens=max_new))
        return as_token_ids(self._generate_graph(*args, max_new_tokens=max_new))

    def generate(self, prompts: Sequence[str], max_new_tokens: Sequence[int]) -> list[Generated]:
        """Greedy generation for a batch; each row is accounted on its own limit."""
        encoded = self.encode(prompts)
        return self.generate_encoded(encoded, max_new_tokens)

    def _require(self, what: str) -> None:
        able = self.can_generate if what == "generate" else self.can_embed
        if not able:
            raise WrongModelKind(f"model {self.model_name} ({self.kind or 'not loaded'}) cannot {what}")

    def _padded(self, encoded: Sequence[Encoded], want_new: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The batch as (ids, mask, new-token budget), padded to the XLA bucket when compiling:
        right padding for encoders, left padding for decoder-only models (they continue from the
        last column). Filler rows of a padded batch bucket hold one pad token and are ignored."""
        n = len(encoded)
        longest = max(len(e.ids) for e in encoded)
        if self.xla:
            rows = bucket_for(n, self.batch_buckets)
            width = bucket_for(longest, self.length_buckets)
            new = bucket_for(want_new, self.new_token_buckets)
        else:
            rows, width, new = n, longest, want_new
        left = self.kind == "causal"
        ids = np.full((rows, width), self.pad_id, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for i, e in enumerate(encoded):
            k = len(e.ids)
            if left:
                ids[i, width - k :], mask[i, width - k :] = e.ids, 1
            else:
                ids[i, :k], mask[i, :k] = e.ids, 1
        mask[n:, -1 if left else 0] = 1
        return ids, mask, new

    def generate_encoded(self, encoded: Sequence[Encoded], max_new_tokens: Sequence[int]) -> list[Generated]:
        self._require("generate")
        ids, mask, new = self._padded(encoded, max(max_new_tokens))
        with self._lock:
            seqs = self._run(ids, mask, new)
        # Encoder-decoder output starts with the decoder start token; decoder-only output
        # repeats the padded prompt. Either way, what follows is what was generated.
        start = 1 if self.encoder_decoder else ids.shape[1]
        results = []
        for i, e in enumerate(encoded):
            out, reason = count_generated(seqs[i, start:].tolist(), self.eos_ids, max_new_tokens[i])
            results.append(Generated(len(e.ids), e.untruncated, e.truncated, out, reason))
        return results

    # --- step-wise generation (streaming) ------------------------------------------------------------
    def start_decoding(self, encoded: Sequence[Encoded], max_new_tokens: Sequence[int]) -> Decoding:
        """Prefill a batch for step-wise decoding: each row has its first token when this returns;
        call ``step()`` on the result until ``done``, then :meth:`decoded` gives the rows. Rows end
        on their own limits, and the loop ends when all of them have."""
        self._require("generate")
        stepper = self.stepper
        if stepper is None:
            raise WrongModelKind(f"model {self.model_name} cannot decode step-wise")
        ids, mask, new = self._padded(encoded, max(max_new_tokens))
        limits = list(max_new_tokens) + [1] * (ids.shape[0] - len(encoded))  # filler rows end at once
        return self._decoding(stepper, ids, mask, limits, new)

    def _decoding(
        self, stepper: StepDecoder, ids: np.ndarray, mask: np.ndarray, limits: list[int], new: int
    ) -> Decoding:
        shape = (ids.shape[0], ids.shape[1], new)
        if self.xla and shape not in self._step_shapes:  # prefill compiles now, step on the first step
            self._step_shapes.add(shape)
            log.info("xla step-wise bucket batch=%d len=%d new=%d compiles on first use", *shape)
        return Decoding(stepper, ids, mask, limits, new, self.eos_ids, self._lock)

    def decoded(self, decoding: Decoding, encoded: Sequence[Encoded]) -> list[Decoded]:
        return [
            Decoded(
                len(e.ids),
                e.untruncated,
                e.truncated,
                row.ids,
                row.finish_reason or "length",
                row.first_token_at,
                row.last_token_at,
            )
            for e, row in zip(encoded, decoding.rows)
        ]

    # --- embeddings ---------------------------------------------------------------------------------
    def _embed_graph(self, input_ids, attention_mask):
        """Mean of the last hidden state over the real (unmasked) tokens, then L2-normalised (as
        OpenAI's embeddings are: a dot product is the cosine). Mean pooling is the common
        choice for encoders without a trained pooling head (sentence-transformers' default)."""
        import tensorflow as tf

        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        weights = tf.cast(tf.expand_dims(attention_mask, -1), hidden.dtype)
        pooled = tf.reduce_sum(hidden * weights, axis=1) / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)
        return tf.math.l2_normalize(pooled, axis=-1)

    def _run_embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        args = (tf.constant(ids), tf.constant(mask))
        if self._embed is None:
            return self._embed_graph(*args).numpy()
        shape = ids.shape
        t0 = time.perf_counter()
        out = self._embed(*args).numpy()
        if shape not in self._embed_shapes:
            self._embed_shapes.add(shape)
            log.info("xla embedding bucket batch=%d len=%d compiled in %.1fs", *shape, time.perf_counter() - t0)
        return out

    def embed_encoded(self, encoded: Sequence[Encoded]) -> np.ndarray:
        """One float32 vector per input, in order (rows beyond the largest batch bucket run in
        several calls)."""
        self._require("embed")
        step = self.batch_buckets[-1]
        parts = []
        for first in range(0, len(encoded), step):
            chunk = encoded[first : first + step]
            ids, mask, _ = self._padded(chunk, 1)
            with self._lock:
                parts.append(self._run_embed(ids, mask)[: len(chunk)])
        return np.concatenate(parts).astype(np.float32, copy=False)


def _short_name(name_or_path: str) -> str:
    return name_or_path.rstrip("/").rsplit("/", 1)[-1] or name_or_path
