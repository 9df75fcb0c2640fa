"""ONNX Runtime (onnxruntime-genai) serving an ONNX export folder."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from loratui.serving.backends.base import Delta, GenRequest, run_request
from loratui.serving.backends.hf import HFBase


class OnnxBackend(HFBase):
    """An ONNX export folder (onnxruntime-genai's layout): one request at a time, greedy or sampled by
    onnxruntime-genai's own generation loop, streamed token by token."""

    kind = "onnxruntime"

    def __init__(self, model_dir: Path, model_id: str, context_length: int = 2048, threads: int | None = None):
        from transformers import AutoTokenizer

        from loratui.pipeline.eval.runtimes import load_onnx

        self.model_id = model_id
        self.models: dict[str, str | None] = {model_id: None}
        self.model = load_onnx(model_dir, threads=threads)
        self._setup_tokenizer(AutoTokenizer.from_pretrained(str(model_dir)), sorted(self.model.eos_ids))
        self.context_length = min(context_length, self.model.context_length)
        self.lock = threading.Lock()
        _ = self.model.genai_model  # load now: the first request should not pay for it

    def _tokens(self, req: GenRequest) -> Iterator[int]:
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

    def stream(self, req: GenRequest) -> Iterator[Delta]:
        started = time.monotonic()
        with self.lock:
            yield from run_request(req, self._tokens(req), self.decode, self.stop_ids, started)

    def close(self) -> None:
        pass
