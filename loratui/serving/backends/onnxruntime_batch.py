"""An ONNX export's decoder graph driven one step at a time in onnxruntime, with one KV cache that
requests join and leave between steps (continuous batching for :class:`~.onnxruntime_backend.OnnxBackend`).

Why not onnxruntime-genai: its ``Generator`` decodes a fixed batch, and its ``Engine`` batches
continuously only on a PagedAttention graph (CUDA, fp16/bf16). On the CPU exports loratui writes it
takes its static path, where a batch is formed once and nothing joins it until every row is done.

The layout is the one GroupQueryAttention reads (``past_present_share_buffer`` in genai_config.json):

* each layer's key and value cache is one numpy buffer ``[rows, kv_heads, capacity, head_size]``;
  row ``r`` holds its ``lengths[r]`` positions from the left, and what lies after them is never read;
* the attention mask only tells GQA each row's total length (its sum); the rotary positions are
  those lengths, so rows of different lengths decode together without padding anything;
* a decode step binds the first ``rows`` rows of each buffer as both the past input and the present
  output (IO binding): GQA writes the new key and value in place at position ``lengths[r]`` and no
  cache is copied;
* a new request is prefilled alone (no padding: its logits are those of a request served alone)
  straight into the next free row, bound the same way; the part of its prompt it shares with the
  previous prompt (a chat's system prompt) is copied from that prompt's cache, and only the rest runs;
* a row that leaves is replaced by the last live one (one row copied), so the live rows are always
  the first ``rows``.

Buffers grow (doubling, up to the context length) when a row needs more positions and are released
when the batch empties.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loratui.pipeline.eval.ort import import_onnxruntime

_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}
_INPUTS = {"input_ids", "attention_mask", "position_ids", "past_key_names", "past_value_names"}


def unsupported(config: dict[str, Any]) -> str | None:
    """Why this export's graph cannot be batched here (from its genai_config.json), or None."""
    decoder = config["model"]["decoder"]
    if not config.get("search", {}).get("past_present_share_buffer"):
        return "its attention is not GroupQueryAttention with a shared KV buffer"
    if decoder.get("sliding_window"):
        return "it has sliding-window layers (a windowed KV cache)"
    providers = {name for entry in decoder.get("session_options", {}).get("provider_options", []) for name in entry}
    if providers:
        return f"it was built for {', '.join(sorted(providers))}, not the CPU"
    extra = set(decoder.get("inputs", {})) - _INPUTS
    if extra:
        return f"its graph takes {', '.join(sorted(extra))}"
    return None


class BatchDecoder:
    """``session`` (the export's decoder) over a KV cache of up to ``max_rows`` rows; see the module doc."""

    def __init__(self, session: Any, config: dict[str, Any], max_rows: int, context_length: int):
        import numpy as np

        decoder = config["model"]["decoder"]
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        self.session = session
        self.input_ids = inputs.get("input_ids", "input_ids")
        self.attention_mask = inputs.get("attention_mask", "attention_mask")
        self.position_ids = inputs.get("position_ids")
        self.logits_name = outputs.get("logits", "logits")
        layers = range(int(decoder["num_hidden_layers"]))
        self.names = [
            (inputs[f"past_{kind}_names"] % i, outputs[f"present_{kind}_names"] % i)
            for i in layers
            for kind in ("key", "value")
        ]
        types = {i.name: i.type for i in session.get_inputs()} | {o.name: o.type for o in session.get_outputs()}
        bad = {types.get(past) for past, _ in self.names} | {types.get(self.logits_name)}
        if not bad <= set(_NP_TYPES):
            raise ValueError(f"the KV cache or logits are {sorted(map(str, bad))}, not float tensors")
        self.cache_type = np.dtype(_NP_TYPES[types[self.names[0][0]]])
        self.logits_type = np.dtype(_NP_TYPES[types[self.logits_name]])
        self.shape = (int(decoder["num_key_value_heads"]), int(decoder["head_size"]))
        self.vocab_size = int(config["model"]["vocab_size"])
        self.max_rows = max_rows
        self.context_length = context_length
        self.rows = 0
        self.lengths = np.zeros(max_rows, dtype=np.int64)
        self.capacity = 0
        self.buffers: list[Any] = []
        self.prefix_caching = True
        self.prefix: tuple[list[int], list[Any]] | None = None  # the last prefilled prompt and its KV cache

    def clear(self) -> None:
        """No rows; the buffers are released."""
        self.rows, self.capacity, self.buffers = 0, 0, []
        self.lengths[:] = 0

    def _reserve(self, length: int) -> None:
        """Room for ``length`` positions in every row (the live rows copied when the buffers grow)."""
        import numpy as np

        if length <= self.capacity:
            return
        capacity = max(length, min(max(2 * self.capacity, 128), self.context_length))
        heads, size = self.shape
        grown = [np.empty((self.max_rows, heads, capacity, size), dtype=self.cache_type) for _ in self.names]
        for old, new in zip(self.buffers, grown):
            new[: self.rows, :, : self.capacity] = old[: self.rows]
        self.buffers, self.capacity = grown, capacity

    def prefill(self, prompt: Sequence[int]) -> Any:
        """A new row for ``prompt``, after the live ones; its next-token logits [vocab].

        Prefix caching: the part ``prompt`` shares with the previous prefill's prompt (a chat's system
        prompt, a shared instruction; 8 tokens or more) is copied from that prompt's KV cache and only
        the rest runs through the graph (GroupQueryAttention's continued prompt, at its positions)."""
        import numpy as np

        if self.rows >= self.max_rows:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        n = len(prompt)
        if not n:
            raise ValueError("an empty prompt")
        self._reserve(n)
        row = self.rows
        shared = self._shared(prompt)
        if shared:
            assert self.prefix is not None
            for buffer, cached in zip(self.buffers, self.prefix[1]):
                buffer[row, :, :shared] = cached[:, :shared]
        ids = np.asarray([prompt[shared:]], dtype=np.int64)
        logits = self._run(row, 1, ids, np.ones((1, n), dtype=np.int64), np.arange(shared, n, dtype=np.int64)[None])
        self.lengths[row] = n
        self.rows += 1
        if self.prefix_caching:
            self.prefix = (list(prompt), [buffer[row, :, :n].copy() for buffer in self.buffers])
        return logits[0, -1].astype(np.float32, copy=False)

    def _shared(self, prompt: Sequence[int]) -> int:
        """How many first tokens of ``prompt`` the cached prefix holds (at least one left to run; 0 below 8)."""
        if not (self.prefix_caching and self.prefix):
            return 0
        old = self.prefix[0]
        limit = min(len(old), len(prompt) - 1)
        shared = 0
        while shared < limit and old[shared] == prompt[shared]:
            shared += 1
        return shared if shared >= 8 else 0

    def step(self, tokens: Sequence[int]) -> Any:
        """Each live row's next token in: the rows' next-token logits [rows, vocab]."""
        import numpy as np

        rows = self.rows
        if len(tokens) != rows:
            raise ValueError(f"{len(tokens)} tokens for {rows} rows")
        lengths = self.lengths[:rows]
        total = int(lengths.max()) + 1
        self._reserve(total)
        ids = np.asarray(tokens, dtype=np.int64).reshape(rows, 1)
        # right-padded: only each row's sum (its length with the new token) matters to GQA
        mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(0, rows, ids, mask, lengths.reshape(rows, 1).copy())
        lengths += 1
        return logits[:, 0].astype(np.float32, copy=False)

    def _run(self, first: int, rows: int, ids: Any, mask: Any, positions: Any) -> Any:
        """The graph on rows ``first .. first + rows`` of the cache: their past is those rows of every
        buffer, bound as the present too, so GQA writes the new keys and values in place; the logits
        [rows, len(ids[0]), vocab]."""
        import numpy as np

        ort = import_onnxruntime()
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_ids, ids)
        binding.bind_cpu_input(self.attention_mask, mask)
        if self.position_ids:
            binding.bind_cpu_input(self.position_ids, positions)
        logits = np.empty((rows, ids.shape[1], self.vocab_size), dtype=self.logits_type)
        binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(logits))
        for (past, present), buffer in zip(self.names, self.buffers):
            shared = ort.OrtValue.ortvalue_from_numpy(buffer[first : first + rows])  # a view, written in place
            binding.bind_ortvalue_input(past, shared)
            binding.bind_ortvalue_output(present, shared)
        self.session.run_with_iobinding(binding)
        return logits

    def keep(self, keep: Sequence[int]) -> list[int]:
        """Only the rows ``keep`` (ascending) stay. Those in the first ``len(keep)`` slots stay put, the
        others move down into the freed slots; returns the old row each slot now holds."""
        count = len(keep)
        kept = set(keep)
        holes = [slot for slot in range(count) if slot not in kept]
        movers = [row for row in keep if row >= count]
        by_slot = {row: row for row in keep if row < count}
        for slot, row in zip(holes, movers):
            length = int(self.lengths[row])
            for buffer in self.buffers:
                buffer[slot, :, :length] = buffer[row, :, :length]
            self.lengths[slot] = length
            by_slot[slot] = row
        self.rows = count
        return [by_slot[slot] for slot in range(count)]
