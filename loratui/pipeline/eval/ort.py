"""An ONNX export folder in ONNX Runtime: the layout onnxruntime-genai's model builder writes.

```
model.onnx (+ model.onnx.data)   the decoder: fused GroupQueryAttention with a KV cache, MatMulNBits for int4
genai_config.json               what onnxruntime-genai needs to run it (inputs, eos ids, context, search defaults)
tokenizer.json, tokenizer_config.json, chat_template.jinja, config.json, generation_config.json
```

Two ways in, each loaded on first use so a caller that needs one never pays for the other:

* :meth:`OnnxDecoder.logits`: a plain ``onnxruntime.InferenceSession`` over right-padded batches with an
  empty KV cache, for teacher-forced scoring (every position's logits). The graph takes ``input_ids``,
  ``attention_mask`` and ``past_key_values.N.key/value``; positions come from the mask.
* :meth:`OnnxDecoder.tokens`: onnxruntime-genai's own generation loop (``og.Generator``), greedy or
  sampled, one token at a time, for replies, decode speed and serving.

A folder that an older loratui wrote with optimum (``model.onnx`` but no ``genai_config.json``) is
refused with the command that exports it again.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loratui.pipeline.errors import LoratuiError

GENAI_CONFIG = "genai_config.json"
_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}  # the KV cache types numpy can hold


def _import(module: str, package: str, extras: str) -> Any:
    """``module``, or a clear error naming the extra that installs ``package``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LoratuiError(
            f"{package} is not installed ({e})",
            hint=f"Install loratui with one of its ONNX Runtime builds: {extras} (never both).",
        ) from e


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a clear error naming the extra that installs it."""
    return _import("onnxruntime", "onnxruntime", "pip install 'loratui[cpu]', or 'loratui[cuda]' for onnxruntime-gpu")


def import_genai() -> Any:
    """The ``onnxruntime_genai`` module, or a clear error naming the extra that installs it."""
    return _import(
        "onnxruntime_genai",
        "onnxruntime-genai",
        "pip install 'loratui[cpu]', or 'loratui[cuda]' for onnxruntime-genai-cuda",
    )


def ort_session_options(threads: int | None = None) -> Any:
    """onnxruntime settings for CPU work: every graph optimization, one intra-op thread per core, and no
    busy-waiting between runs (spinning threads slow the Python code that runs between the model's
    calls, onnxruntime#13808)."""
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def genai_config(folder: Path) -> dict[str, Any]:
    """The folder's ``genai_config.json``, or a clear error: an old optimum export, or no ONNX model at all."""
    path = Path(folder) / GENAI_CONFIG
    if not path.is_file():
        if any(Path(folder).glob("*.onnx")):
            raise LoratuiError(
                f"{folder}: this ONNX export was written by an older loratui (optimum's layout, no {GENAI_CONFIG}); "
                "it no longer loads",
                hint="Export it again from the run: loratui export --format onnx --config runs/<name>/config.yaml",
            )
        raise LoratuiError(
            f"{folder}: not an ONNX export folder (no {GENAI_CONFIG} and no .onnx file)",
            hint="Export one with `loratui export --format onnx`.",
        )
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return config
    except (OSError, ValueError) as e:
        raise LoratuiError(f"{path}: unreadable ({e})", hint="Export again with `loratui export --format onnx`.") from e


def _provider(config: dict[str, Any]) -> str:
    """The execution provider the graph was built for: its genai_config names CUDA, or it is a CPU graph."""
    options = config["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    names = {name for entry in options for name in entry}
    return "CUDAExecutionProvider" if "cuda" in names else "CPUExecutionProvider"


class OnnxDecoder:
    """A decoder-only export folder: scoring through onnxruntime, generation through onnxruntime-genai."""

    def __init__(self, folder: Path, threads: int | None = None):
        self.folder = Path(folder)
        self.config = genai_config(self.folder)
        model = self.config["model"]
        self.context_length = int(model.get("context_length") or 2048)
        self.vocab_size = int(model["vocab_size"])
        eos = model.get("eos_token_id")
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        self.pad_id = int(
            model.get("pad_token_id") if model.get("pad_token_id") is not None else min(self.eos_ids, default=0)
        )
        self.threads = threads
        self.provider = _provider(self.config)
        self._session: Any = None
        self._model: Any = None
        self._lock = threading.Lock()

    # -- teacher-forced logits ---------------------------------------------------------------

    @property
    def session(self) -> Any:
        with self._lock:
            if self._session is None:
                ort = import_onnxruntime()
                decoder = self.config["model"]["decoder"]
                self._session = ort.InferenceSession(
                    str(self.folder / decoder["filename"]), ort_session_options(self.threads), providers=[self.provider]
                )
                self._empty_past = [
                    (i.name, i.shape[1], _NP_TYPES.get(i.type, "float32"))
                    for i in self._session.get_inputs()
                    if i.name.startswith("past_key_values")
                ]
                self._head_size = int(decoder["head_size"])
            return self._session

    def logits(self, input_ids: Any, attention_mask: Any) -> Any:
        """Logits [batch, length, vocab] (numpy float32) for right-padded ``input_ids`` [batch, length]."""
        import numpy as np

        if self.config["model"]["decoder"].get("sliding_window"):
            return self._genai_logits(input_ids, attention_mask)
        session = self.session
        batch = input_ids.shape[0]
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        for name, heads, dtype in self._empty_past:  # an empty cache: the whole sequence is the prompt
            feeds[name] = np.zeros((batch, heads, 0, self._head_size), dtype=dtype)
        return session.run(["logits"], feeds)[0].astype(np.float32, copy=False)

    def _genai_logits(self, input_ids: Any, attention_mask: Any) -> Any:
        """:meth:`logits` through onnxruntime-genai, one row at a time, for graphs with sliding-window
        layers: their GroupQueryAttention keeps a windowed KV cache that must hold at least the window,
        so the empty cache of the plain session is refused ("KV cache capacity (0) must be at least
        local_window_size"), while onnxruntime-genai allocates the cache it needs and returns the
        prompt's logits at every position."""
        import numpy as np

        og = import_genai()
        batch, length = input_ids.shape
        out = np.zeros((batch, length, self.vocab_size), dtype=np.float32)
        for row in range(batch):
            n = int(attention_mask[row].sum())
            params = og.GeneratorParams(self.genai_model)
            params.set_search_options(max_length=self._cache_length(n + 1), batch_size=1)
            generator = og.Generator(self.genai_model, params)
            try:
                generator.append_tokens([[int(t) for t in input_ids[row, :n]]])
                out[row, :n] = np.asarray(generator.get_output("logits"), dtype=np.float32).reshape(n, -1)
            finally:
                del generator
        return out

    def _cache_length(self, needed: int) -> int:
        """The generator's max_length for ``needed`` positions: at least the sliding window, since
        onnxruntime-genai's KV cache is max_length long and GroupQueryAttention refuses a windowed cache
        shorter than its window ("KV cache capacity (31) must be at least local_window_size (512)" for a
        short Gemma 3 prompt)."""
        window = (self.config["model"]["decoder"].get("sliding_window") or {}).get("window_size") or 0
        return max(needed, min(int(window), self.context_length))

    # -- generation --------------------------------------------------------------------------

    @property
    def genai_model(self) -> Any:
        with self._lock:
            if self._model is None:
                og = import_genai()
                self._model = og.Model(str(self.folder))
            return self._model

    def tokens(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
    ) -> Iterator[int]:
        """New token ids, one at a time, until the model's eos (not before ``min_new_tokens``),
        ``max_new_tokens`` or the context ends (the caller may stop earlier: closing the iterator frees
        the generator)."""
        og = import_genai()

        model = self.genai_model
        total = min(len(prompt) + max_new_tokens, self.context_length)
        if len(prompt) >= total:
            return
        params = og.GeneratorParams(model)
        search: dict[str, Any] = {
            "max_length": self._cache_length(total),
            "batch_size": 1,
            "min_length": min(len(prompt) + min_new_tokens, total),
        }
        if temperature > 0:
            search.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=self.vocab_size)
            if seed is not None:
                search["random_seed"] = int(seed) % 2**31
        else:
            search.update(do_sample=False)
        params.set_search_options(**search)
        generator = og.Generator(model, params)
        try:
            generator.append_tokens([list(prompt)])
            # the generator may run longer than asked (its max_length is at least the window): stop at total
            for _ in range(total - len(prompt)):
                if generator.is_done():
                    break
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])
        finally:
            del generator
