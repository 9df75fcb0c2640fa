"""Runtimes behind the server: one ``Backend`` per format (llama.cpp GGUF, PyTorch, ONNX Runtime).

Every backend turns a :class:`GenRequest` (prompt token ids, sampling settings, stop strings, a
cancel flag) into a stream of :class:`Delta` objects: new text, and at the end a finish reason and
the token counts. Text is assembled the same way everywhere (:class:`TextAssembler`): incremental
detokenization that never emits half a UTF-8 character, and stop strings that are cut out and never
streamed in part.

Concurrency: each backend owns one model. ``LlamaCppBackend`` and ``OnnxBackend`` serve one request at
a time (a lock: an honest queue; the server bounds it and answers 429 when it is full). ``TorchBackend``
batches continuously: a request that arrives joins the running batch at the next decode step (up to
``max_batch_size`` rows), each row with its own sampling and stop rules, and leaves it when done.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# transformers models (PyTorch), and ONNX exports (onnxruntime-genai)
# --------------------------------------------------------------------------------------------


class _HFBase:
    """Tokenizer, chat template and stop ids of a transformers model directory."""

    def _setup_tokenizer(self, tokenizer: Any, generation_eos: Any) -> None:
        self.tokenizer = tokenizer
        stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if generation_eos is not None:
            stops |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        template = getattr(tokenizer, "chat_template", None) or ""
        for token in tokenizer.all_special_tokens:
            if token and token in template and token != tokenizer.bos_token and "end" in token.lower():
                stops.add(tokenizer.convert_tokens_to_ids(token))
        self.stop_ids = {int(s) for s in stops}
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


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


class TorchBackend(_HFBase):
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
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        from loratui.pipeline.evaluate.runtimes import load_torch

        self.model_id = model_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_torch(model_dir, "causal", self.device, "bf16" if self.device == "cuda" else "fp32")
        self.models: dict[str, str | None] = {model_id: None}
        self.failed: dict[str, str] = {}
        self.mixed = False
        if adapter is not None:
            from loratui.pipeline.evaluate.runtimes import apply_adapter

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
        self.waiting: queue.Queue[tuple[GenRequest, queue.Queue[Delta | None]]] = queue.Queue()
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
        import torch

        rows: list[_Row] = []
        cache: Any = None
        mask: Any = None  # (rows, length) attention mask of the running batch
        last: Any = None  # each row's last token
        while self.running:
            admitted = []
            if not rows:
                admitted.append(self.waiting.get())
                if not self.running:
                    return
            while len(rows) + len(admitted) < (self.max_batch_size if self.mergeable else 1):
                try:
                    admitted.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            admitted = [(req, out) for req, out in admitted if req.prompt_ids]
            if admitted:
                try:
                    fresh, new_cache, new_mask, new_tokens = self._prefill(admitted)
                except Exception as e:  # these requests fail; the running ones go on
                    for _req, out in admitted:
                        out.put(Delta(finish_reason=f"error: {type(e).__name__}: {e}"))
                        out.put(None)
                    fresh = []
                live = [i for i, row in enumerate(fresh) if not row.done]
                if live:
                    if len(live) < len(fresh):
                        index = torch.tensor(live, device=self.device)
                        new_cache.batch_select_indices(index)
                        new_cache, new_mask = self._trim(new_cache, new_mask[index])
                    cache, mask = self._join(cache, mask, new_cache, new_mask)
                    token_t = torch.tensor([new_tokens[i] for i in live], device=self.device)
                    last = token_t if last is None else torch.cat([last, token_t])
                    rows.extend(fresh[i] for i in live)
            if not rows:
                cache = mask = last = None
                continue
            try:
                with torch.inference_mode():
                    mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
                    position = mask.sum(-1, keepdim=True) - 1
                    out = self.model(
                        input_ids=last.unsqueeze(1),
                        attention_mask=mask,
                        position_ids=position,
                        past_key_values=cache,
                        use_cache=True,
                        **self._adapter_args(rows),
                    )
                    cache = out.past_key_values
                    logits = out.logits[:, -1, :].float().cpu()
            except Exception as e:  # a model failure ends these requests, not the worker
                for row in rows:
                    row.finish(f"error: {type(e).__name__}: {e}")
                rows, cache, mask, last = [], None, None, None
                continue
            tokens = [self._next(row, logits[i]) for i, row in enumerate(rows)]
            keep = [i for i, row in enumerate(rows) if not row.done]
            if len(keep) < len(rows):
                if not keep:
                    rows, cache, mask, last = [], None, None, None
                    continue
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask = mask[index]
                rows = [rows[i] for i in keep]
                tokens = [tokens[i] for i in keep]
                cache, mask = self._trim(cache, mask)
            last = torch.tensor(tokens, device=self.device)

    def _prefill(self, admitted: list[tuple[GenRequest, Any]]) -> tuple[list[_Row], Any, Any, list[int]]:
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


class OnnxBackend(_HFBase):
    """An ONNX export folder (onnxruntime-genai's layout): one request at a time, greedy or sampled by
    onnxruntime-genai's own generation loop, streamed token by token."""

    kind = "onnxruntime"

    def __init__(self, model_dir: Path, model_id: str, context_length: int = 2048, threads: int | None = None):
        from transformers import AutoTokenizer

        from loratui.pipeline.evaluate.runtimes import load_onnx

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
