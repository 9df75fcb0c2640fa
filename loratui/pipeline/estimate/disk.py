"""What a run writes: checkpoints (as many as ``save_total_limit`` keeps), the adapter (the current one and
its version in the history), the merged model, every configured export and the f16 GGUF the quantized types
are made from (deleted afterwards unless ``export.gguf_keep_f16``: it counts towards the peak)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from loratui.pipeline.config import RunConfig
from loratui.pipeline.estimate.memory import optimizer_bytes
from loratui.pipeline.estimate.shape import ModelShape

# Bits per weight of llama.cpp's types (block scales included); K-quants keep some tensors at higher types,
# about 0.3 bits a weight more on small models.
GGUF_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.7, "q5_0": 5.5}
GGUF_BITS.update({"q4_k_m": 5.1, "q4_k_s": 4.9, "q4_0": 4.5, "q3_k_m": 4.2, "q2_k": 3.4, "iq4_xs": 4.5})


def gguf_bytes_per_weight(quant: str) -> float:
    """Bytes per weight of a llama.cpp type (the export's disk check uses it too); a type not in the table
    from the bits in its name, plus about 1.5 bits of scales and minimums."""
    q = quant.lower()
    if q in GGUF_BITS:
        return GGUF_BITS[q] / 8
    bits = re.search(r"(\d)", q)
    return (int(bits.group(1)) + 1.5) / 8 if bits else 2.0


SMALL_FILES = 200_000  # configs, trainer state, RNG state, README, chat template, a run's reports and events
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt")


def tokenizer_bytes(model_dir: Path) -> int:
    return sum((model_dir / n).stat().st_size for n in TOKENIZER_FILES if (model_dir / n).is_file())


def checkpoints_kept(cfg: RunConfig, steps: int, epochs: float) -> int:
    t = cfg.train
    saves = math.ceil(steps / t.save_every) if t.save_every else math.ceil(epochs)
    keep = t.save_total_limit + (1 if t.keep_best else 0)
    return max(1, min(saves, keep))


def export_parts(cfg: RunConfig, shape: ModelShape, adapter: int) -> dict[str, int]:
    """Bytes of each configured export (the merged safetensors folder is the merge step's)."""
    e = cfg.export
    out: dict[str, int] = {}
    if "gguf" in e.formats:
        for quant in e.gguf_quants:
            out[f"gguf {quant}"] = int(shape.params * gguf_bytes_per_weight(quant))
        needs_f16 = any(q.lower() not in ("f32", "f16", "bf16", "q8_0") for q in e.gguf_quants)
        if needs_f16:  # made first, deleted after quantizing unless kept
            out["gguf f16 intermediate"] = shape.params * 2
    if "gguf-lora" in e.formats:
        out["gguf-lora"] = int(adapter / 4 * gguf_bytes_per_weight(e.gguf_lora_type)) + shape.params * 2
    if "onnx" in e.formats:
        rest = shape.params - min(shape.linear_params, shape.params)
        out["onnx fp32"] = shape.params * 4
        for quant in e.onnx_quants:  # weight-only: the projections quantized, embeddings kept in fp32
            per = 1.0 if quant == "int8" else 0.5 + 4 / 32
            out[f"onnx {quant}"] = int(shape.linear_params * per) + rest * 4
    return out


def estimate_disk(
    cfg: RunConfig, shape: ModelShape, model_dir: Path, trainable: int, steps: int, epochs: float, data_tokens: int
) -> dict[str, int]:
    """Bytes per part of everything the run writes (``data_tokens``: tokens of every split)."""
    adapter = 4 * trainable
    checkpoint = adapter + optimizer_bytes(cfg.train.optimizer, trainable) + SMALL_FILES // 4
    merged_dtype = shape.disk_dtype_bytes
    parts = {
        "data": data_tokens * 8 + SMALL_FILES,  # input ids and labels, int32
        "checkpoints": checkpoint * checkpoints_kept(cfg, steps, epochs),
        "adapter": 2 * (adapter + tokenizer_bytes(model_dir) + SMALL_FILES // 4),  # adapter/ and adapters/vN/
        "merged": shape.params * merged_dtype + tokenizer_bytes(model_dir),
    }
    parts.update(export_parts(cfg, shape, adapter))
    return parts
