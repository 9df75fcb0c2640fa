"""The merge step: ``runs/<name>/merged/``, a standard Hugging Face directory with the adapter folded in.

* The base is loaded **unquantized** in its own dtype (``merge.dtype`` overrides), also after QLoRA
  training; a base stored quantized (bitsandbytes, GPTQ, AWQ ...) is refused: rounding would lose the
  adapter. Adapters a stack run was trained on are merged first, in order.
* Output: sharded safetensors, tokenizer files and chat template, generation config, and a model
  card (``README.md``) with provenance, parity and evaluation figures.
* **Parity**: logits of base + adapter (unmerged) on a few examples against the merged model as
  re-read from disk; the step fails when the largest difference is over the tolerance.
* Written to a temporary folder beside ``merged/`` and renamed at the end; the free disk space is
  checked first. Peak memory is one copy of the model plus the adapter (the reference logits are
  kept, the model is freed before the written copy is loaded).

The work is in :mod:`~loratui.pipeline.merge.merging` (``source``: what is merged, ``parity``: the check).
"""

from __future__ import annotations

from loratui.pipeline.config import RunConfig
from loratui.pipeline.events import EventSink
from loratui.pipeline.merge.merging import merge
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop, StepResult


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    summary = merge(cfg, run, events, should_stop)
    return StepResult(summary=summary, artifacts=[summary["merged"]])
