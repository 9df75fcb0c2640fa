"""``auto`` training settings, the device and the precision, each with the reason it was chosen.

Pure functions of the data statistics and the hardware, so the choice is testable without torch and
written back into the run's ``config.yaml`` (a re-run reproduces it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.device import Probe, choose
from loratui.pipeline.device import precision as choose_precision

# Token budget of one micro-batch (examples x length) when `batch_size: auto`. On a CPU, larger
# micro-batches do not raise throughput (measured on SmolLM2-135M: 8 and 16 examples run at the same
# tokens/s) and only delay progress; on a GPU the budget grows with free memory.
CPU_TOKEN_BUDGET = 1024
GPU_TOKENS_PER_GIB = 2048  # for a ~1B model in bf16 with LoRA; scaled by the model's size below
TARGET_EXAMPLES_SEEN = 1000  # auto epochs: about this many example presentations, 1 to 10 epochs


@dataclass
class Resolution:
    value: Any
    reason: str


@dataclass
class Resolved:
    """The settings a training run uses, and why (for the log and the report)."""

    choices: dict[str, Resolution] = field(default_factory=dict)

    def set(self, key: str, value: Any, reason: str) -> Any:
        self.choices[key] = Resolution(value, reason)
        return value

    def __getitem__(self, key: str) -> Any:
        return self.choices[key].value

    def lines(self) -> list[str]:
        return [f"{k} = {c.value}: {c.reason}" for k, c in self.choices.items()]


def _pow2_floor(n: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, n)))))


def resolve_device(cfg: RunConfig, hw: Probe) -> Resolution:
    """``train.device`` on this machine: CUDA, then Apple MPS, then the CPU (``loratui.pipeline.device``)."""
    return Resolution(*choose(cfg.train.device, hw))


def resolve_precision(cfg: RunConfig, device: str, hw: Probe) -> Resolution:
    return Resolution(*choose_precision(cfg.train.precision, device, hw))


def _token_budget(device: str, free_gib: float | None, params_b: float, memory_tokens: int | None) -> tuple[float, str]:
    """Tokens one micro-batch may hold when ``batch_size: auto``, and why."""
    if device == "cpu":
        if memory_tokens is not None and memory_tokens < CPU_TOKEN_BUDGET:
            return max(1, memory_tokens), f"CPU: {memory_tokens} tokens per micro-batch fit in the RAM available"
        return CPU_TOKEN_BUDGET, f"CPU: about {CPU_TOKEN_BUDGET} tokens per micro-batch"
    if memory_tokens is not None:
        where = f"{free_gib:.0f} GiB free" if free_gib is not None else "the memory free"
        return max(1, memory_tokens), f"{memory_tokens} tokens per micro-batch fit in {where} ({device}, memory model)"
    return (free_gib or 8.0) * GPU_TOKENS_PER_GIB / max(params_b, 0.1), f"{free_gib or 8.0:.0f} GiB free on the GPU"


def resolve_auto(
    cfg: RunConfig,
    lengths: list[int],
    *,
    device: str,
    nproc: int,
    free_gib: float | None = None,
    params_b: float = 0.135,
    memory_tokens: int | None = None,
) -> Resolved:
    """Rank, alpha, epochs, micro-batch and accumulation from the data and the hardware.

    ``lengths``: token count of every training example. ``nproc``: the processes of the run in all, the world
    (``train.nodes`` x ``train.nproc``; :func:`loratui.pipeline.train.topology.world_size`). The effective batch
    (micro-batch x accumulation x processes) stays at ``train.effective_batch`` whatever micro-batch fits.
    ``memory_tokens``: tokens per micro-batch that fit in the device's free memory by the estimate's
    memory model (:mod:`loratui.pipeline.estimate.memory`); it replaces the GPU rule of thumb and caps
    the CPU budget.
    """
    r = Resolved()
    n = len(lengths)
    tokens = sum(lengths)
    lora, train = cfg.lora, cfg.train
    if lora.r == "auto":
        rank = 8 if tokens < 20_000 else 16 if tokens < 2_000_000 else 32 if tokens < 50_000_000 else 64
        r.set("lora.r", rank, f"{tokens:,} training tokens (<20k: 8, <2M: 16, <50M: 32, else 64)")
    else:
        r.set("lora.r", lora.r, "lora.r")
    if lora.alpha == "auto":
        r.set("lora.alpha", 2 * r["lora.r"], "2 x r")
    else:
        r.set("lora.alpha", lora.alpha, "lora.alpha")

    longest = max(lengths) if lengths else 1
    p95 = sorted(lengths)[int(0.95 * (n - 1))] if lengths else 1
    per_proc = max(1, math.ceil(train.effective_batch / nproc))
    if train.batch_size == "auto":
        budget, why = _token_budget(device, free_gib, params_b, memory_tokens)
        micro = min(per_proc, _pow2_floor(budget / max(p95, 1)), _pow2_floor(n))
        micro = max(1, micro)
        r.set("train.batch_size", micro, f"{why}, 95th percentile length {p95} (longest {longest})")
    else:
        r.set("train.batch_size", train.batch_size, "train.batch_size")
    if train.grad_accum == "auto":
        accum = max(1, math.ceil(train.effective_batch / (r["train.batch_size"] * nproc)))
        r.set(
            "train.grad_accum",
            accum,
            f"effective batch {train.effective_batch} = {r['train.batch_size']} x {accum}"
            + (f" x {nproc} processes" if nproc > 1 else ""),
        )
    else:
        r.set("train.grad_accum", train.grad_accum, "train.grad_accum")
    if train.epochs == "auto":
        epochs = min(10, max(1, round(TARGET_EXAMPLES_SEEN / max(n, 1))))
        r.set("train.epochs", epochs, f"{n} examples: about {TARGET_EXAMPLES_SEEN} presentations, 1 to 10 epochs")
    else:
        r.set("train.epochs", train.epochs, "train.epochs")
    return r


def apply(cfg: RunConfig, resolved: Resolved) -> None:
    """Write the resolved values into ``cfg`` (so ``config.yaml`` records them)."""
    for key, choice in resolved.choices.items():
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, choice.value)
