"""Token streaming: from the model thread to one request's event loop, and out as server-sent events.

:class:`TokenStream` carries one request's token ids from the micro-batcher's thread
(``loop.call_soon_threadsafe``: the only thread-safe way into an asyncio loop) to the handler,
which turns them into text with :class:`TextDeltas` and sends them with :class:`EventStream`.

Why our own response class rather than Starlette's ``StreamingResponse``: on a client
disconnect that one cancels the body iterator, and a cancelled task cannot then wait for the
row it was reading (the model thread stops it between two steps, a few milliseconds later), so
the audit event would go out before the tokens the model spent on the request are known.
:class:`EventStream` notices the disconnect itself, lets the handler settle the accounting,
and returns only then.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

log = logging.getLogger(__name__)


class TokenStream:
    """One streamed request's token ids, in order, as the model thread decodes them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._arrived: list[int] = []
        self._wake = asyncio.Event()
        self._ended = False
        self.received = 0  # tokens handed to the handler so far
        # Set on the event loop when the client has gone; the model thread reads it between two
        # steps and cancels the row (a plain attribute: one writer, and a late read costs one step).
        self.cancelled = False

    # --- the model thread ---------------------------------------------------------------------
    def push(self, token: int) -> None:
        self._loop.call_soon_threadsafe(self._arrive, token)

    # --- the event loop -------------------------------------------------------------------------
    def _arrive(self, token: int) -> None:
        self._arrived.append(token)
        self._wake.set()

    def end(self, _future: asyncio.Future | None = None) -> None:
        """No more tokens will come (the request's job finished, well or not). The batcher pushes
        every token before it resolves the job, and both go through the loop in order, so all
        tokens have arrived by then."""
        self._ended = True
        self._wake.set()

    async def take(self) -> list[int]:
        """The tokens that arrived since the last call, waiting for at least one; ``[]`` once the
        stream has ended and everything was taken."""
        while not self._arrived and not self._ended:
            self._wake.clear()
            await self._wake.wait()
        got, self._arrived = self._arrived, []
        self.received += len(got)
        return got


class TextDeltas:
    """Text of a growing id sequence, piece by piece, so that the pieces add up to the text of
    the whole sequence (``ModelRunner.decode``).

    tokenizers' ``DecodeStream`` holds back ids that end inside a multi-byte character (byte-
    level BPE splits them) and returns what is new; :meth:`finish` adds whatever it still holds
    (an unfinished character decodes to U+FFFD, as in the whole text). Tokenizers without a Rust
    backend fall back to decoding the prefix each time (quadratic, but only for those)."""

    def __init__(self, backend, tokenizer):
        self._backend = backend
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._sent = ""
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        if self._stream is not None:
            piece = "".join(p for p in (self._stream.step(self._backend, i) for i in ids) if p)
        else:
            text = self._decode(self._ids)
            piece = "" if text.endswith("\ufffd") or not text.startswith(self._sent) else text[len(self._sent) :]
        self._sent += piece
        return piece

    def finish(self) -> str:
        """The rest of the whole sequence's text; after it, the pieces equal that text."""
        whole = self._decode(self._ids)
        if not whole.startswith(self._sent):  # never seen with DecodeStream; keep the stream consistent
            log.warning("streamed text diverged from the decoded whole; sending nothing more")
            return ""
        rest = whole[len(self._sent) :]
        self._sent = whole
        return rest

    @property
    def text(self) -> str:
        return self._sent


def sse(data: dict | str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line), as OpenAI's streams frame them."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class EventStream:
    """An ASGI response sending server-sent events from ``body`` until it ends or the client
    goes; on a disconnect ``on_disconnect`` runs (and is awaited) before this returns.

    ``disconnected`` is a task that finishes when the client goes (the handler's watcher over
    ``receive``): body iteration races it, so a client that leaves while the model is between
    tokens is noticed at once, not at the next write."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        disconnected: asyncio.Future,
        on_disconnect: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ):
        self.body = body
        self.disconnected = disconnected
        self.on_disconnect = on_disconnect
        self.headers = {"cache-control": "no-cache", **(headers or {})}

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", f"{self.media_type}; charset=utf-8".encode())]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        gone = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while True:
                chunk = asyncio.ensure_future(self.body.__anext__())
                await asyncio.wait({chunk, self.disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if not chunk.done():
                    chunk.cancel()
                    await asyncio.wait({chunk})  # let the body stop before it is closed
                    gone = True
                    break
                try:
                    data = chunk.result()
                except StopAsyncIteration:
                    break
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 servers raise on a send to a closed connection
            gone = True
        finally:
            self.disconnected.cancel()
            await self.body.aclose()
        if gone:
            await self.on_disconnect()
