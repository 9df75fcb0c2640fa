"""PyTorch (transformers) with continuous batching: requests join the running batch between decode steps."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.serving.backends.base import Decoding, Delta, GenRequest
from loratui.serving.backends.hf import HFBase

_Waiting = tuple[GenRequest, queue.Queue[Delta | None]]  # a request and where its deltas go


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    import torch

    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class TorchBackend(HFBase):
    """A transformers model in PyTorch. Concurrent requests are decoded together (continuous batching,
    up to ``max_batch_size`` rows) with a shared KV cache; each row keeps its own sampling, stops and length."""

    kind = "torch"

    def __init__(
        self,
        model_dir: Path,
        model_id: str,
        context_length: int = 2048,
        max_batch_size: int = 8,
        device: str | None = None,
        adapter: Path | None = None,
        adapters: dict[str, Path] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        """``adapter``: served as ``model_id``. ``adapters``: several, each served under its own name, the
        base under ``model_id`` (peft's mixed-adapter batches: one batch may hold rows of each); one
        that fails to load is left out and listed in ``failed``."""
        from transformers import AutoTokenizer, GenerationConfig

        from loratui.pipeline import device as devices
        from loratui.pipeline.eval.runtimes import load_torch

        self.model_id = model_id
        hw = devices.probe()  # the training table: CUDA, then Apple MPS, then the CPU
        self.device = device or devices.choose("auto", hw).value
        self.model = load_torch(model_dir, "causal", self.device, devices.inference_precision(self.device, hw))
        self.models: dict[str, str | None] = {model_id: None}
        self.failed: dict[str, str] = {}
        self.mixed = False
        if adapter is not None:
            from loratui.pipeline.eval.runtimes import apply_adapter

            self.model = apply_adapter(self.model, adapter)
        elif adapters:
            self._load_adapters(adapters, log or (lambda m: None))
        source = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model_dir
        try:
            eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        except OSError:
            eos = None
        self._setup_tokenizer(AutoTokenizer.from_pretrained(str(source)), eos)
        limit = getattr(self.model.config, "max_position_embeddings", None) or context_length
        self.context_length = min(context_length, limit)
        self.max_batch_size = max_batch_size
        self.mergeable = self._plain_cache()
        import inspect

        self.last_logits_only = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.prefix_caching = True
        self.prefix: tuple[list[int], list[tuple[Any, Any]], str | None] | None = None
        self.waiting: queue.Queue[_Waiting] = queue.Queue()
        self.running = True
        self.worker = threading.Thread(target=self._loop, name="torch-batcher", daemon=True)
        self.worker.start()

    def _load_adapters(self, adapters: dict[str, Path], log: Callable[[str], None]) -> None:
        from peft import PeftModel

        peft_model = None
        for name, path in adapters.items():
            try:
                config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
                if config.get("use_dora"):
                    raise ValueError("DoRA adapters cannot share a batch with others (serve it alone, or merged)")
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                else:
                    peft_model.load_adapter(str(path), adapter_name=name)
                self.models[name] = name
            except Exception as e:  # noqa: BLE001 - the others are still served
                self.failed[name] = f"{type(e).__name__}: {e}"
                log(f"serve: adapter {name} ({path}) failed to load: {self.failed[name]}")
        if peft_model is not None:
            self.model = peft_model.eval()
            self.models[self.model_id] = "__base__"
            self.mixed = True

    def _adapter_args(self, rows: list[_Row]) -> dict[str, Any]:
        return {"adapter_names": [row.req.adapter or "__base__" for row in rows]} if self.mixed else {}

    def _plain_cache(self) -> bool:
        """Whether the model's KV cache is plain per-layer tensors that rows can be added to and padded
        (sliding-window or hybrid caches are not: such models decode one request at a time)."""
        import torch
        from transformers.cache_utils import DynamicLayer

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[self.pad_id]], device=self.device), use_cache=True)
        layers = getattr(out.past_key_values, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers or ())

    def stream(self, req: GenRequest) -> Iterator[Delta]:
        out: queue.Queue[Delta | None] = queue.Queue()
        self.waiting.put((req, out))
        while True:
            item = out.get()
            if item is None:
                return
            yield item

    def close(self) -> None:
        self.running = False
        self.waiting.put((GenRequest([], 0), queue.Queue()))  # wake the worker
        self.worker.join(timeout=10)

    def _loop(self) -> None:
        """Continuous batching: new requests join between decode steps (the ones that arrived together
        prefilled in one forward, their KV cache left-padded into the batch's); finished ones leave at once."""
        batch = _Batch()
        while self.running:
            admitted = self._admit(len(batch.rows))
            if admitted is None:  # closing
                return
            if admitted:
                self._add(batch, admitted)
            if not batch.rows:
                batch.clear()
                continue
            self._step(batch)

    def _admit(self, running: int) -> list[_Waiting] | None:
        """The requests that join the batch now (waiting for one when the batch is empty); None when closing."""
        admitted: list[_Waiting] = []
        if not running:
            admitted.append(self.waiting.get())
            if not self.running:
                return None
        while running + len(admitted) < (self.max_batch_size if self.mergeable else 1):
            try:
                admitted.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return [(req, out) for req, out in admitted if req.prompt_ids]

    def _add(self, batch: _Batch, admitted: list[_Waiting]) -> None:
        """Prefill ``admitted`` and add the rows that go on generating to the batch."""
        import torch

        try:
            fresh, new_cache, new_mask, new_tokens = self._prefill(admitted)
        except Exception as e:  # these requests fail; the running ones go on
            for _req, out in admitted:
                out.put(Delta(finish_reason=f"error: {type(e).__name__}: {e}"))
                out.put(None)
            return
        live = [i for i, row in enumerate(fresh) if not row.done]
        if not live:
            return
        if len(live) < len(fresh):
            new_cache, new_mask = self._select(new_cache, new_mask, live)
        batch.cache, batch.mask = self._join(batch.cache, batch.mask, new_cache, new_mask)
        token_t = torch.tensor([new_tokens[i] for i in live], device=self.device)
        batch.last = token_t if batch.last is None else torch.cat([batch.last, token_t])
        batch.rows.extend(fresh[i] for i in live)

    def _step(self, batch: _Batch) -> None:
        """One decode step for every row; the rows that finished leave the batch."""
        import torch

        try:
            logits = self._forward(batch)
        except Exception as e:  # a model failure ends these requests, not the worker
            for row in batch.rows:
                row.finish(f"error: {type(e).__name__}: {e}")
            batch.clear()
            return
        tokens = [self._next(row, logits[i]) for i, row in enumerate(batch.rows)]
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if not keep:
            batch.clear()
            return
        if len(keep) < len(batch.rows):
            batch.cache, batch.mask = self._select(batch.cache, batch.mask, keep)
            batch.rows = [batch.rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        batch.last = torch.tensor(tokens, device=self.device)

    def _forward(self, batch: _Batch) -> Any:
        """The model on each row's last token: the batch's cache and mask grow by one column; the next logits."""
        import torch

        with torch.inference_mode():
            ones = torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=self.device)
            batch.mask = torch.cat([batch.mask, ones], dim=1)
            position = batch.mask.sum(-1, keepdim=True) - 1
            out = self.model(
                input_ids=batch.last.unsqueeze(1),
                attention_mask=batch.mask,
                position_ids=position,
                past_key_values=batch.cache,
                use_cache=True,
                **self._adapter_args(batch.rows),
            )
            batch.cache = out.past_key_values
            return out.logits[:, -1, :].float().cpu()

    def _select(self, cache: Any, mask: Any, keep: list[int]) -> tuple[Any, Any]:
        """Only the rows ``keep`` of a cache and its mask, without the left columns none of them uses."""
        import torch

        index = torch.tensor(keep, device=self.device)
        cache.batch_select_indices(index)
        return self._trim(cache, mask[index])

    def _prefill(self, admitted: list[_Waiting]) -> tuple[list[_Row], Any, Any, list[int]]:
        """The admitted prompts in one forward: their rows, KV cache, mask and first tokens.

        Prefix caching: when every prompt starts like the previous prefill's first prompt (a chat's
        system prompt, a shared instruction) and they use the same adapter, that prompt's KV cache
        stands in for the shared part and only the rest is computed. The batch is laid out as
        ``[shared prefix][left-padded rest]``; the mask holds the padding wherever it is."""
        import torch

        keep = {"logits_to_keep": 1} if self.last_logits_only else {}  # the head on the last position only
        rows = [_Row(req, out, self.decode, self.stop_ids, self.context_length) for req, out in admitted]
        prompts = [req.prompt_ids for req, _ in admitted]
        adapters = {req.adapter for req, _ in admitted}
        shared, past = self._cached_prefix(prompts, adapters.pop()) if len(adapters) == 1 else (0, None)
        rests = [p[shared:] for p in prompts]
        longest = max(len(r) for r in rests)
        ids_t = torch.full((len(rests), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rests), shared + longest), dtype=torch.long)
        mask[:, :shared] = 1
        for i, rest in enumerate(rests):
            ids_t[i, longest - len(rest) :] = torch.tensor(rest)
            mask[i, shared + longest - len(rest) :] = 1
        ids_t, mask = ids_t.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            result = self.model(
                input_ids=ids_t,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, shared:],
                past_key_values=past,
                use_cache=True,
                **keep,
                **self._adapter_args(rows),
            )
        if self.prefix_caching and self.mergeable:  # keyed by adapter too: another adapter's KV is another model's
            columns = mask[0].nonzero().squeeze(1)
            self.prefix = (
                list(prompts[0]),
                [
                    (layer.keys[:1, :, columns], layer.values[:1, :, columns])
                    for layer in self._layers(result.past_key_values)
                ],
                admitted[0][0].adapter,
            )
        logits = result.logits[:, -1].float().cpu()
        return rows, result.past_key_values, mask, [self._next(row, logits[i]) for i, row in enumerate(rows)]

    def _cached_prefix(self, prompts: list[list[int]], adapter: str | None = None) -> tuple[int, Any]:
        """(tokens reused, a KV cache holding them for each prompt) from the previous prefill's first
        prompt when it was for the same adapter; (0, None) below 8 shared tokens."""
        if not (self.prefix_caching and self.mergeable and self.prefix) or self.prefix[2] != adapter:
            return 0, None
        from transformers.cache_utils import DynamicCache

        old, layers, _adapter = self.prefix
        shared = len(old)
        for ids in prompts:
            limit = min(shared, len(ids) - 1)  # at least one new token per prompt, for its logits
            n = 0
            while n < limit and old[n] == ids[n]:
                n += 1
            shared = n
        if shared < 8:
            return 0, None
        cache = DynamicCache()
        for i, (keys, values) in enumerate(layers):
            cache.update(
                keys[:, :, :shared, :].expand(len(prompts), -1, -1, -1).contiguous(),
                values[:, :, :shared, :].expand(len(prompts), -1, -1, -1).contiguous(),
                i,
            )
        return shared, cache

    def _next(self, row: _Row, logits: Any) -> int:
        if row.req.cancelled.is_set():
            row.finish("cancelled")
            return self.pad_id
        token = _sample(logits, row.req.temperature, row.req.top_p, row.generator)
        row.take(token)
        return token

    @staticmethod
    def _layers(cache: Any) -> list[Any]:
        return list(cache.layers)

    def _join(self, cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> tuple[Any, Any]:
        """The batch cache with the rows of ``new_cache`` added below, both aligned on the right."""
        import torch
        import torch.nn.functional as F

        if cache is None:
            return new_cache, new_mask
        width, new_width = mask.shape[1], new_mask.shape[1]
        short, pad = (new_cache, width - new_width) if new_width < width else (cache, new_width - width)
        if pad:  # left-pad the narrower side with masked-out positions
            for layer in self._layers(short):
                layer.keys = F.pad(layer.keys, (0, 0, pad, 0))
                layer.values = F.pad(layer.values, (0, 0, pad, 0))
            if short is cache:
                mask = F.pad(mask, (pad, 0))
            else:
                new_mask = F.pad(new_mask, (pad, 0))
        for layer, new in zip(self._layers(cache), self._layers(new_cache)):
            layer.keys = torch.cat([layer.keys, new.keys], dim=0)
            layer.values = torch.cat([layer.values, new.values], dim=0)
        return cache, torch.cat([mask, new_mask], dim=0)

    def _trim(self, cache: Any, mask: Any) -> tuple[Any, Any]:
        """Drop left columns that no remaining row uses."""
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            for layer in self._layers(cache):
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]
            mask = mask[:, start:]
        return cache, mask


class _Row(Decoding):
    """One request inside TorchBackend's batch: its decoding state, its output queue, its sampler."""

    def __init__(
        self,
        req: GenRequest,
        out: queue.Queue[Delta | None],
        decode: Callable[[list[int]], str],
        stop_ids: set[int],
        context_length: int,
    ):
        import torch

        super().__init__(req, decode, stop_ids, out.put, context_length)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % 2**63))


@dataclass
class _Batch:
    """The running batch: its rows, their shared KV cache, attention mask (rows, length) and last tokens."""

    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    mask: Any = None
    last: Any = None

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.last = [], None, None, None
