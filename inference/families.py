"""Which model families transformers offers in TensorFlow, and what this server does with each:
the source of ``docs/models.md``, generated from transformers' own TF auto mappings so that the
page follows the installed version (tests/test_inference_families.py fails when it drifts).

Regenerate with ``python -m tokenaudit.inference.families > docs/models.md``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tokenaudit.inference.model_init import ARCHS

#: The families `tokenaudit model init --arch` builds and the test suite serves end to end (each
#: arch there is named by its transformers model_type).
TESTED = frozenset(ARCHS)


def tf_families() -> list[dict]:
    """One row per model type with a TF text-generation or text-encoder class."""
    from transformers.models.auto import modeling_tf_auto as auto

    causal = auto.TF_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    seq2seq = auto.TF_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    masked = auto.TF_MODEL_FOR_MASKED_LM_MAPPING_NAMES
    base = auto.TF_MODEL_MAPPING_NAMES
    rows = []
    cls: str | Sequence[str]  # a few families map to several classes (funnel: a tuple of two)
    for kind in sorted(set(causal) | set(seq2seq) | set(masked)):
        if kind in seq2seq:
            serves, cls = "generate, stream (encoder-decoder)", seq2seq[kind]
        elif kind in causal and kind not in masked:
            serves, cls = "generate, stream (decoder-only)", causal[kind]
        else:  # BERT-like: its causal-LM class is a decoder for encoder-decoder pairs (config.is_decoder)
            serves, cls = "embeddings (encoder-only)", base.get(kind, masked[kind])
        rows.append({"model_type": kind, "tf_class": cls, "serves": serves, "tested": kind in TESTED})
    return rows


def models_markdown() -> str:
    import transformers

    rows = tf_families()
    lines = [
        "# Model families",
        "",
        f"What transformers {transformers.__version__} offers in TensorFlow for text, and what the inference",
        "app does with each. Generated from transformers' TF auto mappings by",
        "`python -m tokenaudit.inference.families > docs/models.md` (a test keeps it current).",
        "",
        "- **generate, stream**: `/v1/generate`, `/v1/completions`, `/v1/chat/completions`, with `stream: true`",
        "  sending tokens as they are decoded. `/v1/embeddings` answers 400 `model_cannot_embed`.",
        "- **embeddings**: `/v1/embeddings` (mean of the last hidden state over the attention mask,",
        "  L2-normalised); the generate routes answer 400 `model_cannot_generate`. BERT-like families",
        "  generate only from a checkpoint whose config sets `is_decoder`.",
        "- **tested**: built offline by `tokenaudit model init --arch <family>` and served end to end by the",
        "  test suite with exact token accounting. transformers has no TensorFlow LLaMA class; Mistral is the",
        "  same architecture family (RMSNorm, rotary positions, SwiGLU, grouped-query attention).",
        "",
        "Other families load as far as their checkpoint and tokenizer allow; a checkpoint that does not load",
        "keeps `/readyz` at 503 with the reason. A family whose HF generation needs its whole input at every",
        "step (XLNet's `use_mems`) cannot decode step-wise: its streams arrive in one chunk at the end.",
        "",
        "| model_type | TF class | served as | tested |",
        "|---|---|---|---|",
    ]
    for r in rows:
        classes = [r["tf_class"]] if isinstance(r["tf_class"], str) else list(r["tf_class"])
        tf_class = ", ".join(f"`{c}`" for c in classes)
        lines.append(f"| `{r['model_type']}` | {tf_class} | {r['serves']} | {'yes' if r['tested'] else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(models_markdown())
