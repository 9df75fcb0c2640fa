"""The transformers Trainer, with the padding-free loss and a trained-token counter."""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from loratui.pipeline.train.fast import packed_loss

EXTRA_KEYS = ("num_tokens",)


class LoratuiTrainer(Trainer):
    """``Trainer`` whose loss understands :class:`~loratui.pipeline.train.fast.PaddingFreeCollator` batches.

    Padded batches (seq2seq, models without the attention interface) take the stock path. Either
    way ``tokens_seen`` counts the examples' tokens (no padding) for tokens/s.
    """

    def __init__(self, *args: Any, keep_logits: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep_logits = keep_logits
        self.tokens_seen = 0

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        tokens = inputs.pop("num_tokens", None)
        if model.training:
            if tokens is None:
                mask = inputs.get("attention_mask")
                tokens = mask.sum() if mask is not None else inputs["input_ids"].numel()
            self.tokens_seen += int(tokens)
        if "cu_seq_lens_q" not in inputs:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = packed_loss(model, inputs, num_items_in_batch, self.keep_logits)
        if (
            self.args.average_tokens_across_devices
            and num_items_in_batch is not None
            and self.accelerator.num_processes > 1
        ):
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients across processes
        return (loss, outputs) if return_outputs else loss
