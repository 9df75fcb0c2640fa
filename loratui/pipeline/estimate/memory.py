"""Peak training memory, part by part: weights, adapter, gradients, optimizer states, activations, logits
and the framework itself. Pure arithmetic on a :class:`~loratui.pipeline.estimate.shape.ModelShape` and a
:class:`TrainPlan`, so ``auto`` batch sizing and the "what fits" search call it thousands of times for free.

What each part counts (LoRA on a frozen base, as loratui trains):
- weights: every parameter in the load dtype (fp32 on CPU; the compute dtype on CUDA and MPS); under QLoRA
  the decoder projections take 4 bits plus their block scales, the embeddings and head stay unquantized;
- adapter, gradients: fp32 (peft keeps adapter weights in fp32), one gradient per adapter weight;
- optimizer: AdamW keeps two fp32 moments per adapter weight, 8-bit AdamW two bytes, SGD one moment or none;
- activations: what autograd keeps per token and layer for the backward (the norms' inputs, the projections'
  inputs and outputs, the attention output, the gated MLP's four intermediate tensors, the adapters' rank-r
  intermediates), for the largest micro-batch of the run; gradient checkpointing keeps one hidden state per
  layer and recomputes one layer at a time;
- logits: padding-free batches compute the head only on the trained positions (CPU: one copy, blocked with
  the loss; GPU: logits, their fp32 log-softmax and its gradient); padded batches on every position;
- framework: the Python process with torch, transformers, peft and datasets imported (CPU), or the CUDA
  context and the caching allocator's slack (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loratui.pipeline.estimate.shape import ModelShape

GIB = 1 << 30
MIB = 1 << 20
# Resident size of a Python process that imported torch, transformers, peft and datasets and read a small
# dataset: 545 MiB measured on the 2-core EPYC (torch 2.13 CPU wheel), plus the tokenizer, the Trainer and
# the arrow tables of a small dataset.
CPU_FRAMEWORK_BYTES = 700 * MIB
# The CUDA context (not in torch.cuda.max_memory_allocated) and the caching allocator's rounding.
GPU_FRAMEWORK_BYTES = 600 * MIB
# What the backward pass holds beyond the saved activations at its peak: the gradient of a layer's widest
# tensor, a few times over (a round figure; the model's parts are checked as a whole against measured peaks
# by bench/estimate_accuracy.py, where the probe's measured peak replaces them).
BACKWARD_TRANSIENT = 3
QLORA_BYTES_PER_PARAM = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}  # double quant or not


@dataclass(frozen=True)
class TrainPlan:
    """The settings that decide training memory, resolved (no ``auto`` left)."""

    device: str  # cpu, cuda, mps
    precision: str  # fp32, bf16, fp16
    method: str  # lora, qlora, dora
    r: int
    target: str | list[str]
    micro_batch: int  # examples per micro-batch
    micro_tokens: int  # tokens the largest micro-batch computes (padded: examples x its longest)
    trained_tokens: int  # positions with a label in that micro-batch
    padding_free: bool
    gradient_checkpointing: bool
    optimizer: str
    double_quant: bool = True
    reference_forward: bool = False  # dpo/kto: a forward pass without the adapter (no gradients) per batch

    def but(self, **changes: object) -> TrainPlan:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # bytes, in the order they are shown

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def weight_bytes(shape: ModelShape, plan: TrainPlan) -> int:
    compute = 4 if plan.device == "cpu" or plan.precision == "fp32" else 2
    if plan.method != "qlora":
        return shape.params * compute
    quantized = min(shape.linear_params, shape.params)
    rest = shape.params - quantized
    return int(quantized * QLORA_BYTES_PER_PARAM[plan.double_quant]) + rest * compute


def optimizer_bytes(optimizer: str, trainable: int) -> int:
    name = optimizer.lower()
    if "8bit" in name:
        return 2 * trainable
    if name.startswith("sgd"):
        return 4 * trainable
    if "adafactor" in name:
        return trainable  # factored second moments: about one value per row and column
    return 8 * trainable  # AdamW: two fp32 moments


def activation_bytes_per_token(shape: ModelShape, plan: TrainPlan) -> int:
    """Bytes autograd keeps per token of a micro-batch, over all layers."""
    act = 4 if plan.device == "cpu" or plan.precision == "fp32" else 2
    h, q, kv = shape.hidden, shape.q_width, shape.kv_width
    mlp = shape.experts_active * shape.expert_intermediate if shape.experts else shape.intermediate
    adapters = 7 * plan.r if plan.target == "all-linear" else 2 * plan.r
    per_layer = 4 * h + 2 * (q + 2 * kv) + q + 4 * mlp + adapters
    if plan.gradient_checkpointing:  # a hidden state per layer, and one layer recomputed at a time
        return act * (shape.layers * h + per_layer)
    return act * shape.layers * per_layer


def logits_bytes(shape: ModelShape, plan: TrainPlan) -> int:
    positions = plan.trained_tokens if plan.padding_free else plan.micro_tokens
    if plan.padding_free and plan.device == "cpu":
        return positions * shape.vocab * 4  # blocked head and loss: one fp32 copy of the trained logits
    return positions * shape.vocab * (4 if plan.precision == "fp32" else 2) + 2 * positions * shape.vocab * 4


def estimate_memory(shape: ModelShape, plan: TrainPlan) -> MemoryEstimate:
    trainable = shape.lora_params(plan.r, plan.target)
    if plan.method == "dora":
        trainable += shape.layers * shape.hidden * 7  # a magnitude vector per adapted projection
    per_token = activation_bytes_per_token(shape, plan)
    act = 4 if plan.device == "cpu" or plan.precision == "fp32" else 2
    widest = max(shape.intermediate, shape.q_width + 2 * shape.kv_width)
    transient = BACKWARD_TRANSIENT * plan.micro_tokens * widest * act
    framework = CPU_FRAMEWORK_BYTES if plan.device == "cpu" else GPU_FRAMEWORK_BYTES
    return MemoryEstimate(
        {
            "weights": weight_bytes(shape, plan),
            "adapter": 4 * trainable,
            "gradients": 4 * trainable,
            "optimizer": optimizer_bytes(plan.optimizer, trainable),
            "activations": per_token * plan.micro_tokens + transient,
            "logits": logits_bytes(shape, plan),
            "framework": framework,
        }
    )


def largest_micro_tokens(lengths: list[int], micro: int, padding_free: bool) -> int:
    """Tokens in the largest micro-batch a shuffled epoch can hold, bounded above by the ``micro`` longest
    examples (padding-free: their sum; padded: ``micro`` x the longest)."""
    top = sorted(lengths, reverse=True)[: max(1, micro)] or [1]
    return sum(top) if padding_free else len(top) * top[0]


def max_micro_tokens(shape: ModelShape, plan: TrainPlan, available: int) -> int:
    """The most tokens a micro-batch can hold within ``available`` bytes (memory grows linearly with them)."""
    share = plan.trained_tokens / max(1, plan.micro_tokens)
    at = [estimate_memory(shape, plan.but(micro_tokens=n, trained_tokens=int(n * share))).total for n in (0, 1024)]
    slope = (at[1] - at[0]) / 1024
    return max(0, int((available - at[0]) / slope)) if slope > 0 else 1 << 30
