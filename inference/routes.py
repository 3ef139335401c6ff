"""HTTP handlers: /v1/generate, the OpenAI-compatible completions routes, health and metrics.

Handlers never log or echo prompt text; they record what the model consumed and produced in the
request's AuditContext, from the ids the runner reports.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tokenaudit.inference.audit import context_of
from tokenaudit.inference.batcher import BatchResult, Overloaded
from tokenaudit.inference.http_io import (ApiError, Disconnected, error_response, optional_bool, optional_int,
                                          read_json_object, require_prompt)
from tokenaudit.inference.metrics import CONTENT_TYPE
from tokenaudit.inference.runner import InvalidPrompt

if TYPE_CHECKING:
    from tokenaudit.inference.app import AppState


def _state(request: Request) -> "AppState":
    return request.app.state.tokenaudit


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _generate(request: Request, prompt: str, max_new: int, param: str = "prompt") -> BatchResult | None:
    """Tokenize one prompt (off the event loop and the model thread), then run it through the
    micro-batcher; None when the client left meanwhile (its tokens are still accounted: the
    model spent them)."""
    state = _state(request)
    ctx = context_of(request.scope)
    if not state.ready:
        raise ApiError(503, "model_not_ready", state.not_ready_reason())
    ctx.prompt_digest = state.digest(prompt)
    try:
        encoded = await state.tokenize(prompt)
    except InvalidPrompt as exc:
        raise ApiError(400, "invalid_prompt", str(exc), param) from None
    except Overloaded as exc:
        raise _overloaded(exc) from None
    job = asyncio.ensure_future(state.batcher.submit(encoded, max_new))
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    gone = not job.done()
    try:
        result = await job
    except Overloaded as exc:
        ctx.queue_ms = exc.queue_ms
        if gone:
            ctx.disconnected, ctx.error_type = True, "client_disconnect"
            return None
        raise _overloaded(exc) from None
    except Exception:
        ctx.error_type = "generation_failed"
        raise
    g = result.generated
    ctx.input_tokens, ctx.untruncated_input_tokens, ctx.truncated = g.input_tokens, g.untruncated_input_tokens, g.truncated
    ctx.output_tokens, ctx.finish_reason = g.output_tokens, g.finish_reason
    ctx.batch_id, ctx.batch_size, ctx.position_in_batch = result.batch_id, result.batch_size, result.position_in_batch
    ctx.queue_ms, ctx.inference_ms, ctx.device = result.queue_ms, result.inference_ms, result.device
    if gone:
        ctx.disconnected, ctx.error_type = True, "client_disconnect"
        return None
    return result


def _overloaded(exc: Overloaded) -> ApiError:
    return ApiError(503, exc.code, f"{exc}; retry later", None, {"Retry-After": str(exc.retry_after_seconds)})


async def _body(request: Request) -> dict:
    return await read_json_object(request, _state(request).settings.max_body_bytes)


def _limits(request: Request) -> tuple[int, int]:
    s = _state(request).settings
    return s.default_max_new_tokens, s.max_new_tokens_limit


def _api(handler):
    """Turn ApiError into the JSON error shape and a vanished client into a bodiless 499."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as err:
            return error_response(request, err)
        except Disconnected:
            ctx = context_of(request.scope)
            ctx.disconnected, ctx.error_type = True, "client_disconnect"
            return Response(status_code=499)

    wrapped.__name__ = handler.__name__
    return wrapped


def _usage_openai(r: BatchResult) -> dict:
    g = r.generated
    return {"prompt_tokens": g.input_tokens, "completion_tokens": g.output_tokens,
            "total_tokens": g.input_tokens + g.output_tokens}


@_api
async def generate(request: Request) -> Response:
    data = await _body(request)
    prompt = require_prompt(data)
    default, limit = _limits(request)
    max_new = optional_int(data, ("max_new_tokens",), default, 1, limit)
    result = await _generate(request, prompt, max_new)
    if result is None:
        return Response(status_code=499)
    g = result.generated
    return JSONResponse({
        "request_id": context_of(request.scope).request_id,
        "model": _state(request).model_name,
        "text": result.text,
        "finish_reason": g.finish_reason,
        "usage": {"input_tokens": g.input_tokens, "output_tokens": g.output_tokens,
                  "total_tokens": g.input_tokens + g.output_tokens,
                  "untruncated_input_tokens": g.untruncated_input_tokens, "truncated": g.truncated},
    })


def _sse(chunks: list[dict]):
    async def gen():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


def _stream_usage(data: dict) -> bool:
    opts = data.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


@_api
async def completions(request: Request) -> Response:
    data = await _body(request)
    prompt = require_prompt(data)
    default, limit = _limits(request)
    max_new = optional_int(data, ("max_tokens",), default, 1, limit)
    stream = optional_bool(data, "stream")
    result = await _generate(request, prompt, max_new)
    if result is None:
        return Response(status_code=499)
    ident = "cmpl-" + context_of(request.scope).request_id
    base = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": _state(request).model_name}
    choice = {"text": result.text, "index": 0, "logprobs": None, "finish_reason": result.generated.finish_reason}
    if stream:
        chunks = [{**base, "choices": [choice]}]
        if _stream_usage(data):
            chunks.append({**base, "choices": [], "usage": _usage_openai(result)})
        return _sse(chunks)
    return JSONResponse({**base, "choices": [choice], "usage": _usage_openai(result)})


def _chat_prompt(request: Request, messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "invalid_prompt", "'messages' must be a non-empty list", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ApiError(400, "invalid_prompt", f"messages[{i}] must be an object with string 'role' and "
                                                  f"'content'", "messages")
        turns.append({"role": m["role"], "content": m["content"]})
    if not any(t["content"].strip() for t in turns):
        raise ApiError(400, "invalid_prompt", "'messages' hold no content", "messages")
    tok = _state(request).runner.tokenizer
    if tok is not None and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    # No chat template (our tiny default model): a plain transcript the model sees as text.
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"


@_api
async def chat_completions(request: Request) -> Response:
    data = await _body(request)
    default, limit = _limits(request)
    max_new = optional_int(data, ("max_completion_tokens", "max_tokens"), default, 1, limit)
    stream = optional_bool(data, "stream")
    prompt = _chat_prompt(request, data.get("messages"))
    result = await _generate(request, prompt, max_new, "messages")
    if result is None:
        return Response(status_code=499)
    ident = "chatcmpl-" + context_of(request.scope).request_id
    base = {"id": ident, "created": int(time.time()), "model": _state(request).model_name}
    finish = result.generated.finish_reason
    if stream:
        chunks = [
            {**base, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": result.text}, "finish_reason": None}]},
            {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
        ]
        if _stream_usage(data):
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage_openai(result)})
        return _sse(chunks)
    return JSONResponse({**base, "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                      "finish_reason": finish}],
                         "usage": _usage_openai(result)})


async def models(request: Request) -> Response:
    name = _state(request).model_name
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                     "owned_by": "tokenaudit"}]})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 once the model is loaded and the event publisher can work (a dead publisher thread or
    an unwritable spool during an outage loses events: better out of rotation, with the reason)."""
    state = _state(request)
    problem = state.publisher.problem() if state.publisher else "event publisher not started"
    ready = state.ready and problem is None
    body = {"status": "ready" if ready else "not_ready", "model": state.model_name,
            "model_loaded": state.ready, "producer": state.publisher.state if state.publisher else "stopped",
            "device": state.runner.device}
    if not state.ready:
        body["reason"] = state.not_ready_reason()
    elif problem is not None:
        body["reason"] = problem
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


def _path(request: Request) -> str:
    """The path for a message, from the scope: ``request.url`` raises on a query string that is
    not UTF-8 (any client can send one), which would turn a 404 into a 500."""
    return request.scope["path"][:200]


async def not_found(request: Request, exc) -> Response:
    return error_response(request, ApiError(404, "not_found", f"no route {_path(request)}"))


async def server_error(request: Request, exc: Exception) -> Response:
    """Unhandled exceptions: the OpenAI error shape too (the audit layer logs the exception type,
    never request content)."""
    ctx = context_of(request.scope)
    code = ctx.error_type or "internal_error"
    return error_response(request, ApiError(500, code, "internal error; the request id identifies it in the logs"))


async def method_not_allowed(request: Request, exc) -> Response:
    return error_response(request, ApiError(405, "method_not_allowed",
                                            f"{request.method[:16]} is not allowed on {_path(request)}"))
