"""llama.cpp (llama-cpp-python) serving a GGUF file."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loratui.serving.backends.base import Delta, GenRequest, run_request


class LlamaCppBackend:
    """A GGUF in llama-cpp-python: one context, one request at a time (the lock is the queue)."""

    kind = "llama.cpp"

    def __init__(self, path: Path, model_id: str, context_length: int = 2048, threads: int | None = None):
        import os

        import llama_cpp

        self.model_id = model_id
        self.models: dict[str, str | None] = {model_id: None}
        from loratui.exporters.gguf_info import summary

        trained = summary(path)["context_length"]  # the gguf reader: metadata only, no llama.cpp log
        self.context_length = min(context_length, int(trained)) if trained else context_length
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=self.context_length,
            n_batch=min(512, self.context_length),
            n_threads=threads or os.cpu_count(),
            verbose=False,
        )
        self.lock = threading.Lock()
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
        started = time.monotonic()
        with self.lock:
            if req.seed is not None:
                self.llm.set_seed(req.seed)
            greedy = req.temperature <= 0
            tokens = self.llm.generate(
                req.prompt_ids,
                top_k=1 if greedy else 0,
                top_p=req.top_p,
                min_p=0.0,
                temp=req.temperature,
                repeat_penalty=1.0,
                reset=True,
            )
            try:
                yield from run_request(req, tokens, self.decode, self.stop_ids, started)
            finally:
                tokens.close()

    def close(self) -> None:
        self.llm.close()
