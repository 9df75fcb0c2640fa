"""vLLM as the engine behind loratui's API (``serve.engine: vllm``).

loratui keeps its own face: it applies the chat template with the model's tokenizer (as the PyTorch backend
does), so every engine sees the same prompt tokens, then sends the token ids to vLLM's ``/v1/completions``
and streams vLLM's text back as :class:`Delta` objects. vLLM does the batching (continuous batching over a
paged KV cache), the sampling, the stop strings and the stop tokens (loratui's list, sent as
``stop_token_ids``). A client that hangs up closes the stream to vLLM, which aborts the request.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loratui.serving.backends.base import Delta, GenRequest
from loratui.serving.backends.hf import HFBase
from loratui.serving.vllm_engine import VllmEngine

_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


class VllmBackend(HFBase):
    """A running :class:`VllmEngine`; ``models`` maps each id clients send to vLLM's name for it."""

    kind = "vllm"

    def __init__(self, engine: VllmEngine, tokenizer_dir: Path, model_id: str, models: dict[str, str | None]):
        import httpx
        from transformers import AutoTokenizer, GenerationConfig

        self.engine = engine
        self.model_id = model_id
        self.models = dict(models)
        self.context_length = engine.spec.context_length
        try:
            eos = GenerationConfig.from_pretrained(str(engine.spec.model)).eos_token_id
        except OSError:
            eos = None
        self._setup_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)), eos)
        # one pooled client for every request thread; a generation may take minutes
        self.http = httpx.Client(
            base_url=engine.url, timeout=httpx.Timeout(None, connect=10), limits=httpx.Limits(max_connections=512)
        )

    def _body(self, req: GenRequest) -> dict[str, Any]:
        room = max(1, self.context_length - len(req.prompt_ids))
        body: dict[str, Any] = {
            "model": req.adapter or self.engine.spec.served_name,
            "prompt": req.prompt_ids,
            "max_tokens": min(req.max_tokens, room),
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop_token_ids": sorted(self.stop_ids),
            "skip_special_tokens": True,
        }
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    def stream(self, req: GenRequest) -> Iterator[Delta]:
        started = time.monotonic()
        first: float | None = None
        reason: str | None = None
        usage: dict[str, int] = {}
        with self.http.stream("POST", "/v1/completions", json=self._body(req)) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"vLLM answered HTTP {r.status_code}: {r.text[:500]}")
            for line in r.iter_lines():
                if req.cancelled.is_set():
                    reason = "cancelled"
                    break  # leaving the block closes the stream: vLLM aborts the request
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    text = choice.get("text") or ""
                    if text and first is None:
                        first = time.monotonic() - started
                    if text:
                        yield Delta(text)
                    if choice.get("finish_reason"):
                        reason = _REASONS.get(choice["finish_reason"], choice["finish_reason"])
        yield Delta(
            finish_reason=reason or "cancelled",
            prompt_tokens=int(usage.get("prompt_tokens", len(req.prompt_ids))),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            first_token_s=first,
        )

    def engine_state(self) -> dict[str, Any]:
        return self.engine.describe()

    def close(self) -> None:
        self.http.close()
        self.engine.close()


class VllmAdapter:
    """A fine-tuning job's adapter, loaded into the running vLLM at run time and served under the job's model
    id; unloaded again when the server's model pool lets it go."""

    def __init__(self, backend: VllmBackend, model: str, adapter: Path):
        self.backend = backend
        self.kind = backend.kind
        self.model_id = model
        self.context_length = backend.context_length
        self.models: dict[str, str | None] = {model: model}
        backend.engine.load_adapter(model, adapter)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.backend.chat_prompt(messages)

    def stream(self, req: GenRequest) -> Iterator[Delta]:
        req.adapter = self.model_id
        return self.backend.stream(req)

    def close(self) -> None:
        if self.backend.engine.alive():
            self.backend.engine.unload_adapter(self.model_id)
