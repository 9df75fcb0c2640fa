"""Continuous batching on llama-cpp-python's low-level API: the worker behind ``LlamaCppBackend``.

As llama.cpp's own server does with its parallel slots: one context with ``n_seq_max`` = the number of
slots and ``n_ctx`` = ``context_length`` x slots, its KV cache split into one stream per sequence
(``kv_unified`` off), so every sequence has the whole context to itself. Each step is one
``llama_decode`` of every generating row's last sampled token (one ``llama_batch``, a ``seq_id`` per
row), then the prompts of newly admitted rows, in chunks of up to ``n_batch``, while the step's
``n_batch`` budget lasts (a long prompt prefills over several steps while the others go on generating).
Each row samples its next token from its own logits row: greedy takes the first maximum (as llama.cpp's
greedy sampler), else llama.cpp's sampler chain temperature -> top-p -> seeded draw, one chain per row.

A finished or cancelled row frees its generated tokens' KV cells and its ``seq_id`` at once; its
prompt's cells stay as the slot's prompt cache (llama.cpp's server keeps its slots' prompts too), and a
request that starts the same way (a chat's system prompt) goes to that slot and prefills only the rest.

Greedy output does not depend on what else runs, as far as llama.cpp's kernels allow: every sequence's
cells start at 0 in its own stream, its prompt never shares a ``llama_decode`` with other sequences
(llama.cpp would cut it into equal parts per sequence) and never ends in a one-token chunk (whose logits
differ from the same token's inside a longer chunk), so each token meets the same data as when the request
runs alone. What is left is the matmul: a decode step of 8 rows must give each row the sums a step of 1
gives it. Measured on an AVX-512 Xeon, it does for f16, bf16, q8_0 and q4_0 files (greedy replies
identical alone and 8 at a time), not for q4_k_m (2-3 of 8 replies differed: its batched kernels round
differently from the one-row kernel), as in llama.cpp's own server.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any

from loratui.serving.backends.base import Decoding, Delta, GenRequest

_Waiting = tuple[GenRequest, "queue.Queue[Delta | None]", float]  # a request, where its deltas go, when it came


class _Row(Decoding):
    """One request in a slot: its decoding state, its sequence id and the tokens it still has to feed."""

    def __init__(
        self,
        seq: int,
        waiting: _Waiting,
        decode: Callable[[list[int]], str],
        stop_ids: set[int],
        context_length: int,
    ):
        req, out, started = waiting
        super().__init__(req, decode, stop_ids, out.put, context_length, started)
        self.seq = seq
        self.fed = 0  # tokens of this sequence in the KV cache: the next one's position
        self.todo: list[int] = list(req.prompt_ids)  # the prompt's rest, then the last sampled token
        self.sampler: Any = None  # llama.cpp's chain when sampling (temperature > 0)

    @property
    def generating(self) -> bool:
        return self.fed >= len(self.req.prompt_ids)


class Batcher:
    """Owns the llama context and its batch; :meth:`run` is the worker thread's loop."""

    def __init__(
        self,
        model: Any,
        *,
        context_length: int,
        slots: int,
        n_batch: int,
        threads: int,
        decode: Callable[[list[int]], str],
        stop_ids: set[int],
    ):
        import llama_cpp
        import numpy as np

        self.context_length, self.slots, self.n_batch = context_length, slots, n_batch
        self.decode, self.stop_ids = decode, stop_ids
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context_length * slots
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = slots
        params.kv_unified = False  # a KV stream per sequence: its cells from 0, its attention over them only
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama by default
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {slots} slots")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # numpy views of the batch's arrays, to fill them a slice at a time
        self.tokens = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self.pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self.n_seq_id = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))
        self.logits = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))
        self.waiting: queue.Queue[_Waiting | None] = queue.Queue()
        self.running = True
        self.free_seqs = list(range(slots))
        self.cached: dict[int, list[int]] = {seq: [] for seq in range(slots)}  # the prompt cells each slot kept
        self.rows: list[_Row] = []
        # (rows, tokens, seconds) of each llama_decode while a profiler sets it to a list
        self.profile: list[tuple[int, int, float]] | None = None

    # -- the worker ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.running = False
        self.waiting.put(None)  # wake the worker

    def run(self) -> None:
        try:
            while self.running:
                try:
                    self._admit()
                    if self.rows and self.running:
                        self._step()
                except Exception as e:  # noqa: BLE001 - these requests fail; the worker serves the next ones
                    for row in list(self.rows):
                        self._release(row, f"error: {type(e).__name__}: {e}")
        finally:  # closing: what is in flight or queued ends now
            for row in list(self.rows):
                self._release(row, "cancelled")
            while True:
                try:
                    item = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    _Row(-1, item, self.decode, self.stop_ids, self.context_length).finish("cancelled")

    def _admit(self) -> None:
        """Take waiting requests into free slots (waiting for one when none runs)."""
        while self.free_seqs and self.running:
            try:
                item = self.waiting.get() if not self.rows else self.waiting.get_nowait()
            except queue.Empty:
                return
            if item is None:
                return
            req = item[0]
            seq, keep = self._slot(req.prompt_ids)
            row = _Row(seq, item, self.decode, self.stop_ids, self.context_length)
            if req.cancelled.is_set():
                row.finish("cancelled")
            elif not req.prompt_ids:
                row.finish("error: ValueError: an empty prompt")
            elif len(req.prompt_ids) >= self.context_length or req.max_tokens <= 0:
                row.finish("length")
            else:
                try:
                    keep = self._reuse(seq, keep)
                    row.fed, row.todo = keep, list(req.prompt_ids[keep:])
                    row.sampler = self._sampler(req) if req.temperature > 0 else None
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    row.finish(f"error: {type(e).__name__}: {e}")
                    continue
                self.free_seqs.remove(seq)
                self.rows.append(row)

    def _slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot whose kept prompt starts like ``prompt`` the longest (the lowest id among equals),
        and how many of its cells to keep: never the prompt's last two tokens, so the rest prefills as a
        chunk of two or more (a lone token's logits differ from the same token inside a chunk)."""

        def common(seq: int) -> int:
            n, cached = 0, self.cached[seq]
            for a, b in zip(cached, prompt):
                if a != b:
                    break
                n += 1
            return n

        seq = max(self.free_seqs, key=lambda s: (common(s), -s))
        return seq, max(0, min(common(seq), len(prompt) - 2))

    def _reuse(self, seq: int, keep: int) -> int:
        """Drop the slot's cells from position ``keep`` on; how many stay (0 when the memory cannot cut a
        sequence there, as recurrent state cannot, or no longer holds its start, as a sliding window)."""
        import llama_cpp

        if keep and not (
            llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1)
            and llama_cpp.llama_memory_seq_pos_min(self.memory, seq) == 0
        ):
            keep = 0
        if not keep:
            llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.cached[seq] = self.cached[seq][:keep]
        return keep

    def _sampler(self, req: GenRequest) -> Any:
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(float(req.temperature)))
        if req.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(float(req.top_p), 1))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if req.seed is None else req.seed % llama_cpp.LLAMA_DEFAULT_SEED
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _step(self) -> None:
        """One step: the generating rows decode their next token together (one ``llama_decode``), then
        prompts prefill, each in its own ``llama_decode``, while the step's ``n_batch`` budget lasts."""
        for row in [r for r in self.rows if r.req.cancelled.is_set()]:
            self._release(row, "cancelled")
        generating = sorted((r for r in self.rows if r.generating), key=lambda r: r.seq)
        if generating:  # by seq_id: llama.cpp puts consecutive sequence ids in one ubatch
            self._decode([(row, 1) for row in generating])
        budget = self.n_batch
        for row in [r for r in self.rows if not r.generating]:  # in arrival order
            take = min(len(row.todo), self.n_batch)
            if len(row.todo) - take == 1 and take > 2:  # no lone last token: its logits would differ
                take -= 1
            if take > budget:
                break
            self._decode([(row, take)])
            budget -= take
        for row in [r for r in self.rows if r.done]:
            self._release(row, None)

    def _decode(self, items: list[tuple[_Row, int]]) -> None:
        """One ``llama_decode`` of the next ``take`` tokens of each row, then each row whose logits came
        out of it samples its next token."""
        import llama_cpp

        n = 0
        outputs: list[tuple[_Row, int]] = []
        seq_id = self.batch.seq_id
        for row, take in items:
            end = n + take
            self.tokens[n:end] = row.todo[:take]
            self.pos[n:end] = range(row.fed, row.fed + take)
            self.n_seq_id[n:end] = 1
            self.logits[n:end] = 0
            for i in range(n, end):
                seq_id[i][0] = row.seq
            if take == len(row.todo):  # the prompt's end or a generated token: the next token comes out
                self.logits[end - 1] = 1
                outputs.append((row, end - 1))
            n = end
        self.batch.n_tokens = n
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, self.batch)
        if self.profile is not None:
            self.profile.append((len(items), n, time.perf_counter() - started))
        if rc != 0:  # llama.cpp left the cache as it was; these rows cannot go on
            for row, _take in items:
                self._release(row, f"error: llama_decode returned {rc}")
            return
        for row, take in items:
            row.fed += take
            del row.todo[:take]
        for row, index in outputs:  # now: the next llama_decode overwrites the logits
            token = self._next(row, index)
            row.take(token)
            if not row.done:
                row.todo = [token]

    def _next(self, row: _Row, index: int) -> int:
        import llama_cpp
        import numpy as np

        if row.sampler is not None:
            return int(llama_cpp.llama_sampler_sample(row.sampler, self.ctx, index))
        logits = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.n_vocab,))))

    def _release(self, row: _Row, reason: str | None) -> None:
        """The row leaves its slot: the cells of its generated tokens and its sampler are freed, its seq_id
        is free again. The prompt's cells stay as the slot's prompt cache, as llama.cpp's server keeps its
        slots' prompts: a next request that starts the same (a chat's system prompt) prefills only the rest."""
        import llama_cpp

        if reason is not None:
            row.finish(reason)
        kept = min(row.fed, len(row.req.prompt_ids))
        if not (kept and llama_cpp.llama_memory_seq_rm(self.memory, row.seq, kept, -1)):
            llama_cpp.llama_memory_seq_rm(self.memory, row.seq, -1, -1)
            kept = 0
        self.cached[row.seq] = list(row.req.prompt_ids[:kept])
        if row.sampler is not None:
            llama_cpp.llama_sampler_free(row.sampler)
            row.sampler = None
        self.rows.remove(row)
        self.free_seqs.append(row.seq)
        self.free_seqs.sort()

    def free(self) -> None:
        """Free the batch and the context (after the worker has stopped)."""
        import llama_cpp

        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
