"""When a converted file is accepted: it must choose the merged model's next token wherever that choice is
clearer than the arithmetic of the file's type can blur.

A flat threshold on top-1 agreement ("q8_0 agrees on 97% of positions") is not a property of the file:
at a near-tie between two tokens, which one wins depends on rounding, and the rounding depends on the
CPU's kernels (llama.cpp computes bf16 dot products natively on AVX512-BF16, with VNNI on some CPUs, in
fp32 on others). The same correct file then passes on one machine and fails on another, and a model with
many near-ties (a tiny test model, a model trained on a few rows) fails everywhere.

The rule here separates the two causes of a disagreement:

1. **The type's own noise, measured.** The merged model runs once more in PyTorch with every matrix
   product done as llama.cpp does it for that type: the weights rounded to the type, each product's input
   rounded to the type llama.cpp converts it to (f16 for f16 weights, bf16 for bf16, 8-bit blocks of 32
   for q8_0), and the keys and values rounded to f16 (llama.cpp's KV cache). ``noise`` is the largest
   change of any logit over the verification rows.
2. **Decided positions.** A position is decided when the merged model's top-1 logit leads the runner-up
   by more than ``2 * SAFETY * noise``: rounding that moves every logit by at most ``noise`` moves a
   margin by at most twice that, and ``SAFETY`` covers what the simulation leaves out (accumulation
   order, llama.cpp's flash-attention and f16 lookup tables). Every other position is a near-tie the type
   may legitimately flip.
3. **The verdict.** The file is refused when it picks another token on more than 1% of the decided
   positions. A correct file flips none there whatever the CPU; a broken one (weights that lost the
   adapter, a wrong tokenizer or rope layout, a truncated tensor) flips many. When fewer than
   ``MIN_DECIDED`` positions are decided, top-1 cannot tell a good file from a broken one on these rows:
   the file is kept and the report says it was not judged.

Types whose arithmetic is not simulated (the k-quants and other block types) are measured and reported,
never refused, as before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

SIMULATED = ("f32", "f16", "bf16", "q8_0")
SAFETY = 2.0
MAX_FLIP_SHARE = 0.01  # of the decided positions
MIN_DECIDED = 20
Q8_BLOCK = 32


# --------------------------------------------------------------------------------------------
# The type's arithmetic in PyTorch
# --------------------------------------------------------------------------------------------


def round_to(t: Any, kind: str) -> Any:
    """``t`` (float32) rounded as llama.cpp stores ``kind``, back in float32."""
    import torch

    if kind == "f32":
        return t
    if kind == "bf16":
        return t.to(torch.bfloat16).to(t.dtype)
    if kind == "q8_0" and t.shape[-1] % Q8_BLOCK == 0:
        blocks = t.reshape(*t.shape[:-1], -1, Q8_BLOCK)
        scale = blocks.abs().amax(dim=-1, keepdim=True) / 127.0  # quantized with the float32 scale ...
        inverse = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
        scaled = blocks * inverse
        q = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).clamp(-127, 127)  # C's roundf
        quantized = q * scale.to(torch.float16).to(t.dtype)  # ... stored (and used) as float16
        return quantized.reshape(t.shape)
    # f16, and q8_0 rows that are not whole blocks (the converter keeps those in f16)
    return t.to(torch.float16).to(t.dtype)


@contextlib.contextmanager
def simulated(model: Any, kind: str) -> Iterator[None]:
    """``model`` (float32, in place) computes as a GGUF of ``kind`` would in llama.cpp, until the block ends."""
    import torch

    handles = []

    def before(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module._loratui_weight = module.weight.data
        module.weight.data = round_to(module.weight.data, kind)
        if isinstance(module, torch.nn.Linear) and args and torch.is_floating_point(args[0]):
            return (round_to(args[0], kind), *args[1:])
        return args

    def after(module: Any, _args: Any, output: Any) -> Any:
        module.weight.data = module._loratui_weight
        del module._loratui_weight
        return output

    def kv_cache(_module: Any, _args: Any, output: Any) -> Any:
        return round_to(output, "f16")

    try:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.dim() == 2:
                handles.append(module.register_forward_pre_hook(before))
                handles.append(module.register_forward_hook(after))
            if name.endswith(("k_proj", "v_proj")) and isinstance(module, torch.nn.Linear):
                handles.append(module.register_forward_hook(kv_cache))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# Measuring the reference once
# --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """The merged model on the verification rows: per example, the labelled positions' top-1 token and
    its margin over the runner-up (logits); the loss; and each simulated type's noise."""

    top1: list[list[int]] = field(default_factory=list)
    margins: list[list[float]] = field(default_factory=list)
    nll: float = 0.0
    count: int = 0
    noise: dict[str, float] = field(default_factory=dict)  # type -> largest logit change


def measure(
    model: Any, examples: Sequence[Any], kinds: Sequence[str], should_stop: Callable[[], bool] | None = None
) -> Measured:
    """One teacher-forced pass of ``model`` (a TorchModel in float32) per batch, plus one per simulated
    type in ``kinds`` over the same batch."""
    import torch
    import torch.nn.functional as F

    from loratui.pipeline.eval.runtimes import IGNORE

    kinds = [k for k in dict.fromkeys(kinds) if k in SIMULATED]
    out = Measured(top1=[[] for _ in examples], margins=[[] for _ in examples], noise={k: 0.0 for k in kinds})
    reference = model.forward_batches(examples, should_stop)
    per_kind = {k: model.forward_batches(examples, should_stop) for k in kinds}
    for batch, logits, target, _real in reference:
        counted = target != IGNORE
        logits = logits.float()
        losses = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        out.nll += float((losses * counted).sum())
        out.count += int(counted.sum())
        top2 = logits.topk(2, dim=-1)
        for row, i in enumerate(batch):
            keep = counted[row]
            out.top1[i] = top2.indices[row][keep][:, 0].tolist()
            out.margins[i] = (top2.values[row][keep][:, 0] - top2.values[row][keep][:, 1]).tolist()
        for kind, batches in per_kind.items():
            with simulated(model.model, kind):
                _, sim, _, _ = next(batches)
            with torch.no_grad():
                diff = (sim.float() - logits).abs().amax(dim=-1)[counted]
            out.noise[kind] = max(out.noise[kind], float(diff.max()) if diff.numel() else 0.0)
    return out


# --------------------------------------------------------------------------------------------
# The verdict on one file
# --------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    kind: str
    threshold: float | None  # margin a position needs to be decided (None: the type is not judged)
    decided: int = 0
    flips: int = 0  # disagreements on decided positions
    accepted: bool = True
    reason: str = ""

    @property
    def agreement(self) -> float | None:
        return (self.decided - self.flips) / self.decided if self.decided else None


def judge(kind: str, predicted: Sequence[Sequence[int]], measured: Measured, name: str) -> Verdict:
    """Whether the file ``name`` of type ``kind`` (its teacher-forced top-1 ``predicted``) is accepted."""
    noise = measured.noise.get(kind)
    if noise is None:
        return Verdict(kind, None, reason=f"{kind} is measured, not judged (its arithmetic is not simulated)")
    threshold = 2 * SAFETY * noise
    decided = flips = 0
    for got, want, margins in zip(predicted, measured.top1, measured.margins):
        for g, w, m in zip(got, want, margins):
            if m > threshold:
                decided += 1
                flips += g != w
    verdict = Verdict(kind, threshold, decided, flips)
    if decided < MIN_DECIDED:
        verdict.reason = (
            f"not judged: only {decided} positions lead by more than {threshold:.3g} logits "
            f"(4x the {kind} rounding noise {noise:.3g}); top-1 cannot tell a good file from a "
            "broken one on these rows"
        )
        return verdict
    allowed = math.floor(MAX_FLIP_SHARE * decided)
    if flips > allowed:
        verdict.accepted = False
        verdict.reason = (
            f"{name}: picks another token than the merged model at {flips} of the {decided} positions "
            f"where the merged model leads by more than {threshold:.3g} logits (4x the {kind} "
            f"rounding noise {noise:.3g}, measured in PyTorch); at most {allowed} may differ, so the "
            "file does not compute what the merged model computes"
        )
    return verdict
