"""A frozen LM head and the cross-entropy computed together, a cache-sized block of vocabulary rows at a
time (:func:`linear_cross_entropy`), and when a model's head can be replaced by it (:func:`frozen_head`,
checked against the model's own logits on a first batch). :func:`~loratui.pipeline.train.fast.packed_loss`
uses it on CPUs.

The usual path computes the logits of every trained position (rows x vocabulary), a log-softmax copy of
them and, in the backward, a gradient of the same size, as one matrix product each way. Here each block
of head weights is used twice while it is in cache: once for its logits, once to add its share of the
hidden states' gradient (softmax - one-hot, through the model's logit transform), which is formed in the
forward pass; the backward only scales it.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# Bytes of LM head weights per block of vocabulary rows: a few MiB, which a core's caches keep while the
# block's logits are computed and again while they multiply back into the hidden states' gradient. On a
# 2-core EPYC, Gemma 3's head and loss (262,144 x 640, 283 positions, forward and backward) took 1.23 to
# 1.25 s with blocks of 1,024 to 4,096 rows (best of 10), against 1.70 s as one product and a separate loss.
HEAD_BLOCK_BYTES = 4 << 20
MIN_HEAD_ROWS = 256


def head_block_rows(weight: torch.Tensor) -> int:
    """Vocabulary rows per block for this head: :data:`HEAD_BLOCK_BYTES` of weights, at least
    :data:`MIN_HEAD_ROWS` (so that a wide model's head is not cut into thin slices)."""
    return max(MIN_HEAD_ROWS, HEAD_BLOCK_BYTES // (weight.shape[1] * weight.element_size()))


@dataclass(frozen=True)
class HeadTransform:
    """What a causal LM does to its LM head's output before the loss, read from its config: Granite
    divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``, Gemma 2 and 4 soft-cap
    (``tanh(logits / cap) * cap``), in that order, with the same operations as transformers."""

    divide: float | None = None
    multiply: float | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, config: Any) -> HeadTransform:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def number(name: str) -> float | None:
            value = getattr(text, name, None)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        return cls(number("logits_scaling"), number("logit_scale"), number("final_logit_softcapping"))

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        if self.divide is not None:
            z.div_(self.divide)
        if self.multiply is not None:
            z.mul_(self.multiply)
        if self.softcap:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def slope(self, z: torch.Tensor) -> torch.Tensor | float:
        """Derivative of the transformed logits with respect to the head's output, at the transformed
        logits ``z``: a number, or a tensor like ``z`` where soft-capping bends it (``1 - tanh^2``)."""
        factor = 1.0
        if self.divide is not None:
            factor /= self.divide
        if self.multiply is not None:
            factor *= self.multiply
        if self.softcap:
            return (1 - (z / self.softcap).square_()).mul_(factor)
        return factor


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``transform(hidden @ weight.T + bias)`` against ``targets``, by blocks of
    vocabulary rows. The weights are frozen: only the hidden states get a gradient, computed in the
    forward pass (softmax - one-hot, through the transform, times each block's weights) and scaled in
    the backward. Each block's logits become ``exp(logit - block max)`` in place once their block sum is
    taken; the log-sum-exp combines the blocks, and one multiplication per row turns them into the
    softmax: one exponential per logit."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        transform: HeadTransform,
        rows: int,
        want_grad: bool,
    ) -> torch.Tensor:
        blocks, tops = [], []
        picked = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, weight.shape[0], rows):
            stop = min(start + rows, weight.shape[0])
            z = F.linear(hidden, weight[start:stop], None if bias is None else bias[start:stop]).float()
            transform.apply_(z)
            inside = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)
            picked[inside] = z[inside, targets[inside] - start]
            slope = transform.slope(z) if want_grad else 1.0
            peak = z.amax(dim=1)
            # a row whose block is all -inf (a bias that masks tokens): subtract 0, not -inf (NaN); its
            # block total is then 0 and adds nothing below
            shift = peak.masked_fill(peak.isneginf(), 0.0)
            total = z.sub_(shift[:, None]).exp_().sum(dim=1)
            blocks.append((start, stop, z if want_grad else None, inside, shift, total, slope))
            tops.append(peak)
        top = torch.stack(tops).amax(dim=0)
        shifts = torch.stack([b[4] for b in blocks])
        lse = top + (torch.stack([b[5] for b in blocks]) * (shifts - top).exp()).sum(dim=0).log()
        grad = None
        if want_grad:
            grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
            for start, stop, p, inside, shift, _, slope in blocks:
                assert p is not None  # kept when a gradient is wanted
                p.mul_((shift - lse).exp()[:, None])  # the softmax
                p[inside, targets[inside] - start] -= 1
                if isinstance(slope, torch.Tensor) or slope != 1.0:
                    p.mul_(slope)
                w = weight[start:stop]
                if w.dtype == torch.float32:
                    grad.addmm_(p, w)
                else:
                    grad += (p.to(w.dtype) @ w).float()
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    transform: HeadTransform = HeadTransform(),
    rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``transform(hidden @ weight.T + bias)`` (``hidden``: rows x hidden size)
    against ``targets``, a block of ``rows`` vocabulary rows at a time (None: :func:`head_block_rows`):
    equal, to float rounding, to
    ``F.cross_entropy(logits.float(), targets, reduction="sum")``. ``weight`` and ``bias`` must be
    frozen; ``hidden`` gets its gradient."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy computes no gradient for the head's weights; they must be frozen")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"target token ids must lie in [0, {weight.shape[0]}), the head's vocabulary; "
            f"got {int(targets.min())} to {int(targets.max())}"
        )
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    rows = rows or head_block_rows(weight)
    loss: torch.Tensor = _LinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
        hidden, weight, bias, targets, transform, rows, want_grad
    )
    return loss


# LM heads already compared with their model's own logits: True where linear_cross_entropy with the
# config's HeadTransform gave them, False where not (the model does something else to its logits)
HEAD_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def frozen_head(model: Any) -> tuple[torch.nn.Linear, Any] | None:
    """The causal LM's head and config when :func:`linear_cross_entropy` can stand in for it: a plain
    frozen ``nn.Linear`` (not a LoRA or a quantized layer, not trained) whose weight is a whole tensor
    on the CPU (not sharded by FSDP; the blocked computation was measured on CPUs only) and which has
    no hooks of its own (they would see an empty output). ``model`` may be wrapped by peft and by
    DistributedDataParallel."""
    inner = model
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if any(
        type(p) is not torch.nn.Parameter or p.requires_grad or p.device.type != "cpu"
        for p in (head.weight, head.bias)
        if p is not None
    ):
        return None
    return head, inner.config


class HeadInput:
    """A forward pre-hook on the LM head that keeps what the model feeds it and, with ``skip``, hands the
    head zero rows instead, so that the model computes no logits (:func:`linear_cross_entropy` will)."""

    def __init__(self, head: torch.nn.Module, skip: bool):
        self.seen: list[torch.Tensor] = []
        self.skip = skip
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        self.seen.append(args[0])
        return (args[0][..., :0, :], *args[1:]) if self.skip else None

    def __enter__(self) -> HeadInput:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def head_matches(
    seen: list[torch.Tensor], head: torch.nn.Linear, transform: HeadTransform, logits: torch.Tensor | None
) -> bool | None:
    """Whether the model's logits are ``transform(head(input))`` for the input its head saw (None: no
    row to tell by), to the rounding of the logits' dtype. A model that calls its head more than once,
    or changes its logits in a way the config does not say, keeps the model's own computation (with a
    warning: it trains correctly, only without the blocked head's speed)."""
    if len(seen) != 1 or logits is None or seen[0].shape[:-1] != logits.shape[:-1]:
        why = f"its head ran {len(seen)} times" if len(seen) != 1 else "its logits are not one row per head input"
    else:
        rows = seen[0].reshape(-1, seen[0].shape[-1])[:4]
        if rows.shape[0] == 0:
            return None
        with torch.no_grad():
            ours = transform.apply_(F.linear(rows, head.weight, head.bias).float())
            theirs = logits.detach().reshape(-1, logits.shape[-1])[:4].float()
        scale = max(1.0, float(theirs.abs().max()))
        rtol = 1e-4 if logits.dtype == torch.float32 else 2e-2  # bf16 / fp16 logits: their own rounding
        if torch.allclose(ours, theirs, rtol=rtol, atol=rtol * 0.1 * scale):
            return True
        why = (
            f"its logits differ from its head's output transformed as its config says ({transform}) by up to "
            f"{float((ours - theirs).abs().max()):.3g}"
        )
    warnings.warn(
        f"{type(head).__name__} head of this model: {why}; the LM head and the loss run as the model "
        "computes them, not in vocabulary blocks (same loss, slower)",
        stacklevel=3,
    )
    return False
