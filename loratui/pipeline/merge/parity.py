"""The merge step's parity check: logits of base + adapter (unmerged) against the merged model as written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loratui.pipeline.data.manifest import DatasetManifest
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir

# Largest |logit difference| allowed, relative to the largest |logit| of the reference (the logits'
# scale): rounding in the merged weights is relative to their size. float32 sums differ only in order;
# 16-bit weights round W + BA once where the unmerged model rounds W and BA apart.
# Measured on the quickstart merge (logit scale 47): float32 1.1e-4 (2.4e-6 relative), float16 0.23 (0.5%),
# bfloat16 2.4 (5.2%, top-1 agreement 99.4%). A wrong merge (scale, missing module, dropped tied
# weights) moves logits by about their own scale, far past these.
RELATIVE_TOLERANCE = {"float32": 1e-5, "bfloat16": 0.1, "float16": 0.02}
# ... and never below this in float32: where the logits are small against the hidden states they come from
# (a tiny random model: logit scale under 1), summation order alone moves them by more than 1e-5 of their
# scale (1.9e-5 measured on a tiny model with two stacked adapters), while a wrong merge still moves them
# by the adapter's own effect, which the lost-adapter check compares against.
FLOAT32_FLOOR = 1e-4


@dataclass
class Parity:
    max_abs_diff: float
    scale: float  # largest |logit| of base + adapter
    tolerance: float
    adapter_effect: float  # largest |logit change| the adapter makes (base + adapter against base)
    top1_agreement: float
    positions: int
    examples: int

    @property
    def lost_adapter(self) -> bool:
        """The merge lost half of the adapter's effect, where that effect stands above rounding."""
        return self.adapter_effect > self.tolerance and self.max_abs_diff > 0.5 * self.adapter_effect

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and not self.lost_adapter

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "logit_scale": self.scale,
            "tolerance": self.tolerance,
            "adapter_effect": self.adapter_effect,
            "top1_agreement": self.top1_agreement,
            "positions": self.positions,
            "examples": self.examples,
            "passed": self.passed,
        }


def parity_inputs(run: RunDir, tokenizer: Any, n: int, max_tokens: int = 64) -> list[dict[str, list[int]]]:
    """``n`` examples from the run's test data (else validation, train), cut to ``max_tokens``; built-in
    sentences when the run has no data."""
    rows: list[dict[str, list[int]]] = []
    if (run.data / DatasetManifest.FILE).is_file():
        from datasets import load_from_disk

        splits = DatasetManifest.load(run.data).splits
        for split in ("test", "validation", "train"):
            if split in splits and (run.data / splits[split]).is_dir():
                ds = load_from_disk(str(run.data / splits[split]))
                for row in ds.select(range(min(n, len(ds)))):
                    rows.append(
                        {"input_ids": list(row["input_ids"])[:max_tokens], "labels": list(row["labels"])[:max_tokens]}
                    )
                break
    if not rows:
        texts = [
            "The quick brown fox jumps over the lazy dog.",
            "Write a short note about the weather today.",
            "What is the capital of France?",
            "List three colours of the rainbow.",
        ]
        for i in range(n):
            ids = tokenizer(texts[i % len(texts)], add_special_tokens=True)["input_ids"][:max_tokens]
            rows.append({"input_ids": ids, "labels": ids})
    return rows


def logits(model: Any, rows: list[dict[str, list[int]]], task: str) -> list[Any]:
    """Float32 logits of every example (one at a time: no padding, nothing to mask)."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=device)
            if task == "seq2seq":
                labels = [t if t >= 0 else 0 for t in row["labels"]] or [0]
                out.append(model(input_ids=ids, labels=torch.tensor([labels], device=device)).logits[0].float().cpu())
            else:
                out.append(model(input_ids=ids).logits[0].float().cpu())
    return out


def _stack(rows: list[Any]) -> Any:
    import torch

    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])


def check_finite(reference: list[Any]) -> None:
    import torch

    if not all(bool(torch.isfinite(r).all()) for r in reference):
        raise LoratuiError(
            "parity check: base + adapter gives NaN or inf logits, before any merge",
            hint="The adapter holds NaN/inf weights (a diverged or corrupted training run): "
            "train again, or roll back to an earlier version (`loratui train rollback N`).",
        )


def compare(reference: list[Any], merged: list[Any], base: list[Any], dtype: str, tolerance: float | None) -> Parity:
    """Merged against base + adapter. Fails over the tolerance, and also when the merge lost half of
    what the adapter does (its own effect on the logits) where that effect is above rounding."""
    import torch

    ref, got = _stack(reference), _stack(merged)
    if not bool(torch.isfinite(got).all()):
        raise LoratuiError(
            "parity check: the merged model gives NaN or inf logits where base + adapter does not",
            hint=f"merge.dtype={dtype} is too narrow for these weights: merge with merge.dtype=float32 (or bfloat16).",
        )
    scale = float(ref.abs().max())
    limit = (
        tolerance
        if tolerance is not None
        else max(RELATIVE_TOLERANCE[dtype] * max(scale, 1.0), FLOAT32_FLOOR if dtype == "float32" else 0.0)
    )
    diff = float((ref - got).abs().max())
    effect = float((ref - _stack(base)).abs().max()) if base else 0.0
    return Parity(
        max_abs_diff=diff,
        scale=scale,
        tolerance=limit,
        adapter_effect=effect,
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        positions=int(ref.shape[0]),
        examples=len(reference),
    )


def check_parity(parity: Parity, events: EventSink) -> None:
    """Report the parity figures; raise when the merged model fails them."""
    events.metric(
        {
            "parity_max_abs_diff": parity.max_abs_diff,
            "parity_tolerance": parity.tolerance,
            "parity_adapter_effect": parity.adapter_effect,
            "parity_top1_agreement": parity.top1_agreement,
        },
        split="merge",
    )
    if not parity.passed:
        why = (
            f"lost more than half of the adapter's own effect ({parity.adapter_effect:.3g})"
            if parity.lost_adapter and parity.max_abs_diff <= parity.tolerance
            else f"tolerance {parity.tolerance:.3g}"
        )
        raise LoratuiError(
            f"parity check failed: the merged model's logits differ from base + adapter by up to "
            f"{parity.max_abs_diff:.3g} ({why}; top-1 agreement {parity.top1_agreement:.1%} over "
            f"{parity.positions} positions). Nothing was written.",
            hint="The adapter does not merge cleanly (corrupted weights, or a dtype too narrow for "
            "them): check it, or merge with merge.dtype=float32.",
        )
    events.log(
        f"parity: max |logit diff| {parity.max_abs_diff:.3g} <= {parity.tolerance:.3g} (the adapter "
        f"moves logits by up to {parity.adapter_effect:.3g}), top-1 agreement "
        f"{parity.top1_agreement:.1%} over {parity.positions} positions ({parity.examples} examples)"
    )
