"""Preference rows in the eval step: the log-probabilities of their replies and the metrics made of them.

A preference dataset (the manifest's ``preference``) is scored like any other (generation metrics on the
prompts with the chosen reply as the reference, loss and perplexity on the chosen replies) and, for a
PyTorch model, also gets ``preference_accuracy`` and ``reward_margin`` (defined in
:mod:`loratui.pipeline.eval.metrics`) from log-probabilities summed over each reply's trained tokens:

* paired rows: both from one model's log p(chosen) and log p(rejected), for the base and the tuned model;
* unpaired rows (KTO): from the tuned model's log-ratio to the base model, so the tuned model only has them,
  and only when the base is compared (``eval.compare_base``); the base model's log-probabilities are kept
  for that.

The log-probabilities come from the same batched teacher-forced pass as the loss (``EvalModel.nll``, no
gradients); the chosen side reuses the loss pass's sums when loss or perplexity is wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from loratui.pipeline.eval import metrics as M
from loratui.pipeline.eval.runtimes import Example, Progress, Stop

Counter = Callable[[str, int], Progress]  # (task, rows) -> a progress callback


def reply_logps(model: Any, examples: Sequence[Example], progress: Progress, should_stop: Stop) -> list[float]:
    """The summed log-probability (nats) of each example's trained tokens."""
    return [-total for total, _ in model.nll(examples, progress=progress, should_stop=should_stop)]


def loss_rows(examples: Sequence[Example]) -> list[bool]:
    """The rows loss and perplexity count: all, except an unpaired row's bad completion (the chosen replies)."""
    return [e.preference_label != 0 for e in examples]


def score_set(
    model: Any,
    s: Any,  # EvalSet
    result: Any,  # step.Scores: chosen_logp (maybe from the loss pass), rejected_logp and metrics filled here
    base: Any | None,  # step.Scores of the base model on the same set, when it was scored
    role: str,  # "base" or "tuned"
    where: str,
    counter: Counter,
    log: Callable[[str], object],
    should_stop: Stop,
) -> None:
    """The preference metrics of ``model`` on the preference set ``s``, into ``result``."""
    if s.preference == "none" or not s.examples:
        return
    name = "" if s.name == "main" else f" ({s.name})"
    if not getattr(model, "scores_preferences", False):
        log(f"{role}{name}: preference metrics are not computed for the {model.runtime} runtime")
        return
    if s.preference == "unpaired" and role != "base" and (base is None or base.chosen_logp is None):
        log(
            f"{role}{name}: unpaired preference metrics compare the tuned and the base model's log-probabilities; "
            "eval.compare_base is off: skipped"
        )
        return
    n = len(s.examples)
    if result.chosen_logp is None:
        result.chosen_logp = reply_logps(model, s.examples, counter(f"{role}: chosen log-probs{where}", n), should_stop)
    if s.preference == "paired":
        rejected = [e.rejected for e in s.examples]
        if any(r is None for r in rejected):
            raise ValueError(f"{s.name}: a paired preference row without its rejected reply")
        result.rejected_logp = reply_logps(
            model, rejected, counter(f"{role}: rejected log-probs{where}", n), should_stop
        )
        result.metrics.update(M.paired_preference(result.chosen_logp, result.rejected_logp))
    elif role != "base" and base is not None:
        labels = [int(e.preference_label or 0) for e in s.examples]
        result.metrics.update(M.unpaired_preference(result.chosen_logp, base.chosen_logp, labels))


def row_margin(s: Any, i: int, scores: Any, base: Any | None) -> float | None:
    """The row's own figure for ``scores``' model, higher is better: log p(chosen) - log p(rejected) (paired), or the
    log-ratio to the base signed by the label (unpaired); None when it was not computed."""
    if scores is None or scores.chosen_logp is None:
        return None
    if s.preference == "paired":
        return None if scores.rejected_logp is None else scores.chosen_logp[i] - scores.rejected_logp[i]
    if base is None or base.chosen_logp is None or scores is base:
        return None
    ratio: float = scores.chosen_logp[i] - base.chosen_logp[i]
    return ratio if s.examples[i].preference_label else -ratio
