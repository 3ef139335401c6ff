"""Greedy decoding one token at a time, so that each row's tokens can leave as they are made.

HF's TF ``generate`` has no streamer: its greedy search is one ``tf.while_loop`` that returns
when every row is done. This module runs the body of that loop (``greedy_search_body_fn`` in
transformers/generation/tf_utils.py) from Python instead: a prefill (T5: the encoder once and
the first decoder step; decoder-only models: the whole prompt once) and then one step per
token over the key/value cache. Same model calls, same logits processors, same cache updates,
so the same tokens as ``generate`` (tested for T5, GPT-2 and Mistral).

With XLA the cache is padded to a static length the way HF's XLA generation pads it
(``_update_model_kwargs_for_xla_generation``): one shape bucket (batch, input length, new
tokens) compiles one prefill and one step function, once, and every token of every later
batch of that bucket reuses them. Without XLA the cache grows by concatenation, as eager
``generate`` does.

The private HF helpers used here (``_update_model_kwargs_for_*``, ``_get_logits_processor``,
``_prepare_decoder_input_ids_for_generation``) are used nowhere else: a transformers upgrade
that changes them breaks only this module, and the equality tests say so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class _Row:
    limit: int
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # None while the row still decodes
    first_token_at: float | None = None
    last_token_at: float | None = None


class Decoding:
    """One batch being decoded: call :meth:`step` until :attr:`done`; after each call,
    :attr:`new_tokens` holds the token each row just got (None for rows already finished).

    Rows end on EOS ("stop"), on their own ``max_new_tokens`` ("length"), or when
    :meth:`cancel` is called for them ("cancelled": the client left; what the row produced so
    far was still spent and stays accounted). The loop ends as soon as every row has ended, so a
    batch of short requests does not run to the end of its new-token bucket."""

    def __init__(
        self,
        decoder: StepDecoder,
        ids: np.ndarray,
        mask: np.ndarray,
        limits: Sequence[int],
        max_new: int,
        eos_ids: set[int],
        lock: threading.Lock | None = None,
    ):
        self._decoder = decoder
        self._eos = eos_ids
        self._lock = lock or threading.Lock()
        self.rows = [_Row(limit) for limit in limits]
        self.steps = 0
        self.new_tokens: list[int | None] = []
        self._max_new = max_new
        with self._lock:
            self._state = decoder.prefill(ids, mask, max_new)
            self._take(self._state["next_tokens"])

    @property
    def done(self) -> bool:
        return all(r.finish_reason is not None for r in self.rows) or self.steps >= self._max_new

    def cancel(self, i: int) -> None:
        row = self.rows[i]
        if row.finish_reason is None:
            row.finish_reason = "cancelled"

    def step(self) -> list[int | None]:
        if self.done:
            raise RuntimeError("decoding already finished")
        with self._lock:
            self._state = self._decoder.step(self._state)
            self._take(self._state["next_tokens"])
        return self.new_tokens

    def _take(self, tokens: Any) -> None:
        now = time.perf_counter()
        self.steps += 1
        got = np.asarray(tokens).tolist()
        self.new_tokens = []
        for row, tok in zip(self.rows, got):
            if row.finish_reason is not None:
                self.new_tokens.append(None)
                continue
            row.ids.append(tok)
            row.last_token_at = now
            if row.first_token_at is None:
                row.first_token_at = now
            if tok in self._eos:
                row.finish_reason = "stop"
            elif len(row.ids) >= row.limit:
                row.finish_reason = "length"
            self.new_tokens.append(tok)
        if self.done:
            for row in self.rows:
                if row.finish_reason is None:  # the bucket's new-token limit (never below a row's own)
                    row.finish_reason = "length"


class StepDecoder:
    """Prefill and step functions of one loaded generative model (encoder-decoder or decoder-only)."""

    def __init__(self, model, *, xla: bool, pad_id: int, eos_ids: set[int]):
        import inspect

        import tensorflow as tf

        self.model = model
        self.xla = xla
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        gen = model.generation_config
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else pad_id
        self.eos = tf.constant(sorted(eos_ids), tf.int32)
        if "use_mems" in inspect.signature(model.prepare_inputs_for_generation).parameters:
            raise NotImplementedError(
                f"{type(model).__name__} needs its full input at every step (use_mems): "
                "not supported by the step-wise decoder"
            )
        # GPT-2 keeps its cache as one stacked tensor per layer with the batch on axis 1 (HF's rule)
        self.batch_axis = 1 if any(p in type(model).__name__ for p in ("TFGPT2", "TFCTRL")) else 0
        self._processors: dict[int, Any] = {}
        if xla:
            self._prefill = tf.function(self._prefill_graph, jit_compile=True)
            self._step = tf.function(self._step_graph, jit_compile=True)
        else:
            self._prefill, self._step = self._prefill_graph, self._step_graph

    # --- public: host-side calls ----------------------------------------------------------------
    def prefill(self, ids: np.ndarray, mask: np.ndarray, max_new: int) -> dict:
        """The first token of every row; returns the state :meth:`step` continues from (tensors
        only, plus the two static lengths under ``"static"``)."""
        import tensorflow as tf

        input_len = 1 if self.encoder_decoder else ids.shape[1]
        static = (input_len, input_len + max_new)
        state = self._prefill(tf.constant(ids, tf.int32), tf.constant(mask, tf.int32), static)
        if self.xla:  # a tensor, so that every step of the bucket reuses one compiled function
            state["cur_len"] = tf.constant(input_len + 1, tf.int32)
        state["static"] = static
        return state

    def step(self, state: dict) -> dict:
        static = state.pop("static")
        state.pop("next_tokens", None)
        out = self._step(state, static)
        out["static"] = static
        return out

    # --- the loop body (traced for XLA, or run eagerly) ----------------------------------------------
    def _logits_processor(self, input_len: int):
        """HF's processors for the model's generation config (none for a plain greedy config)."""
        procs = self._processors.get(input_len)
        if procs is None:
            import copy

            from transformers.generation.tf_logits_process import TFLogitsProcessorList

            config = copy.deepcopy(self.model.generation_config)
            procs = self._processors[input_len] = self.model._get_logits_processor(
                generation_config=config, input_ids_seq_length=input_len, logits_processor=TFLogitsProcessorList()
            )
        return procs

    def _prefill_graph(self, ids, mask, static: tuple[int, int]) -> dict:
        import tensorflow as tf

        model = self.model
        input_len, max_length = static
        batch = ids.shape[0]
        kwargs: dict[str, Any] = {"attention_mask": mask}
        if self.encoder_decoder:
            encoder = model.get_encoder()
            kwargs["encoder_outputs"] = encoder(
                input_ids=ids,
                attention_mask=mask,
                return_dict=True,
                output_attentions=False,
                output_hidden_states=False,
            )
            start, _ = model._prepare_decoder_input_ids_for_generation(
                batch_size=batch,
                model_input_name="input_ids",
                model_kwargs={},
                decoder_start_token_id=model.generation_config.decoder_start_token_id,
                bos_token_id=model.generation_config.bos_token_id,
            )
            input_ids = tf.cast(start, tf.int32)
        else:
            input_ids = ids
        padding = tf.fill((batch, max_length - input_len), tf.constant(self.pad_id, tf.int32))
        generated = tf.concat([input_ids, padding], axis=-1)
        finished = tf.zeros((batch,), tf.bool)
        state = self._body(generated, finished, input_len, kwargs, static)
        if self.encoder_decoder:  # the step function takes the encoder's states as a plain tensor
            state["encoder_hidden"] = state["kwargs"].pop("encoder_outputs").last_hidden_state
        return state

    def _step_graph(self, state: dict, static: tuple[int, int]) -> dict:
        kwargs = dict(state["kwargs"])
        if self.encoder_decoder:
            from transformers.modeling_tf_outputs import TFBaseModelOutput

            kwargs["encoder_outputs"] = TFBaseModelOutput(last_hidden_state=state["encoder_hidden"])
        out = self._body(state["generated"], state["finished"], state["cur_len"], kwargs, static)
        if self.encoder_decoder:
            out["encoder_hidden"] = out["kwargs"].pop("encoder_outputs").last_hidden_state
        return out

    def _body(self, generated, finished, cur_len, kwargs: dict, static: tuple[int, int]) -> dict:
        """``greedy_search_body_fn`` of transformers' TF generation, without the outputs we never
        ask for (scores, attentions, hidden states)."""
        import tensorflow as tf

        model = self.model
        input_len, max_length = static
        batch = generated.shape[0]
        if kwargs.get("past_key_values") is None:
            input_ids = generated[:, :cur_len]
        else:
            input_ids = tf.expand_dims(generated[:, cur_len - 1], -1)
        inputs = model.prepare_inputs_for_generation(input_ids, use_cache=True, **kwargs)
        outputs = model(**inputs, return_dict=True, output_attentions=False, output_hidden_states=False)
        scores = self._logits_processor(input_len)(generated, outputs.logits[:, -1], cur_len)
        next_tokens = tf.argmax(scores, axis=-1, output_type=tf.int32)
        unfinished = 1 - tf.cast(finished, tf.int32)
        next_tokens = next_tokens * unfinished + self.pad_id * (1 - unfinished)
        is_eos = tf.reduce_any(
            tf.equal(tf.broadcast_to(next_tokens, (self.eos.shape[0], batch)), tf.expand_dims(self.eos, -1)), axis=0
        )
        finished = finished | is_eos
        update = tf.stack([tf.range(batch), tf.broadcast_to(cur_len, [batch])], axis=-1)
        generated = tf.tensor_scatter_nd_update(generated, update, next_tokens)
        cur_len = cur_len + 1
        if self.xla:
            kwargs = model._update_model_kwargs_for_xla_generation(
                model_outputs=outputs,
                model_kwargs=kwargs,
                cur_len=cur_len,
                max_length=max_length,
                batch_size=batch,
                is_encoder_decoder=self.encoder_decoder,
                batch_axis=self.batch_axis,
            )
        else:
            kwargs = model._update_model_kwargs_for_generation(outputs, kwargs, is_encoder_decoder=self.encoder_decoder)
        return {
            "generated": generated,
            "finished": finished,
            "cur_len": cur_len,
            "next_tokens": next_tokens,
            "kwargs": kwargs,
        }
