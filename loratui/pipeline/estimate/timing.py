"""How long each step takes: training from the measured probe (or, without one, from the model's
floating-point work and this device's measured matrix-multiply speed), the other steps from their work
and the same speed.

Training work per token (LoRA on a frozen base): the forward pass multiplies every weight once (2 FLOPs
each), the backward pass once more for the inputs' gradients (the base's weights get no gradient), a
recomputed forward under gradient checkpointing, and the head on the trained positions (forward, backward).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from loratui.pipeline.estimate.memory import TrainPlan
from loratui.pipeline.estimate.shape import ModelShape

# Training reaches about this share of the measured matmul speed (small products, elementwise work, the
# optimizer). Checked by bench/estimate_accuracy.py: without a probe, estimated / measured training time
# between 0.6 and 1.4 over its four configurations on the 2-core EPYC. Without a probe the time is good to
# about a factor of 2.
TRAIN_EFFICIENCY = 0.55
# The other steps are priced roughly (within about a factor of 2), from the quickstart on the 2-core EPYC: its eval step
# (29 rows, base and tuned, batch 8, 64 new tokens) took 41 s, its merge 9.9 s, its q8_0 GGUF export with
# the verification 36 s. A batched decoding step of transformers' generate costs a fixed part (Python, the
# cache, sampling) beside its FLOPs.
DECODE_STEP_OVERHEAD_S = 0.04
LOAD_S_PER_GB = 2.0  # reading and building a model from safetensors, per GB of fp32 weights (page cache warm)
WRITE_BYTES_PER_S = 150e6  # saving safetensors / GGUF files
GGUF_QUANT_S_PER_B = 120.0  # llama-quantize and the verification decode, per billion parameters per type
# Validation during training, per token, against a training token: half (no backward, but the whole head and
# loss on every position). Measured on the quickstart: 2.5 s for its 25 validation rows (1,500 tokens)
# between steps of 3.1 s per 1,000 training tokens.
EVAL_FORWARD_SHARE = 0.5


@dataclass(frozen=True)
class Rate:
    """Seconds per trained token of a run, and where the figure comes from."""

    seconds_per_token: float
    source: str  # "probe" or "analytic"
    setup_s: float  # loading the model and building the Trainer


def matmul_flops(
    shape: ModelShape, tokens: int, device: str = "cpu", precision: str = "fp32", seconds: float = 0.5
) -> float:
    """FLOP/s this process gets on ``device`` from the product training does most: a micro-batch of
    ``tokens`` hidden states through an MLP projection of this model, in the training's compute dtype (what
    autocast multiplies in); a short measurement."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    m, k, n = max(16, min(tokens, 2048)), shape.hidden, max(shape.intermediate, shape.hidden)
    if m * k + k * n > 256 << 20:  # a huge model: a slice of the projection is as fast per FLOP
        n = max(256, (256 << 20) // k - m)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    (a @ b).sum().item()  # warm up (and wait for the device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        c = a @ b
        runs += 1
    c.sum().item()
    return 2 * m * k * n * runs / (time.perf_counter() - start)


def train_flops_per_token(shape: ModelShape, plan: TrainPlan, trained_share: float) -> float:
    """FLOPs of one token of training (forward, inputs' backward, recompute, head on trained positions)."""
    body = shape.params - shape.vocab * shape.hidden * (1 if shape.tied else 2)
    if shape.experts:  # only the routed experts a token visits do work
        per_layer_experts = 3 * shape.hidden * shape.expert_intermediate
        body -= shape.layers * per_layer_experts * (shape.experts - shape.experts_active)
    passes = 3 if plan.gradient_checkpointing else 2
    head = 2 * shape.vocab * shape.hidden * (2 * trained_share if plan.padding_free else 2)
    if plan.reference_forward:  # DPO/KTO: the frozen reference's forward and its head on the same tokens
        passes += 1
        head += 2 * shape.vocab * shape.hidden * (trained_share if plan.padding_free else 1)
    return 2 * body * passes + head


def analytic_rate(shape: ModelShape, plan: TrainPlan, flops: float, trained_share: float) -> Rate:
    per_token = train_flops_per_token(shape, plan, trained_share) / (flops * TRAIN_EFFICIENCY)
    return Rate(per_token, "analytic", load_seconds(shape, plan.device))


def load_seconds(shape: ModelShape, device: str) -> float:
    return 3.0 + LOAD_S_PER_GB * shape.params * 4 / 1e9


def computed_tokens(lengths: list[int], micro: int, padding_free: bool, seed: int) -> int:
    """Tokens one epoch computes: every token padding-free; padded, each shuffled micro-batch pads to its longest."""
    if padding_free or micro <= 1:
        return sum(lengths)
    order = list(lengths)
    random.Random(seed).shuffle(order)
    return sum(len(order[i : i + micro]) * max(order[i : i + micro]) for i in range(0, len(order), micro))


def optimizer_steps(rows: int, micro: int, accum: int, nproc: int, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    per_epoch = max(1, math.ceil(math.ceil(rows / max(1, micro * nproc)) / max(1, accum)))
    return max(1, math.ceil(per_epoch * epochs))


def eval_seconds(shape: ModelShape, rows: int, models: int, batch: int, new_tokens: int, flops: float) -> float:
    """Batched greedy generation of ``rows`` prompts on ``models`` models (base and tuned) plus their loss."""
    batches = math.ceil(rows / max(1, batch))
    step = DECODE_STEP_OVERHEAD_S + 2 * shape.params * min(batch, max(rows, 1)) / (flops * TRAIN_EFFICIENCY)
    return models * (load_seconds(shape, "cpu") + batches * new_tokens * step)


def merge_seconds(shape: ModelShape, out_bytes: int) -> float:
    return load_seconds(shape, "cpu") + out_bytes / WRITE_BYTES_PER_S + 2.0  # load, merge, save, parity check


def gguf_seconds(shape: ModelShape, types: int, f16_bytes: int) -> float:
    return 5.0 + f16_bytes / WRITE_BYTES_PER_S + types * GGUF_QUANT_S_PER_B * max(shape.billions, 0.05)


def onnx_seconds(shape: ModelShape, types: int) -> float:
    # tracing the graph and saving fp32, then the verification runs; each quantized type re-reads it
    return 10.0 + shape.params * 4 / WRITE_BYTES_PER_S * 3 + types * 60.0 * max(shape.billions, 0.1)
