"""Preference objectives on the Trainer: DPO, ORPO and KTO over LoRA, padded or padding-free.

A micro-batch of pairs becomes one batch of sequences, the chosen replies first and the rejected ones
after them (KTO: the completions, then the mismatched "KL" completions). :func:`sequence_logps` sums the
log-probabilities of each sequence's trained tokens (the reply); on padding-free batches the model is asked
for logits only where a token is trained, and the pair's shared prompt is computed once when
``train.share_prefix`` finds it. The reference model of DPO and KTO is the same model with the adapter
disabled (:meth:`peft.PeftModel.disable_adapter`): the base, or with ``train.mode: stack`` the base with
the earlier adapters merged, so no second copy of the weights is loaded.

The losses follow TRL's trainers (``DPOTrainer`` loss ``sigmoid`` plus ``sft`` for RPO; ORPO's
``odds_ratio_loss``; ``KTOTrainer`` loss ``kto``); ``tests/pipeline/train/test_preference.py`` checks
them against TRL's own computation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loratui.pipeline.train.fast import IGNORE, PaddingFreeCollator, packed_inputs
from loratui.pipeline.train.trainer import LoratuiTrainer


def prompt_length(labels: list[int]) -> int:
    """Tokens before the first trained one: the prompt of a preference sequence."""
    return next((i for i, y in enumerate(labels) if y != IGNORE), len(labels))


def _kl_sequences(features: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """KTO's mismatched pairs: each prompt with the next row's completion (cycling within the micro-batch,
    as TRL's KTO collator does); with one row the pair is the row itself."""
    parts = []
    for f in features:
        ids, labels = list(f["input_ids"]), list(f["labels"])
        p = prompt_length(labels)
        parts.append((ids[:p], ids[p:], labels[p:]))
    out = []
    for i, (prompt, _, _) in enumerate(parts):
        _, completion, completion_labels = parts[(i + 1) % len(parts)]
        out.append((prompt + completion, [IGNORE] * len(prompt) + completion_labels))
    return out


def _sequences(objective: str, features: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    if objective == "kto":
        own = [(list(f["input_ids"]), list(f["labels"])) for f in features]
        return own + _kl_sequences(features)
    chosen = [(list(f["input_ids"]), list(f["labels"])) for f in features]
    rejected = [(list(f["rejected_input_ids"]), list(f["rejected_labels"])) for f in features]
    return chosen + rejected


@dataclass
class PreferenceCollator:
    """Rows of pairs (or KTO rows) -> one batch of sequences, padding-free or right-padded.

    Padding-free: :class:`PaddingFreeCollator`'s packed row plus ``loratui_segment``, the sequence each
    position belongs to (-1 for a shared prefix). Padded: ``input_ids``, ``attention_mask``, ``labels``
    (unshifted). Both carry ``loratui_rows`` (the pairs or KTO rows) and, for KTO, ``preference_label``.
    """

    objective: str
    padding_free: bool
    pad_id: int
    share_prefix: bool = True

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = _sequences(self.objective, features)
        batch = self._packed(sequences) if self.padding_free else self._padded(sequences)
        batch["loratui_rows"] = torch.tensor(len(features))
        if self.objective == "kto":
            batch["preference_label"] = torch.tensor([int(f["preference_label"]) for f in features], dtype=torch.long)
        return batch

    def _packed(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in sequences]
        batch: dict[str, Any] = PaddingFreeCollator(share_prefix=self.share_prefix)(rows)
        prefix = int(batch["loratui_prefix"])
        segment = [-1] * prefix
        for k, (ids, _) in enumerate(sequences):
            segment += [k] * (len(ids) - prefix)
        batch["loratui_segment"] = torch.tensor(segment, dtype=torch.long)
        return batch

    def _padded(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        width = max(len(ids) for ids, _ in sequences)
        ids = [x + [self.pad_id] * (width - len(x)) for x, _ in sequences]
        labels = [y + [IGNORE] * (width - len(y)) for _, y in sequences]
        mask = [[1] * len(x) + [0] * (width - len(x)) for x, _ in sequences]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "num_tokens": torch.tensor(sum(len(x) for x, _ in sequences)),
        }


@dataclass
class SequenceLogps:
    """Per sequence: the summed log-probability of its trained tokens and how many there are."""

    sums: torch.Tensor
    counts: torch.Tensor

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)


def sequence_logps(model: Any, inputs: dict[str, Any], sequences: int) -> SequenceLogps:
    """Summed log-probabilities of each sequence's trained tokens (the replies), padded or packed."""
    if "loratui_segment" in inputs:
        labels, keep, kwargs = packed_inputs(inputs)  # labels shifted by the collator: position i predicts labels[i]
        outputs = model(**kwargs, logits_to_keep=keep)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        token_logps = -F.cross_entropy(logits.float(), labels[keep], reduction="none")
        owner = inputs["loratui_segment"][keep]
    else:
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        targets = inputs["labels"][:, 1:]
        trained = targets != IGNORE
        logits = outputs.logits[:, :-1][trained]
        token_logps = -F.cross_entropy(logits.float(), targets[trained], reduction="none")
        owner = trained.nonzero()[:, 0]
    sums = torch.zeros(sequences, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.zeros(sequences, dtype=torch.long, device=token_logps.device)
    sums = sums.index_add(0, owner, token_logps)
    counts = counts.index_add(0, owner, torch.ones_like(owner))
    return SequenceLogps(sums, counts)


Losses = tuple[torch.Tensor, dict[str, torch.Tensor]]


def dpo_loss(policy: SequenceLogps, reference: SequenceLogps, beta: float, sft_weight: float = 0.0) -> Losses:
    """DPO's sigmoid loss over the pairs (chosen first, rejected after), plus RPO's chosen NLL when
    ``sft_weight`` > 0 (TRL: loss_type ["sigmoid", "sft"] with weights [1, sft_weight])."""
    chosen, rejected = policy.sums.chunk(2)
    ref_chosen, ref_rejected = reference.sums.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    if sft_weight:
        counts, _ = policy.counts.chunk(2)
        loss = loss + sft_weight * (-chosen.sum() / counts.sum().clamp(min=1))
    return loss, _reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "reward_chosen": chosen.mean(),
        "reward_rejected": rejected.mean(),
        "reward_accuracy": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
    }


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: SequenceLogps, beta: float) -> Losses:
    """ORPO: the chosen replies' NLL (per token) minus ``beta`` times the log-sigmoid of the log odds ratio
    of the per-token mean log-probabilities (Hong et al. 2024, eq. 4 and 7; TRL's ``odds_ratio_loss``)."""
    means = policy.means().float()
    chosen, rejected = means.chunk(2)
    chosen_sums, _ = policy.sums.chunk(2)
    chosen_counts, _ = policy.counts.chunk(2)
    nll = -chosen_sums.sum() / chosen_counts.sum().clamp(min=1)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = nll - beta * ratio.mean()
    metrics = _reward_metrics(beta * chosen.detach(), beta * rejected.detach())
    metrics.update(nll_loss=nll.detach(), log_odds_ratio=log_odds.detach().mean())
    return loss, metrics


def kto_loss(
    policy: SequenceLogps,
    reference: SequenceLogps,
    labels: torch.Tensor,
    beta: float,
    weights: tuple[float, float] = (1.0, 1.0),
) -> Losses:
    """KTO (Ethayarajh et al. 2024, eq. 7; TRL's ``kto`` loss): desirable replies pulled above, undesirable
    pushed below the reference point, the detached KL estimate from the mismatched completions (clamped at 0).
    ``policy``/``reference`` hold the rows' completions, then their mismatched KL completions."""
    own, kl_policy = policy.sums.chunk(2)
    ref_own, kl_reference = reference.sums.chunk(2)
    kl = (kl_policy - kl_reference).mean().detach().clamp(min=0)
    ratio = own - ref_own
    good, bad = labels.bool(), ~labels.bool()
    losses = torch.cat(
        [
            weights[0] * (1 - torch.sigmoid(beta * (ratio[good] - kl))),
            weights[1] * (1 - torch.sigmoid(beta * (kl - ratio[bad]))),
        ]
    )
    rewards = beta * ratio.detach()
    metrics = {"kl": kl}
    if good.any():
        metrics["reward_chosen"] = rewards[good].mean()
    if bad.any():
        metrics["reward_rejected"] = rewards[bad].mean()
    if good.any() and bad.any():
        metrics["reward_margin"] = metrics["reward_chosen"] - metrics["reward_rejected"]
    # a desirable reply rewarded above 0 or an undesirable one below 0: the reply moved the right way
    metrics["reward_accuracy"] = torch.where(good, rewards > 0, rewards < 0).float().mean()
    return losses.nanmean(), metrics


class PreferenceTrainer(LoratuiTrainer):
    """``Trainer`` for DPO, ORPO and KTO batches from :class:`PreferenceCollator`.

    The loss is a mean over the micro-batch's pairs (not a token sum), so the Trainer divides it by the
    accumulation steps itself (``loss_is_scaled_for_ga = False``). Per-batch figures (rewards, accuracy,
    margins, KL) are averaged between logging steps and logged beside the loss; evaluation logs them with
    ``eval_`` in front.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        objective: str,
        beta: float,
        sft_weight: float = 0.0,
        kto_weights: tuple[float, float] = (1.0, 1.0),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.objective: str = objective
        self.beta = beta
        self.sft_weight = sft_weight
        self.kto_weights = kto_weights
        self.figures: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def _reference(self, model: Any, inputs: dict[str, Any], sequences: int) -> SequenceLogps:
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), unwrapped.disable_adapter():
            return sequence_logps(unwrapped, inputs, sequences)

    def preference_loss(self, model: Any, inputs: dict[str, Any]) -> Losses:
        """The objective's loss on one collated batch, and its per-batch figures."""
        rows = int(inputs["loratui_rows"])
        policy = sequence_logps(model, inputs, 2 * rows)
        if self.objective == "orpo":
            return orpo_loss(policy, self.beta)
        reference = self._reference(model, inputs, 2 * rows)
        if self.objective == "kto":
            return kto_loss(policy, reference, inputs["preference_label"], self.beta, self.kto_weights)
        return dpo_loss(policy, reference, self.beta, self.sft_weight)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        tokens = inputs.pop("num_tokens", None)
        if model.training and tokens is not None:
            self.tokens_seen += int(tokens)
        loss, metrics = self.preference_loss(model, inputs)
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self.figures[mode][name].append(float(value))
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self.figures[mode].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self.figures[mode].clear()
        super().log(logs, start_time)
