"""HTTP handlers: /v1/generate, the OpenAI-compatible completions and embeddings routes, health
and metrics.

Handlers never log or echo prompt text; they record what the model consumed and produced in the
request's AuditContext, from the ids the runner reports. ``stream: true`` sends each piece of
text as soon as its tokens are decoded (:mod:`tokenaudit.inference.streaming`); the usage chunk
and the audit event both come from the row's final accounting, so they agree.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenaudit.inference.audit import AuditContext, context_of
from tokenaudit.inference.batcher import BatchResult, MicroBatcher, Overloaded
from tokenaudit.inference.http_io import (
    ApiError,
    Disconnected,
    error_response,
    optional_bool,
    optional_int,
    read_json_object,
    require_prompt,
)
from tokenaudit.inference.metrics import CONTENT_TYPE
from tokenaudit.inference.rate_limits import reserve
from tokenaudit.inference.runner import Decoded, Encoded, InvalidPrompt
from tokenaudit.inference.streaming import EventStream, TokenStream, sse

if TYPE_CHECKING:
    from tokenaudit.inference.app import AppState


def _state(request: Request) -> AppState:
    return request.app.state.tokenaudit


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _batcher(state: AppState) -> MicroBatcher:
    """The micro-batcher, which load_model starts before the app is ready (see _ready_for)."""
    if state.batcher is None:
        raise ApiError(503, "model_not_ready", state.not_ready_reason())
    return state.batcher


def _ready_for(request: Request, what: str) -> AppState:
    """The app state, once the model is loaded and can do ``what`` ("generate" or "embed")."""
    state = _state(request)
    if not state.ready:
        raise ApiError(503, "model_not_ready", state.not_ready_reason())
    runner = state.runner
    if what == "generate" and not runner.can_generate:
        raise ApiError(
            400,
            "model_cannot_generate",
            f"model {state.model_name} is an encoder-only model "
            f"({runner.kind}): it cannot generate text; use /v1/embeddings",
        )
    if what == "embed" and not runner.can_embed:
        raise ApiError(
            400,
            "model_cannot_embed",
            f"model {state.model_name} is a text generator ({runner.kind}): "
            f"this server does not embed with it; use the completions routes",
        )
    return state


async def _tokenized(request: Request, prompt: str, param: str) -> Encoded:
    state = _state(request)
    context_of(request.scope).prompt_digest = state.digest(prompt)
    try:
        return await state.tokenize(prompt)
    except InvalidPrompt as exc:
        raise ApiError(400, "invalid_prompt", str(exc), param) from None
    except Overloaded as exc:
        raise _overloaded(exc) from None


async def _outcome(request: Request, job: asyncio.Future, failure: str = "generation_failed"):
    """Wait for a queued job or for the client to leave; (result, gone). A client that left is
    marked so (a 499) and still gets the job's result accounted: the model spent it. A job that
    failed raises."""
    ctx = context_of(request.scope)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    gone = not job.done()
    if gone:
        ctx.disconnected, ctx.error_type = True, "client_disconnect"
    try:
        return await job, gone
    except Overloaded as exc:
        ctx.queue_ms = exc.queue_ms
        if gone:
            return None, True
        raise _overloaded(exc) from None
    except Exception:
        ctx.error_type = failure
        raise


def _account(ctx: AuditContext, result: BatchResult, streamed: bool = False) -> None:
    g = result.generated
    ctx.input_tokens, ctx.untruncated_input_tokens, ctx.truncated = (
        g.input_tokens,
        g.untruncated_input_tokens,
        g.truncated,
    )
    ctx.output_tokens, ctx.finish_reason = g.output_tokens, g.finish_reason
    ctx.batch_id, ctx.batch_size, ctx.position_in_batch = result.batch_id, result.batch_size, result.position_in_batch
    ctx.queue_ms, ctx.inference_ms, ctx.device = result.queue_ms, result.inference_ms, result.device
    if streamed and isinstance(g, Decoded) and g.first_token_at is not None:
        # OpenTelemetry's gen_ai.server.time_to_first_token / time_per_output_token: from the
        # request's arrival to its first token, then per token after the first
        ctx.ttft_ms = (g.first_token_at - ctx.started) * 1000
        if g.output_tokens > 1 and g.last_token_at is not None:
            ctx.tpot_ms = (g.last_token_at - g.first_token_at) * 1000 / (g.output_tokens - 1)


async def _generate(request: Request, prompt: str, max_new: int, param: str = "prompt") -> BatchResult | None:
    """Tokenize one prompt (off the event loop and the model thread), then run it through the
    micro-batcher; None when the client left meanwhile (its tokens are still accounted: the
    model spent them)."""
    state = _ready_for(request, "generate")
    ctx = context_of(request.scope)
    encoded = await _tokenized(request, prompt, param)
    reserve(request.scope, len(encoded.ids) + max_new)  # a limited key's worst case, or its 429
    state.budgets.hold(ctx, request.scope["path"], len(encoded.ids), max_new)  # hard budgets, or their 429
    result, gone = await _outcome(request, asyncio.ensure_future(_batcher(state).submit(encoded, max_new)))
    if result is not None:
        _account(ctx, result)
    return None if gone else result


# --- streaming ------------------------------------------------------------------------------------
@dataclass
class _Live:
    """A streamed request whose first tokens exist: what its response body goes on from."""

    encoded: Encoded
    stream: TokenStream
    job: asyncio.Future
    first: list[int]
    watcher: asyncio.Future  # finishes when the client goes


def _account_failed(ctx: AuditContext, encoded: Encoded, stream: TokenStream) -> None:
    """A row that failed after it started streaming: its prompt was fed, its streamed tokens made."""
    ctx.input_tokens, ctx.untruncated_input_tokens, ctx.truncated = (
        len(encoded.ids),
        encoded.untruncated,
        encoded.truncated,
    )
    ctx.output_tokens, ctx.finish_reason = stream.received, "error"


async def _settle_gone(ctx: AuditContext, encoded: Encoded, stream: TokenStream, job: asyncio.Future) -> None:
    """The client left mid-stream: stop its row (the model thread sees it before the next step),
    wait for what the row consumed, and account that (status 499)."""
    stream.cancelled = True
    try:
        _account(ctx, await job, streamed=True)
    except Overloaded as exc:  # it never reached the model
        ctx.queue_ms = exc.queue_ms
    except Exception:
        if stream.received:
            _account_failed(ctx, encoded, stream)
    ctx.disconnected, ctx.error_type = True, "client_disconnect"


async def _stream_start(request: Request, prompt: str, max_new: int, param: str) -> _Live | None:
    """Queue a streamed prompt and wait for its first tokens; None when the client left first
    (accounted), an ApiError when it failed before any token (a proper 4xx/5xx, not a broken stream)."""
    state = _ready_for(request, "generate")
    ctx = context_of(request.scope)
    encoded = await _tokenized(request, prompt, param)
    reserve(request.scope, len(encoded.ids) + max_new)
    state.budgets.hold(ctx, request.scope["path"], len(encoded.ids), max_new)
    stream = TokenStream(asyncio.get_running_loop())
    job = asyncio.ensure_future(_batcher(state).submit(encoded, max_new, stream))
    job.add_done_callback(stream.end)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    first = asyncio.ensure_future(stream.take())
    await asyncio.wait({first, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        await _settle_gone(ctx, encoded, stream, job)
        return None
    if first.result():
        return _Live(encoded, stream, job, first.result(), watcher)
    watcher.cancel()  # ended without a token: the job failed
    try:
        await job
    except Overloaded as exc:
        ctx.queue_ms = exc.queue_ms
        raise _overloaded(exc) from None
    except Exception:
        ctx.error_type = "generation_failed"
        raise
    raise RuntimeError("a streamed row finished without a token")


def _streamed(
    request: Request,
    live: _Live,
    data: dict,
    piece_chunk: Callable[[str, bool], dict],
    final_chunk: Callable[[str], dict],
) -> EventStream:
    """The SSE response of a started stream: a chunk per batch of tokens that arrived together,
    the final chunk (finish_reason), the usage chunk when asked for, ``[DONE]``."""
    state, ctx = _state(request), context_of(request.scope)
    deltas = state.runner.text_deltas()

    async def body() -> AsyncGenerator[bytes, None]:
        tokens, first = live.first, True
        while tokens:
            piece = deltas.add(tokens)
            if piece or first:
                yield sse(piece_chunk(piece, first))
                first = False
            tokens = await live.stream.take()
        try:
            result = await live.job
        except Exception as exc:  # failed after its first tokens: say so in the stream, bill what it got
            _account_failed(ctx, live.encoded, live.stream)
            ctx.error_type = "generation_failed"
            yield sse(
                {
                    "error": {
                        "type": "server_error",
                        "code": "generation_failed",
                        "param": None,
                        "message": f"generation failed after {live.stream.received} tokens "
                        f"({type(exc).__name__}); the request id identifies it in the logs",
                    }
                }
            )
            yield sse("[DONE]")
            return
        _account(ctx, result, streamed=True)
        rest = deltas.finish()
        if rest:
            yield sse(piece_chunk(rest, False))
        yield sse(final_chunk(result.generated.finish_reason))
        if _stream_usage(data):
            yield sse({**final_chunk(result.generated.finish_reason), "choices": [], "usage": _usage_openai(result)})
        yield sse("[DONE]")

    async def gone() -> None:
        await _settle_gone(ctx, live.encoded, live.stream, live.job)

    return EventStream(body(), live.watcher, gone)


def _overloaded(exc: Overloaded) -> ApiError:
    return ApiError(503, exc.code, f"{exc}; retry later", None, {"Retry-After": str(exc.retry_after_seconds)})


async def _body(request: Request) -> dict:
    return await read_json_object(request, _state(request).settings.max_body_bytes)


def _limits(request: Request) -> tuple[int, int]:
    s = _state(request).settings
    return s.default_max_new_tokens, s.max_new_tokens_limit


#: a route handler: a Starlette Response, or an EventStream (an ASGI response of its own)
Handler = Callable[[Request], Awaitable[Response | EventStream]]


def _api(handler: Handler) -> Handler:
    """Turn ApiError into the JSON error shape and a vanished client into a bodiless 499."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response | EventStream:
        try:
            return await handler(request)
        except ApiError as err:
            return error_response(request, err)
        except Disconnected:
            ctx = context_of(request.scope)
            ctx.disconnected, ctx.error_type = True, "client_disconnect"
            return Response(status_code=499)

    return wrapped


def _usage_openai(r: BatchResult) -> dict:
    g = r.generated
    return {
        "prompt_tokens": g.input_tokens,
        "completion_tokens": g.output_tokens,
        "total_tokens": g.input_tokens + g.output_tokens,
    }


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
    return JSONResponse(
        {
            "request_id": context_of(request.scope).request_id,
            "model": _state(request).model_name,
            "text": result.text,
            "finish_reason": g.finish_reason,
            "usage": {
                "input_tokens": g.input_tokens,
                "output_tokens": g.output_tokens,
                "total_tokens": g.input_tokens + g.output_tokens,
                "untruncated_input_tokens": g.untruncated_input_tokens,
                "truncated": g.truncated,
            },
        }
    )


def _stream_usage(data: dict) -> bool:
    opts = data.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


@_api
async def completions(request: Request) -> Response | EventStream:
    data = await _body(request)
    prompt = require_prompt(data)
    default, limit = _limits(request)
    max_new = optional_int(data, ("max_tokens",), default, 1, limit)
    stream = optional_bool(data, "stream")
    ident = "cmpl-" + context_of(request.scope).request_id
    base = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": _state(request).model_name}
    if stream:
        live = await _stream_start(request, prompt, max_new, "prompt")
        if live is None:
            return Response(status_code=499)

        def piece(text: str, first: bool) -> dict:
            return {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}

        def final(reason: str) -> dict:
            return {**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": reason}]}

        return _streamed(request, live, data, piece, final)
    result = await _generate(request, prompt, max_new)
    if result is None:
        return Response(status_code=499)
    choice = {"text": result.text, "index": 0, "logprobs": None, "finish_reason": result.generated.finish_reason}
    return JSONResponse({**base, "choices": [choice], "usage": _usage_openai(result)})


def _chat_prompt(request: Request, messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "invalid_prompt", "'messages' must be a non-empty list", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ApiError(
                400, "invalid_prompt", f"messages[{i}] must be an object with string 'role' and 'content'", "messages"
            )
        turns.append({"role": m["role"], "content": m["content"]})
    if not any(t["content"].strip() for t in turns):
        raise ApiError(400, "invalid_prompt", "'messages' hold no content", "messages")
    tok = _state(request).runner.tokenizer
    if tok is not None and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    # No chat template (our tiny default model): a plain transcript the model sees as text.
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"


@_api
async def chat_completions(request: Request) -> Response | EventStream:
    data = await _body(request)
    default, limit = _limits(request)
    max_new = optional_int(data, ("max_completion_tokens", "max_tokens"), default, 1, limit)
    stream = optional_bool(data, "stream")
    prompt = _chat_prompt(request, data.get("messages"))
    ident = "chatcmpl-" + context_of(request.scope).request_id
    base = {"id": ident, "created": int(time.time()), "model": _state(request).model_name}
    if stream:
        live = await _stream_start(request, prompt, max_new, "messages")
        if live is None:
            return Response(status_code=499)
        chunk = {**base, "object": "chat.completion.chunk"}

        def piece(text: str, first: bool) -> dict:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

        def final(reason: str) -> dict:
            return {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}

        return _streamed(request, live, data, piece, final)
    result = await _generate(request, prompt, max_new, "messages")
    if result is None:
        return Response(status_code=499)
    finish = result.generated.finish_reason
    return JSONResponse(
        {
            **base,
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
            ],
            "usage": _usage_openai(result),
        }
    )


async def models(request: Request) -> Response:
    name = _state(request).model_name
    return JSONResponse(
        {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tokenaudit"}]}
    )


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 once the model is loaded and the event publisher can work (a dead publisher thread or
    an unwritable spool during an outage loses events: better out of rotation, with the reason)."""
    state = _state(request)
    problem = state.publisher.problem() if state.publisher else "event publisher not started"
    ready = state.ready and problem is None
    body = {
        "status": "ready" if ready else "not_ready",
        "model": state.model_name,
        "model_loaded": state.ready,
        "producer": state.publisher.state if state.publisher else "stopped",
        "device": state.runner.device,
    }
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
    return error_response(
        request, ApiError(405, "method_not_allowed", f"{request.method[:16]} is not allowed on {_path(request)}")
    )
