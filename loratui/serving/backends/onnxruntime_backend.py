"""ONNX Runtime serving an ONNX export folder: concurrent requests decoded together (continuous batching)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loratui.serving.backends.base import Decoding, Delta, GenRequest, run_request
from loratui.serving.backends.hf import HFBase

_Waiting = tuple[GenRequest, queue.Queue[Delta | None], float]  # a request, where its deltas go, when it came
_CLOSED = "error: the server is shutting down"


def _sample(logits: Any, temperature: float, top_p: float, rng: Any) -> int:
    """Greedy at temperature 0, else a draw from the softmax at ``temperature`` cut to the ``top_p`` nucleus."""
    import numpy as np

    if temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    order = None
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        probs = probs[order] / probs.sum()
        probs = probs[np.cumsum(probs) - probs < top_p]
        order = order[: len(probs)]
    cdf = np.cumsum(probs)
    pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
    return int(order[pick]) if order is not None else pick


class OnnxBackend(HFBase):
    """An ONNX export folder (onnxruntime-genai's layout). Concurrent requests are decoded together:
    a worker thread owns the decoder graph in onnxruntime and a KV cache shared by up to
    ``max_batch_size`` rows (:mod:`.onnxruntime_batch`); a request joins the batch between decode steps
    and leaves it when done, each row with its own sampling, stops and length. An export whose graph this
    cannot drive (sliding-window layers, a CUDA graph: ``why_serial`` says) is served one request
    at a time by onnxruntime-genai's generation loop."""

    kind = "onnxruntime"

    def __init__(
        self,
        model_dir: Path,
        model_id: str,
        context_length: int = 2048,
        threads: int | None = None,
        max_batch_size: int = 8,
    ):
        from transformers import AutoTokenizer

        from loratui.pipeline.eval.runtimes import load_onnx
        from loratui.serving.backends.onnxruntime_batch import BatchDecoder, unsupported

        self.model_id = model_id
        self.models: dict[str, str | None] = {model_id: None}
        self.model = load_onnx(model_dir, threads=threads)
        self._setup_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)), sorted(self.model.eos_ids))
        self.context_length = min(context_length, self.model.context_length)
        self.max_batch_size = max(1, max_batch_size)
        self.why_serial = unsupported(self.model.config)
        self.decoder: BatchDecoder | None = None
        if self.why_serial is None:
            try:
                self.decoder = BatchDecoder(
                    self.model.session, self.model.config, self.max_batch_size, self.context_length
                )
            except ValueError as e:
                self.why_serial = str(e)
        if self.decoder is None:
            self.max_batch_size = 1
            self.lock = threading.Lock()
            _ = self.model.genai_model  # load now: the first request should not pay for it
            return
        self.rows: list[_Row] = []
        self.last: list[int] = []  # each row's latest token, the next step's input
        self.waiting: queue.Queue[_Waiting | None] = queue.Queue()
        self.running = True
        self.gate = threading.Lock()  # closing and queueing never interleave: no request is left unanswered
        self.worker = threading.Thread(target=self._loop, name="onnx-batcher", daemon=True)
        self.worker.start()

    # -- the Backend protocol ----------------------------------------------------------------

    def stream(self, req: GenRequest) -> Iterator[Delta]:
        started = time.monotonic()
        if self.decoder is None:
            with self.lock:
                yield from run_request(req, self._tokens(req), self.decode, self.stop_ids, started)
            return
        out: queue.Queue[Delta | None] = queue.Queue()
        with self.gate:
            queued = self.running
            if queued:
                self.waiting.put((req, out, started))
        if not queued:
            yield Delta(finish_reason=_CLOSED, prompt_tokens=len(req.prompt_ids))
            return
        while True:
            item = out.get()
            if item is None:
                return
            yield item

    def close(self) -> None:
        """Stop the worker; requests still running or queued end with an error delta."""
        if self.decoder is None:
            return
        with self.gate:
            self.running = False
            self.waiting.put(None)  # wake the worker
        self.worker.join(timeout=30)

    def _tokens(self, req: GenRequest) -> Iterator[int]:
        """One request through onnxruntime-genai's generation loop (the serial path)."""
        tokens = self.model.tokens(
            req.prompt_ids,
            max(self.context_length - len(req.prompt_ids), 0),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
        )
        try:
            yield from tokens
        finally:
            tokens.close()

    # -- the worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        """Continuous batching: new requests are prefilled and join between decode steps; finished
        ones leave at once. On close, whatever is still running or waiting ends with an error."""
        try:
            while self.running:
                for item in self._admit():
                    self._add(*item)
                if self.rows:
                    self._step()
                if not self.rows and self.decoder is not None:
                    self.decoder.clear()  # idle: release the KV cache
        finally:
            self._shut()

    def _shut(self) -> None:
        """The worker ends: the running rows and the requests still queued end with an error delta."""
        for row in self.rows:
            row.finish(_CLOSED)
        self.rows, self.last = [], []
        with self.gate:
            self.running = False  # from now on stream() answers at once: nothing more is queued
        while True:
            try:
                left = self.waiting.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                _Row(left[0], left[1], self.decode, self.stop_ids, self.context_length, left[2]).finish(_CLOSED)

    def _admit(self) -> list[_Waiting]:
        """The requests that join now: a wait for one when the batch is empty, then whatever else is
        queued, up to ``max_batch_size`` rows in all."""
        admitted: list[_Waiting] = []
        block = not self.rows
        while self.running and len(self.rows) + len(admitted) < self.max_batch_size:
            try:
                item = self.waiting.get(block=block and not admitted)
            except queue.Empty:
                break
            if item is None:  # close() woke us
                break
            admitted.append(item)
        return admitted

    def _add(self, req: GenRequest, out: queue.Queue[Delta | None], started: float) -> None:
        """Prefill one request; it joins the batch unless it is already done (a stop token first,
        max_tokens 1, a prompt that fills the context, a hang-up)."""
        assert self.decoder is not None
        row = _Row(req, out, self.decode, self.stop_ids, self.context_length, started)
        if req.cancelled.is_set():
            row.finish("cancelled")
            return
        if len(req.prompt_ids) >= self.context_length:
            row.finish("length")  # no room for a token (as the serial path ends it)
            return
        try:
            logits = self.decoder.prefill(req.prompt_ids)
        except Exception as e:  # noqa: BLE001 - this request fails; the running ones go on
            row.finish(f"error: {type(e).__name__}: {e}")
            return
        token = self._next(row, logits)
        if row.done:
            self.decoder.keep(range(self.decoder.rows - 1))  # its row was the last one
        else:
            self.rows.append(row)
            self.last.append(token)

    def _step(self) -> None:
        """One decode step for every row; the rows that finished (or whose client hung up) leave."""
        assert self.decoder is not None
        for row in self.rows:
            if row.req.cancelled.is_set():
                row.finish("cancelled")
        self._retire(self.last)
        if not self.rows:
            return
        try:
            logits = self.decoder.step(self.last)
        except Exception as e:  # noqa: BLE001 - a model failure ends these requests, not the worker
            for row in self.rows:
                row.finish(f"error: {type(e).__name__}: {e}")
            self.rows, self.last = [], []
            self.decoder.clear()
            return
        self._retire([self._next(row, logits[i]) for i, row in enumerate(self.rows)])

    def _retire(self, tokens: list[int]) -> None:
        """Drop the finished rows (from the batch and the KV cache); ``tokens`` become the next inputs."""
        assert self.decoder is not None
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            self.last = tokens
            return
        order = self.decoder.keep(keep)
        self.rows = [self.rows[i] for i in order]
        self.last = [tokens[i] for i in order]

    def _next(self, row: _Row, logits: Any) -> int:
        if row.req.cancelled.is_set():
            row.finish("cancelled")
            return self.pad_id
        token = _sample(logits, row.req.temperature, row.req.top_p, row.rng)
        row.take(token)
        return token


class _Row(Decoding):
    """One request in OnnxBackend's batch: its decoding state, its output queue, its random stream."""

    def __init__(
        self,
        req: GenRequest,
        out: queue.Queue[Delta | None],
        decode: Callable[[list[int]], str],
        stop_ids: set[int],
        context_length: int,
        started: float,
    ):
        import numpy as np

        super().__init__(req, decode, stop_ids, out.put, context_length, started)
        self.rng = np.random.default_rng(req.seed if req.seed is not None else time.time_ns())
