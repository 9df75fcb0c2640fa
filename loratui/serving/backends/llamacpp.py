"""llama.cpp (llama-cpp-python) serving a GGUF file, with continuous batching like llama.cpp's own server.

One llama context holds up to ``max_batch_size`` sequences (llama.cpp's parallel slots), each with its
own ``seq_id`` and its own KV stream of ``context_length`` cells (``kv_unified`` off). A worker thread owns the context (:mod:`.llamacpp_batch`): between decode steps
it admits waiting requests into free slots, then decodes one ``llama_batch`` holding every generating
row's last token and as much of the prefilling rows' prompts as fits in ``n_batch``, and samples each
row's next token from its own logits. A finished or cancelled sequence frees its KV cells at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loratui.serving.backends.base import Delta, GenRequest


class LlamaCppBackend:
    """A GGUF in llama-cpp-python: concurrent requests decode together, up to ``max_batch_size`` rows."""

    kind = "llama.cpp"

    def __init__(
        self,
        path: Path,
        model_id: str,
        context_length: int = 2048,
        threads: int | None = None,
        max_batch_size: int = 8,
    ):
        import os

        import llama_cpp

        from loratui.serving.backends.llamacpp_batch import Batcher

        self.model_id = model_id
        self.models: dict[str, str | None] = {model_id: None}
        self.max_batch_size = max(1, min(max_batch_size, llama_cpp.llama_max_parallel_sequences()))
        # The tokenizer, the metadata and the weights; generation runs in the batcher's own context, so
        # this object's context is the smallest llama.cpp makes.
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=32, n_threads=1, verbose=False)
        trained = llama_cpp.llama_model_n_ctx_train(self.llm.model)
        self.context_length = min(context_length, trained) if trained > 0 else context_length
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template")
        self.formatter: Any = None
        tokens = [
            self.llm.detokenize([i], special=True).decode("utf-8", errors="replace")
            for i in (self.llm.token_bos(), self.llm.token_eos())
        ]
        self.bos, self.eos = tokens
        self.stop_ids = {self.llm.token_eos()}
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            self.stop_ids.add(int(eot))
        if self.template:
            for special in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
                if special in self.template:
                    ids = self.llm.tokenize(special.encode(), add_bos=False, special=True)
                    if len(ids) == 1:
                        self.stop_ids.add(ids[0])
        try:
            self.batcher = Batcher(
                self.llm.model,
                context_length=self.context_length,
                slots=self.max_batch_size,
                n_batch=min(512, self.context_length),
                threads=threads or os.cpu_count() or 1,
                decode=self.decode,
                stop_ids=self.stop_ids,
            )
        except BaseException:
            self.llm.close()
            raise
        self.closed = False
        self.submit = threading.Lock()  # a request is queued only while the worker will still take it
        self.worker = threading.Thread(target=self.batcher.run, name="llama.cpp-batcher", daemon=True)
        self.worker.start()

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if not self.template:
            raise ValueError("this GGUF has no chat template (tokenizer.chat_template): use /v1/completions")
        if self.formatter is None:  # compiled once
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self.formatter = Jinja2ChatFormatter(
                self.template, eos_token=self.eos, bos_token=self.bos, add_generation_prompt=True
            )
        formatted = self.formatter(messages=messages)
        # the template writes BOS itself when the model wants one
        return self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def stream(self, req: GenRequest) -> Iterator[Delta]:
        """Queue the request for the worker and hand out its deltas; a caller that stops reading early
        cancels it, so its slot frees at the next step."""
        out: queue.Queue[Delta | None] = queue.Queue()
        with self.submit:
            closed = self.closed
            if not closed:
                self.batcher.waiting.put((req, out, time.monotonic()))
        if closed:
            yield Delta(finish_reason="error: RuntimeError: the llama.cpp backend is closed")
            return
        ended = False
        try:
            while (item := out.get()) is not None:
                yield item
            ended = True
        finally:
            if not ended:
                req.cancelled.set()

    def close(self) -> None:
        """Stop the worker (requests in flight and queued end as cancelled), then free the context."""
        with self.submit:
            if self.closed:
                return
            self.closed = True
            self.batcher.stop()
        self.worker.join(timeout=60)
        if not self.worker.is_alive():  # never free a context that a stuck decode still uses
            self.batcher.free()
            self.llm.close()
