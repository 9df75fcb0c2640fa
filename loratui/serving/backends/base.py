"""What every backend shares: the request and delta types, the ``Backend`` protocol and the decoding state.

Every backend turns a :class:`GenRequest` (prompt token ids, sampling settings, stop strings, a
cancel flag) into a stream of :class:`Delta` objects: new text, and at the end a finish reason and
the token counts. Text is assembled the same way everywhere (:class:`TextAssembler`): incremental
detokenization that never emits half a UTF-8 character, and stop strings that are cut out and never
streamed in part.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    adapter: str | None = None  # PyTorch with several adapters: which one ("__base__": none)


@dataclass
class Delta:
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled", on the last delta only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None  # seconds from the request to its first token (last delta)


class Backend(Protocol):
    kind: str  # llama.cpp, torch, onnxruntime
    model_id: str
    context_length: int
    models: dict[str, str | None]  # model id clients send -> adapter name for GenRequest.adapter

    def encode(self, text: str) -> list[int]: ...

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def stream(self, req: GenRequest) -> Iterator[Delta]: ...

    def close(self) -> None: ...


class TextAssembler:
    """Token ids in, text out: complete characters only, stop strings cut, nothing after them."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode = decode
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` that might start a stop string: wait for more."""
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        return keep

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            return ""
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            cut = min(hits)
            out = text[self.sent : cut] if cut > self.sent else ""
            self.sent = max(self.sent, cut)
            return out
        end = len(text) - self._held(text)
        out = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def flush(self) -> str:
        """What was held back for a possible stop string, at the end of generation."""
        if self.stopped:
            return ""
        text = self.decode(self.ids).rstrip("\ufffd")
        out = text[self.sent :]
        self.sent = len(text)
        return out


class Decoding:
    """One request's tokens in, its deltas out (through ``emit``): stop ids, stop strings, ``max_tokens``
    and the context end, then one final delta with the reason and the counts. Shared by every backend."""

    def __init__(
        self,
        req: GenRequest,
        decode: Callable[[list[int]], str],
        stop_ids: set[int],
        emit: Callable[[Delta | None], None],
        context_length: int | None = None,
        started: float | None = None,
    ):
        self.req, self.stop_ids, self.emit, self.context_length = req, stop_ids, emit, context_length
        self.text = TextAssembler(decode, req.stop)
        self.started = time.monotonic() if started is None else started
        self.count = 0
        self.first: float | None = None
        self.done = False

    def take(self, token: int) -> None:
        if self.first is None:
            self.first = time.monotonic() - self.started
        if token in self.stop_ids:
            return self.finish("stop")
        self.count += 1
        piece = self.text.add(token)
        if piece:
            self.emit(Delta(piece))
        if self.text.stopped:
            self.finish("stop")
        elif self.count >= self.req.max_tokens or (
            self.context_length is not None and len(self.req.prompt_ids) + self.count >= self.context_length
        ):
            self.finish("length")

    def finish(self, reason: str) -> None:
        """The final delta (once), then None: the end of this request's stream."""
        if self.done:
            return
        self.done = True
        self.emit(
            Delta(
                "" if reason.startswith("error") else self.text.flush(),
                finish_reason=reason,
                prompt_tokens=len(self.req.prompt_ids),
                completion_tokens=self.count,
                first_token_s=self.first,
            )
        )
        self.emit(None)


def run_request(
    req: GenRequest, tokens: Iterator[int], decode: Callable[[list[int]], str], stop_ids: set[int], started: float
) -> Iterator[Delta]:
    """One request from a token iterator (backends that serve one at a time), honouring cancel."""
    pending: list[Delta | None] = []
    state = Decoding(req, decode, stop_ids, pending.append, started=started)
    for token in tokens:
        if req.cancelled.is_set():
            state.finish("cancelled")
        else:
            state.take(token)
        yield from (d for d in pending if d is not None)
        pending.clear()
        if state.done:
            return
    state.finish("length")  # the tokens ran out (the context's end)
    yield from (d for d in pending if d is not None)
