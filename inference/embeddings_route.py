"""``POST /v1/embeddings``: OpenAI's embeddings API for encoder-only models, audited like the
generate routes (one event per request: the input tokens of all inputs, no output tokens). The
request plumbing (readiness, body, batcher, disconnects, the error envelope) is the generate
routes' own, from :mod:`tokenaudit.inference.routes`."""

from __future__ import annotations

import asyncio
import base64
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenaudit.inference.audit import context_of
from tokenaudit.inference.batcher import Overloaded
from tokenaudit.inference.http_io import ApiError
from tokenaudit.inference.rate_limits import reserve
from tokenaudit.inference.routes import _api, _batcher, _body, _outcome, _overloaded, _ready_for
from tokenaudit.inference.runner import InvalidPrompt

#: OpenAI's own bound on the inputs of one embeddings request
MAX_EMBEDDING_INPUTS = 2048


def _embedding_inputs(data: dict) -> list[str]:
    value = data.get("input")
    if value is None:
        raise ApiError(400, "invalid_input", "'input' is required", "input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ApiError(400, "invalid_input", "'input' must be a string or a non-empty list of strings", "input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise ApiError(
            400, "invalid_input", f"'input' holds {len(items)} items; at most {MAX_EMBEDDING_INPUTS}", "input"
        )
    for i, item in enumerate(items):
        if isinstance(item, (int, list)):
            raise ApiError(400, "invalid_input", "token-id input is not supported here: send text", "input")
        if not isinstance(item, str):
            raise ApiError(400, "invalid_input", f"input[{i}] must be a string, got {type(item).__name__}", "input")
        if not item.strip():
            raise ApiError(
                400,
                "invalid_input",
                f"input[{i}] must not be empty" if len(items) > 1 else "'input' must not be empty",
                "input",
            )
    return items


@_api
async def embeddings(request: Request) -> Response:
    """OpenAI's embeddings API for encoder-only models: one vector per input (mean-pooled and
    L2-normalised, see ``ModelRunner._embed_graph``), ``usage`` and the event carrying the input
    tokens of all inputs together (output tokens: 0)."""
    data = await _body(request)
    state = _ready_for(request, "embed")
    ctx = context_of(request.scope)
    inputs = _embedding_inputs(data)
    fmt = data.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "invalid_parameter", "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if data.get("dimensions") is not None:
        raise ApiError(400, "invalid_parameter", f"'dimensions' is not supported by {state.model_name}", "dimensions")
    raw = data["input"]
    ctx.prompt_digest = state.digest(raw if isinstance(raw, str) else json.dumps(inputs, ensure_ascii=False))
    try:
        encoded = await state.tokenize_many(inputs)
    except InvalidPrompt as exc:
        raise ApiError(400, "invalid_input", str(exc), "input") from None
    except Overloaded as exc:
        raise _overloaded(exc) from None
    reserve(request.scope, sum(len(e.ids) for e in encoded))
    state.budgets.hold(ctx, request.scope["path"], sum(len(e.ids) for e in encoded), 0)
    result, gone = await _outcome(
        request, asyncio.ensure_future(_batcher(state).submit_embeddings(encoded)), "embedding_failed"
    )
    ctx.input_tokens = sum(len(e.ids) for e in encoded)
    ctx.untruncated_input_tokens = sum(e.untruncated for e in encoded)
    ctx.truncated = any(e.truncated for e in encoded)
    if result is not None:
        ctx.output_tokens = 0
        ctx.batch_id, ctx.batch_size, ctx.position_in_batch = (
            result.batch_id,
            result.batch_size,
            result.position_in_batch,
        )
        ctx.queue_ms, ctx.inference_ms, ctx.device = result.queue_ms, result.inference_ms, result.device
    if gone:
        return Response(status_code=499)
    if fmt == "base64":  # what OpenAI sends: little-endian float32 bytes (the client decodes them so)
        vectors = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in result.vectors]
    else:
        vectors = [v.tolist() for v in result.vectors]
    return JSONResponse(
        {
            "object": "list",
            "model": state.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": ctx.input_tokens, "total_tokens": ctx.input_tokens},
        }
    )
