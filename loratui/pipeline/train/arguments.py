"""The transformers Trainer of a training run: its arguments, collator and callbacks, and the fit itself."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig, TrainSection
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop
from loratui.pipeline.train import history as hist
from loratui.pipeline.train import settings


@dataclass
class _Schedule:
    """When the Trainer evaluates and saves, and whether it keeps the best checkpoint."""

    eval_strategy: str
    save_strategy: str
    save_steps: int
    keep_best: bool


def _schedule(t: TrainSection, has_eval: bool) -> _Schedule:
    eval_strategy = "no" if not has_eval else "steps" if t.eval_every else "epoch"
    save_strategy = "steps" if t.save_every else "epoch"
    save_steps = t.save_every
    keep_best = has_eval and (t.keep_best or t.early_stopping_patience is not None)
    if keep_best and eval_strategy != save_strategy:  # the Trainer keeps the best only at eval points
        save_strategy, save_steps = eval_strategy, t.eval_every
    if keep_best and eval_strategy == "steps" and save_steps % t.eval_every:
        save_steps = t.eval_every
    return _Schedule(eval_strategy, save_strategy, save_steps, keep_best)


def training_arguments(
    cfg: RunConfig, run: RunDir, resolved: settings.Resolved, device: str, precision: str, has_eval: bool
) -> Any:
    from transformers import TrainingArguments

    t = cfg.train
    plan = _schedule(t, has_eval)
    # TensorBoard is added by fit with the run's own folder (transformers 5 dropped `logging_dir`)
    report: list[str] = [r for r in t.report_to if r != "tensorboard"]
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=resolved["train.batch_size"],
        per_device_eval_batch_size=resolved["train.batch_size"],
        gradient_accumulation_steps=resolved["train.grad_accum"],
        num_train_epochs=float(resolved["train.epochs"]),
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=float(t.warmup_ratio),  # transformers 5: a float below 1 is a share of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        use_cpu=device == "cpu",
        eval_strategy=plan.eval_strategy,
        eval_steps=t.eval_every or None,
        save_strategy=plan.save_strategy,
        save_steps=plan.save_steps or None,  # type: ignore[arg-type]  # None unless save_strategy is "steps"
        save_total_limit=t.save_total_limit,
        logging_strategy="steps",
        logging_steps=t.logging_every,
        load_best_model_at_end=plan.keep_best,
        metric_for_best_model="eval_loss" if plan.keep_best else None,
        greater_is_better=False if plan.keep_best else None,
        report_to=report or "none",
        seed=t.seed,
        data_seed=t.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",  # pinned host memory only speeds copies to a CUDA GPU
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
        ddp_find_unused_parameters=False,
        log_level="warning",
    )


def _tensorboard(run: RunDir) -> Any:
    """transformers' TensorBoard callback, writing into ``<run>/tensorboard`` (needs the tensorboard package)."""
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise LoratuiError(
            "train.report_to names tensorboard, but the tensorboard package is not installed",
            hint="pip install tensorboard, or remove it from train.report_to",
        ) from exc
    writer = SummaryWriter(log_dir=str(run.path / "tensorboard"))
    return TensorBoardCallback(tb_writer=writer)  # type: ignore[no-untyped-call]


def _collator(padding_free: bool, cfg: RunConfig, tokenizer: Any, model: Any) -> Any:
    if padding_free:
        from loratui.pipeline.train.fast import PaddingFreeCollator

        return PaddingFreeCollator(share_prefix=cfg.train.share_prefix)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, padding="longest")


def _trainer(cfg: RunConfig, model: Any, args: Any, inputs: FitInputs) -> Any:
    """The Trainer for ``train.objective``: the SFT loss, or the preference objective's."""
    from loratui.pipeline.train.fast import accepts_logits_to_keep

    t = cfg.train
    common = dict(model=model, args=args, train_dataset=inputs.train_ds, eval_dataset=inputs.val_ds)
    keep_logits = inputs.padding_free and accepts_logits_to_keep(model)
    if t.objective == "sft":
        from loratui.pipeline.train.trainer import LoratuiTrainer

        collator = _collator(inputs.padding_free, cfg, inputs.tokenizer, model)
        return LoratuiTrainer(**common, data_collator=collator, keep_logits=keep_logits)
    from loratui.pipeline.train.preference import PreferenceCollator, PreferenceTrainer

    tokenizer = inputs.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = PreferenceCollator(t.objective, keep_logits, pad or 0, share_prefix=t.share_prefix)
    return PreferenceTrainer(
        **common,
        data_collator=collator,
        keep_logits=keep_logits,
        objective=t.objective,
        beta=t.beta,
        sft_weight=t.sft_weight,
        kto_weights=(t.desirable_weight, t.undesirable_weight),
    )


@dataclass
class FitInputs:
    """What a fit trains on and how: the same for every out-of-memory retry."""

    tokenizer: Any
    train_ds: Any
    val_ds: Any
    device: str
    precision: str
    padding_free: bool
    in_order: bool = False  # train on the examples in their order (the estimate's probe), not shuffled


def fit(
    cfg: RunConfig,
    run: RunDir,
    events: EventSink,
    should_stop: ShouldStop,
    model: Any,
    inputs: FitInputs,
    resolved: settings.Resolved,
    resume: Path | None,
) -> tuple[Any, Any]:
    """Train ``model`` with the Trainer, from ``resume`` when given; returns (trainer, the events callback)."""
    from transformers import EarlyStoppingCallback

    from loratui.pipeline.train.callbacks import EventsCallback

    has_eval = inputs.val_ds is not None
    args = training_arguments(cfg, run, resolved, inputs.device, inputs.precision, has_eval=has_eval)
    if inputs.in_order:
        args.train_sampling_strategy = "sequential"
    trainer = _trainer(cfg, model, args, inputs)
    callback = EventsCallback(events, should_stop, lambda: trainer.tokens_seen, world_size=args.world_size)
    trainer.add_callback(callback)
    if "tensorboard" in cfg.train.report_to and int(os.environ.get("RANK", 0)) == 0:  # one writer per run
        trainer.add_callback(_tensorboard(run))
    if cfg.train.early_stopping_patience is not None and has_eval:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    for cb in list(trainer.callback_handler.callbacks):  # the Trainer's own console printing; events replace it
        if type(cb).__name__ in ("PrinterCallback", "ProgressCallback"):
            trainer.remove_callback(cb)
    if resume is not None:  # the curve so far rides along: the TUI draws the whole run, whatever is deleted later
        events.log(f"resuming from {resume}", curve=hist.checkpoint_curve(resume))
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, callback
