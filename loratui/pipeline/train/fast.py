"""Padding-free micro-batches, a shared prompt prefix computed once, and logits only where trained.

The usual recipe pads every micro-batch to its longest example and computes the vocabulary logits
at every position. Here a micro-batch becomes one sequence:

    [shared prefix][rest of example 1][rest of example 2] ...

* **No padding.** Attention stays inside each example: :func:`varlen_attention` runs one SDPA call
  per example (a registered transformers attention implementation), so no example sees another.
  Sliding windows are cut inside each example; logit soft-capping (Gemma 2) and attention sinks
  (gpt-oss) are computed exactly as transformers' eager attention does. Models it cannot serve
  (recurrent or convolutional layers, encoder-decoders, bidirectional attention) are named with the
  reason by :func:`padding_free_refusal` and train on padded batches.
* **Shared prefix.** When every example of the micro-batch starts with the same tokens and none of
  them is trained (a default system prompt, an instruction header), that prefix is computed once;
  each example attends to it and its gradient is summed over the examples, exactly as if every
  example carried its own copy (causal attention: the prefix never sees what follows it).
* **Logits where trained.** The LM head (576 x 49,152 for SmolLM2) and the cross-entropy run only at
  positions whose next token is trained (``logits_to_keep`` with indices), not on prompt tokens.
* **Head and loss in vocabulary blocks.** On a CPU, a frozen LM head and the cross-entropy run together
  (:func:`linear_cross_entropy`), a cache-sized block of vocabulary rows at a time, with the hidden
  states' gradient formed in the same pass: no full-size log-softmax copy of the logits or of their
  gradient, and matrix products of a shape the CPU runs near its peak (Gemma 3's 262,144-row head and
  loss: 1.70 s a micro-batch as one product and a separate loss, 1.25 s in blocks). Used for a model
  only after a first batch showed that it gives the model's own logits.

Losses and gradients equal the padded computation (tests check this to float precision).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
ATTENTION = "loratui_varlen"
MIN_SHARED_PREFIX = 4  # shorter shared prefixes are not worth the extra attention call


def _sdpa_fallback(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _explicit_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    additive: torch.Tensor | None,
    scaling: float,
    dropout: float,
    training: bool,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention written out as transformers' eager implementations of Gemma 2 and gpt-oss compute it,
    for what SDPA cannot express: logit soft-capping (``tanh(s / cap) * cap`` before the mask) and
    attention sinks (a learned logit per head appended as one more key column, softmax, column dropped).

    ``allowed``: boolean mask broadcast over the scores (True = attend), or ``additive``: a float mask
    added to them (0 / the dtype's minimum, as transformers builds it), or neither. Returns
    (batch, heads, queries, head_dim) like SDPA.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # transformers' repeat_kv: query head h uses key/value head h // groups
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif additive is not None:
        scores = scores + additive
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[2], 1).to(scores.dtype)
        combined = torch.cat((scores, sink), dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        weights = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
        weights = F.dropout(weights, p=dropout, training=training).to(value.dtype)
    else:
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value)


def _explicit_fallback(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
    is_causal: bool | None,
) -> tuple[torch.Tensor, None]:
    """Soft-capping or sinks without segment bounds (generation, a padded batch): the mask transformers
    built (``sdpa_mask``: boolean, or None where plain causal attention is exact), as in SDPA."""
    allowed = additive = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[2]]
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            additive = mask
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        n, m = query.shape[2], key.shape[2]
        if causal and n > 1:  # queries are the last n of the m positions
            allowed = torch.ones(n, m, dtype=torch.bool, device=query.device).tril_(m - n)
    out = _explicit_attention(query, key, value, allowed, additive, scaling, dropout, module.training, softcap, sinks)
    return out.transpose(1, 2).contiguous(), None


def varlen_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    cu_seq_lens_q: torch.Tensor | None = None,
    loratui_prefix: int = 0,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for a padding-free batch of one row: segments given by ``cu_seq_lens_q``.

    ``loratui_prefix`` > 0: the first segment is a prefix shared by all later segments, which attend
    to it in full and to themselves causally. ``sliding_window`` (a sliding-attention layer: Gemma,
    Mistral, ...): a query sees only the last ``sliding_window`` positions, itself included, as in
    transformers' own masks (the shared prefix counts as positions before the example's own).
    ``softcap`` (Gemma 2's attention logit soft-capping) and ``s_aux`` (gpt-oss's attention sinks, one
    logit per head) are computed exactly as transformers' eager attention of those models does
    (:func:`_explicit_attention`), segment by segment; everything else runs SDPA. ``scaling`` is the
    model's own (Gemma's ``query_pre_attn_scalar``, Granite's ``attention_multiplier``); None means
    head_dim ** -0.5. Without ``cu_seq_lens_q`` (generation, padded batches) this is plain SDPA with the
    mask transformers built, or the explicit computation with that mask for soft-capping or sinks.
    """
    explicit = bool(softcap) or s_aux is not None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if cu_seq_lens_q is None:
        if explicit:
            return _explicit_fallback(
                module,
                query,
                key,
                value,
                attention_mask,
                scaling,
                dropout if module.training else 0.0,
                softcap,
                s_aux,
                kwargs.get("is_causal"),
            )
        return _sdpa_fallback(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            sliding_window=sliding_window,
            **kwargs,
        )
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise NotImplementedError(
            "padding-free attention is causal only (padding_free_refusal rules out bidirectional models)"
        )
    window = int(sliding_window) if sliding_window else None
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    bounds = cu_seq_lens_q.tolist()
    p = int(loratui_prefix)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask`` None: plain causal attention over a segment of its own."""
        if explicit:
            if mask is None:
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril_()
            return _explicit_attention(q, k, v, mask, None, scaling, drop, module.training, softcap, s_aux)
        if mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=drop, scale=scaling, enable_gqa=gqa
            )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scaling, enable_gqa=gqa)

    # split (not slice): the backward of a split concatenates once, where each slice's backward would
    # fill a zero tensor the size of the whole sequence
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    parts = zip(bounds[:-1], query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
    outs = []
    prefix_k = prefix_v = None
    for start, q, k, v in parts:
        if p and start == 0:
            prefix_k, prefix_v = k, v
        n = q.shape[2]
        if p and start >= p:
            assert prefix_k is not None and prefix_v is not None  # the prefix is the first segment
            mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril_(p)
            # key j (prefix, then own) is seen from query i when j > p + i - window
            if window is not None and window < p + n:
                mask.triu_(p - window + 1)
            outs.append(attend(q, torch.cat((prefix_k, k), dim=2), torch.cat((prefix_v, v), dim=2), mask))
        elif window is not None and window < n:
            outs.append(attend(q, k, v, torch.ones(n, n, dtype=torch.bool, device=q.device).tril_().triu_(1 - window)))
        else:
            outs.append(attend(q, k, v, None))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`varlen_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


# Layer kinds (transformers' ``config.layer_types``) that carry a state along the sequence: recurrent
# scans (Mamba, Gated DeltaNet, lightning attention: "linear_attention"), short convolutions ("conv",
# LFM2) and layers that mix attention with one of those ("hybrid", "hybrid_sliding").
STATEFUL_LAYER_TYPES = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding"})


def carries_state(config: Any, model_class: Any = None) -> bool:
    """Whether some layer of the model runs a state from token to token instead of attending.

    Packing examples into one row is exact only when every token mixer keeps to its own example, and
    :func:`varlen_attention` does that for attention alone. A recurrent layer would hand the state left
    by one example to the next unless the model itself cuts it at the segment bounds, and in
    transformers 5.19 none does: Qwen3.5's and Qwen3-Next's Gated DeltaNet pass ``cu_seq_lens_q`` on
    to the chunked delta rule only, whose PyTorch fallback (used without the flash-linear-attention
    kernels: always on CPU) ignores it, and their short causal convolution gets no segment bounds at
    all (it would need ``seq_idx``), so it mixes the last tokens of one example into the next even with
    the kernels. Such models train on padded batches.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = set(getattr(text, "layer_types", None) or ())
    return bool(types & STATEFUL_LAYER_TYPES) or bool(getattr(model_class, "_is_stateful", False))


def padding_free_refusal(config: Any, model_class: Any) -> str | None:
    """Why a causal LM of ``model_class`` cannot train padding-free (None: it can), in words for the log.

    Padding-free needs every token mixer confined to one example: attention through transformers'
    attention interface (where :func:`varlen_attention` plugs in; it computes sliding windows,
    soft-capping and attention sinks exactly), causal, and no layer that :func:`carries_state`.
    Decided from the config, before the weights are loaded."""
    name = getattr(model_class, "__name__", str(model_class))
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; padding-free packing is for decoder-only models"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if carries_state(config, model_class):
        kinds = sorted(set(getattr(text, "layer_types", None) or ()) & STATEFUL_LAYER_TYPES)
        what = f"layers of kind {', '.join(kinds)}" if kinds else "stateful layers"
        return (
            f"{name} has {what} that carry a state from token to token (recurrent scans or short "
            "convolutions), which transformers does not reset at packed example bounds"
        )
    if not getattr(model_class, "_supports_attention_backend", False):
        return (
            f"{name} does not run its attention through transformers' attention interface, so the "
            "packed examples could not be kept apart"
        )
    # True (Gemma 3 embedding models) or "all" (Gemma 4): text attends both ways; Gemma 4's "vision" is
    # bidirectional among image tokens only, causal for text
    bidirectional = getattr(text, "use_bidirectional_attention", None)
    if bidirectional is True or bidirectional == "all":
        return f"{name} attends bidirectionally (use_bidirectional_attention); padding-free attention is causal"
    return None


def padding_free_possible(config: Any, model_class: Any) -> bool:
    """True for a causal LM of ``model_class`` that can train padding-free: :func:`padding_free_refusal`
    has no objection."""
    return padding_free_refusal(config, model_class) is None


def supports_padding_free(model: Any) -> bool:
    """:func:`padding_free_possible` for a loaded model (a peft model: its base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return padding_free_possible(base.config, type(base))


def accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def shared_prefix(features: list[dict[str, Any]]) -> int:
    """Length of the leading tokens that every example shares and none trains (0: nothing to share).

    The prediction made at the last shared position is of each example's first own token, so that
    token must be untrained too; every example keeps at least one token of its own.
    """
    if len(features) < 2:
        return 0
    ids = [f["input_ids"] for f in features]
    limit = min(len(x) for x in ids) - 1
    first = ids[0]
    p = 0
    while p < limit and all(x[p] == first[p] for x in ids[1:]):
        p += 1
    for f in features:  # labels[1..p] are the targets predicted from the prefix positions
        labels = f["labels"]
        q = 1
        while q <= p and labels[q] == IGNORE:
            q += 1
        p = min(p, q - 1)
    return p if p >= MIN_SHARED_PREFIX else 0


@dataclass
class PaddingFreeCollator:
    """Examples -> one row: ``input_ids``, ``position_ids``, shifted ``labels``, segment bounds."""

    share_prefix: bool = True

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        p = shared_prefix(features) if self.share_prefix else 0
        ids: list[int] = []
        positions: list[int] = []
        targets: list[int] = []
        bounds = [0]
        if p:
            first = list(features[0]["input_ids"][:p])
            ids += first
            positions += range(p)
            targets += [IGNORE] * p
            bounds.append(p)
        tokens = 0
        for f in features:
            x, y = list(f["input_ids"]), list(f["labels"])
            tokens += len(x)
            ids += x[p:]
            positions += range(p, len(x))
            targets += y[p + 1 :] + [IGNORE]  # the next token, within this example only
            bounds.append(len(ids))
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "labels": torch.tensor([targets], dtype=torch.long),
            "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32),
            "loratui_prefix": torch.tensor(p),
            "num_tokens": torch.tensor(tokens),
        }


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
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, transform, rows, want_grad)


# LM heads already compared with their model's own logits: True where linear_cross_entropy with the
# config's HeadTransform gave them, False where not (the model does something else to its logits)
_HEAD_MATCHES: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


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


class _HeadInput:
    """A forward pre-hook on the LM head that keeps what the model feeds it and, with ``skip``, hands the
    head zero rows instead, so that the model computes no logits (:func:`linear_cross_entropy` will)."""

    def __init__(self, head: torch.nn.Module, skip: bool):
        self.seen: list[torch.Tensor] = []
        self.skip = skip
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        self.seen.append(args[0])
        return (args[0][..., :0, :], *args[1:]) if self.skip else None

    def __enter__(self) -> _HeadInput:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _head_matches(
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


def packed_loss(model: Any, inputs: dict[str, Any], num_items: Any, keep_logits: bool) -> tuple[torch.Tensor, Any]:
    """Sum of token losses over the trained positions of a padding-free batch, divided by ``num_items``
    (the trained tokens of the whole accumulated batch) or by this batch's own count.

    With ``keep_logits`` and a frozen plain head (:func:`frozen_head`), the head and the loss run as
    :func:`linear_cross_entropy` once a first batch showed that it gives the model's own logits;
    ``outputs.logits`` is then empty."""
    labels = inputs["labels"][0]
    keep = (labels != IGNORE).nonzero().squeeze(1)
    kwargs = dict(
        input_ids=inputs["input_ids"],
        position_ids=inputs["position_ids"],
        use_cache=False,
        cu_seq_lens_q=inputs["cu_seq_lens_q"],
        loratui_prefix=int(inputs["loratui_prefix"]),
    )
    denominator = num_items if num_items is not None else keep.numel()
    if not keep_logits:
        outputs = model(**kwargs)
        return _loss(outputs.logits[0, keep], labels[keep], denominator), outputs
    found = frozen_head(model)
    matches = _HEAD_MATCHES.get(found[0]) if found else False
    if found is None or matches is False:
        outputs = model(**kwargs, logits_to_keep=keep)
        # squeeze, not [0]: the backward of a select fills a zero tensor the size of the logits first
        # (283 x 262,144 floats on a Gemma 3 micro-batch: 0.1 s a step)
        return _loss(outputs.logits.squeeze(0), labels[keep], denominator), outputs
    head, config = found
    transform = HeadTransform.of(config)
    with _HeadInput(head, skip=bool(matches)) as seen:
        outputs = model(**kwargs, logits_to_keep=keep)
    if matches is None:  # the first batch through this head: the model computed its logits; compare
        verdict = _head_matches(seen.seen, head, transform, outputs.logits)
        if verdict is not None:
            _HEAD_MATCHES[head] = verdict
        return _loss(outputs.logits.squeeze(0), labels[keep], denominator), outputs
    hidden = seen.seen[0].reshape(-1, seen.seen[0].shape[-1])
    if keep.numel() == 0:
        return hidden.sum() * 0.0, outputs
    loss = linear_cross_entropy(hidden, head.weight, head.bias, labels[keep], transform)
    return loss / denominator, outputs


def _loss(logits: torch.Tensor, targets: torch.Tensor, denominator: Any) -> torch.Tensor:
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, reduction="sum") / denominator
