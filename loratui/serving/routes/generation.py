"""One completion generated for a route: the backend runs on a worker thread, its deltas come back to the
event loop, and leave as one JSON response or as server-sent events (``stream: true``). A client that
disconnects cancels its generation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import StreamingResponse

from loratui.serving.backends import Backend, Delta, GenRequest
from loratui.serving.routes.bodies import SamplingRequest
from loratui.serving.state import AppContext

Kind = Literal["chat", "completion"]
_Deltas = asyncio.Queue[Delta | BaseException | None]  # None: the generation ended

# the stream is already 200 when generation fails: the failure goes in an error event
_FAILED_EVENT = (
    "data: "
    + json.dumps({"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}})
    + "\n\n"
)


class _EventStream(StreamingResponse):
    """A streaming response that always closes its generator, so the generator's ``finally`` runs now.

    Starlette cancels the stream when the client hangs up. If that lands while a chunk is being sent,
    the generator is left suspended at its ``yield`` and its cleanup (cancel the generation, leave the
    queue) would wait for garbage collection; closing it here makes that cleanup prompt.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _usage(last: Delta) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


def _finish(reason: str | None) -> str:
    """OpenAI's finish reason for a backend's."""
    return "stop" if reason in ("stop", "cancelled") else (reason or "length")


@dataclass
class _Shape:
    """The fields every response and chunk of one completion repeats."""

    rid: str
    created: int
    kind: Kind
    model: str
    fingerprint: str
    include_usage: bool

    def response(self, content: str, last: Delta) -> dict[str, Any]:
        """The whole completion, for ``stream: false``."""
        choice: dict[str, Any] = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": _finish(last.finish_reason),
                "logprobs": None,
            }
            if self.kind == "chat"
            else {"index": 0, "text": content, "finish_reason": _finish(last.finish_reason), "logprobs": None}
        )
        return {
            "id": self.rid,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(last),
            "system_fingerprint": self.fingerprint,
        }

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def chunk(self, text: str | None, reason: str | None, role: bool = False) -> str:
        """One server-sent event with new text, or the finish reason, or (chat) the assistant's role."""
        if self.kind == "chat":
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            )
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        payload: dict[str, Any] = {
            "id": self.rid,
            "object": self._chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "system_fingerprint": self.fingerprint,
        }
        if self.include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    def usage_chunk(self, last: Delta) -> str:
        """The last event with ``stream_options.include_usage``: no choices, the token counts."""
        payload = {
            "id": self.rid,
            "object": self._chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(last),
        }
        return f"data: {json.dumps(payload)}\n\n"


def _start(backend: Backend, req: GenRequest, release: Callable[[], None], name: str) -> _Deltas:
    """Run the generation on its own thread; its deltas, or the exception it raised, arrive in the queue."""
    deltas: _Deltas = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def work() -> None:
        gen = None
        try:
            gen = backend.stream(req)
            for d in gen:
                loop.call_soon_threadsafe(deltas.put_nowait, d)
        except BaseException as e:  # reported to the client as a server error
            loop.call_soon_threadsafe(deltas.put_nowait, e)
        finally:
            close = getattr(gen, "close", None)  # a generator: end it here, on the thread that ran it
            if close is not None:
                close()
            release()  # only now: a pooled model may be unloaded, never under a generation
            loop.call_soon_threadsafe(deltas.put_nowait, None)

    threading.Thread(target=work, name=name, daemon=True).start()
    return deltas


async def _whole(
    ctx: AppContext, shape: _Shape, deltas: _Deltas, req: GenRequest, request: Request, started: float
) -> dict[str, Any]:
    """Wait for the generation to end: the response for ``stream: false``."""
    text: list[str] = []
    last = Delta()
    try:
        while (item := await deltas.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            text.append(item.text)
            last = item
            if await request.is_disconnected():
                req.cancelled.set()
    finally:
        ctx.leave()
    if last.finish_reason and last.finish_reason.startswith("error"):
        raise RuntimeError(last.finish_reason)
    ctx.metrics.finished(last, time.monotonic() - started)
    return shape.response("".join(text), last)


async def _events(
    ctx: AppContext, shape: _Shape, deltas: _Deltas, req: GenRequest, started: float
) -> AsyncIterator[str]:
    """The server-sent events of ``stream: true``, ending with ``[DONE]`` (or an error event)."""
    last = Delta()
    try:
        if shape.kind == "chat":
            yield shape.chunk(None, None, role=True)
        while (item := await deltas.get()) is not None:
            if isinstance(item, BaseException) or (item.finish_reason or "").startswith("error"):
                yield _FAILED_EVENT
                return
            last = item
            if item.finish_reason:
                if item.text:
                    yield shape.chunk(item.text, None)
                yield shape.chunk(None, _finish(item.finish_reason))
            elif item.text:
                yield shape.chunk(item.text, None)
        ctx.metrics.finished(last, time.monotonic() - started)
        if shape.include_usage:
            yield shape.usage_chunk(last)
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: stop generating for it
        req.cancelled.set()
        ctx.leave()


async def respond(
    ctx: AppContext,
    body: SamplingRequest,
    backend: Backend,
    req: GenRequest,
    kind: Kind,
    request: Request,
    release: Callable[[], None],
) -> Any:
    """Generate for ``req``; ``release`` (the backend is no longer needed) is called once generation ended."""
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    shape = _Shape(
        rid,
        int(time.time()),
        kind,
        body.model,
        f"loratui-{backend.kind}",
        bool(body.stream_options and body.stream_options.include_usage),
    )
    try:
        ctx.enter()
    except BaseException:
        release()
        raise
    started = time.monotonic()
    deltas = _start(backend, req, release, rid)
    if not body.stream:
        return await _whole(ctx, shape, deltas, req, request, started)
    return _EventStream(
        _events(ctx, shape, deltas, req, started),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
