"""The train step: a PEFT adapter from the data step's token datasets, with the transformers Trainer.

Writes ``runs/<name>/adapter/`` (the current adapter, PEFT format), ``adapters/vN/`` (every
version, see :mod:`~loratui.pipeline.train.history`) and ``checkpoints/checkpoint-<step>/``.
SIGTERM saves a checkpoint at the next optimizer step and ends with ``cancelled``;
``train.resume`` continues from it exactly (model, optimizer, scheduler, RNG, data order).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.step import prepare
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink
from loratui.pipeline.models import model_class
from loratui.pipeline.runs import RunDir, write_config
from loratui.pipeline.steps import WORKER_ENV, ShouldStop, StepResult
from loratui.pipeline.train import history as hist
from loratui.pipeline.train import settings
from loratui.pipeline.train.quiet import quiet_bitsandbytes

# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in step order that were fully written (the Trainer writes trainer_state.json last)."""
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        step = path.name.rpartition("-")[2]
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: RunConfig, run: RunDir) -> Path | None:
    want = cfg.train.resume
    if want is False or want in ("false", ""):
        return None
    if want is True or want in ("true", "latest"):
        found = complete_checkpoints(run.checkpoints)
        if not found:
            raise LoratuiError(
                f"{run.checkpoints}: no complete checkpoint to resume from",
                hint="Train without --resume to start over.",
            )
        return found[-1]
    path = Path(str(want))
    if not path.is_absolute() and not path.exists():
        path = run.checkpoints / path
    if not (path / "trainer_state.json").is_file():
        raise LoratuiError(
            f"{path}: not a complete training checkpoint (no trainer_state.json)",
            hint=f"Checkpoints of this run: {', '.join(p.name for p in complete_checkpoints(run.checkpoints)) or 'none'}",
        )
    return path


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_splits(run: RunDir, manifest: dict[str, Any]) -> tuple[Any, Any]:
    from datasets import load_from_disk

    splits = manifest["splits"]
    train = load_from_disk(str(run.data / splits["train"])).select_columns(["input_ids", "labels"])
    val = splits.get("validation")
    return train, (load_from_disk(str(run.data / val)).select_columns(["input_ids", "labels"]) if val else None)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def _check_family(cfg: RunConfig, model_dir: Path, events: EventSink | None) -> None:
    """Refuse training a family that cannot be trained; warn when a configured export format will be
    refused for it later (``loratui run`` refuses that before this step even starts)."""
    from loratui.pipeline.families import check, refusal

    warn = (lambda text: events.log(text, level="warning")) if events is not None else None
    check(model_dir, ["train"], warn=warn)
    for fmt in dict.fromkeys(cfg.export.formats):
        error = refusal(model_dir, fmt)
        if error is not None and warn is not None:
            warn(f"export.formats names {fmt}, which this model cannot take: {error.message}")


def _wants_padding_free(cfg: RunConfig, model_dir: Path, task: str, events: EventSink | None = None) -> bool:
    if not cfg.train.padding_free or task != "causal":
        return False
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        why: str | None = f"{type(config).__name__} has no causal-LM class in transformers"
    else:
        from loratui.pipeline.train.fast import padding_free_refusal

        why = padding_free_refusal(config, cls)
    if why is not None and events is not None:
        events.log(f"padded batches: padding-free training is off for this model because {why}")
    return why is None


def load_base(
    cfg: RunConfig,
    model_dir: Path,
    task: str,
    device: str,
    precision: str,
    padding_free: bool,
    stack: list[Path],
    events: EventSink,
) -> Any:
    """The base model on ``device`` (4-bit for qlora), with ``stack`` adapters merged in order."""
    import torch

    from loratui.pipeline.train.fast import register_attention

    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        if device == "cuda"
        else torch.float32
    )
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if padding_free:
        kwargs["attn_implementation"] = register_attention()
    elif task == "causal":
        from loratui.pipeline.families import attention_implementation

        kwargs["attn_implementation"] = attention_implementation(model_dir)
    quantize = cfg.lora.method == "qlora"
    if quantize and stack:  # merging into a 4-bit model rounds; merge on the full-precision base first
        events.log("stack on qlora: earlier adapters are merged into the full-precision base, then it is quantized")
    if quantize and not stack:
        kwargs["quantization_config"] = _bnb_config(cfg, device, precision)
    if device == "cuda":
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = model_class(task).from_pretrained(str(model_dir), **kwargs)
    if stack:
        from peft import PeftModel

        for path in stack:
            events.log(f"stack: merging {path} into the base")
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        if quantize:
            model = _quantize_in_place(model, cfg, device, precision, model_dir, task, kwargs)
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    return model


def _bnb_config(cfg: RunConfig, device: str, precision: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.lora.quant_type,
        bnb_4bit_use_double_quant=cfg.lora.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def _quantize_in_place(
    model: Any, cfg: RunConfig, device: str, precision: str, model_dir: Path, task: str, kwargs: dict[str, Any]
) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="loratui-stack-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp)
        del model
        return model_class(task).from_pretrained(
            tmp,
            quantization_config=_bnb_config(cfg, device, precision),
            **{k: v for k, v in kwargs.items() if k != "quantization_config"},
        )


def lora_targets(cfg: RunConfig, model: Any) -> dict[str, Any]:
    """``lora.target_modules`` resolved for this model's family (``target_modules``/``target_parameters``)."""
    from loratui.pipeline.families import lora_targets as resolve

    return resolve(cfg.lora.target_modules, model.config)


def add_adapter(cfg: RunConfig, model: Any, task: str, resolved: settings.Resolved, init_from: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    if init_from is not None:  # continue: the existing adapter, trainable
        return PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
    lora = cfg.lora
    config = LoraConfig(
        r=resolved["lora.r"],
        lora_alpha=resolved["lora.alpha"],
        lora_dropout=lora.dropout,
        **lora_targets(cfg, model),
        use_rslora=lora.use_rslora,
        use_dora=lora.method == "dora",
        modules_to_save=lora.modules_to_save or None,
        task_type=TaskType.SEQ_2_SEQ_LM if task == "seq2seq" else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise LoratuiError(
            f"lora.target_modules: {e}", hint="Use all-linear, attention, or module names that exist in this model."
        ) from None


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


def training_arguments(
    cfg: RunConfig, run: RunDir, resolved: settings.Resolved, device: str, precision: str, has_eval: bool
) -> Any:
    from transformers import TrainingArguments

    t = cfg.train
    eval_strategy = "no" if not has_eval else "steps" if t.eval_every else "epoch"
    save_strategy = "steps" if t.save_every else "epoch"
    save_steps = t.save_every
    keep_best = has_eval and (t.keep_best or t.early_stopping_patience is not None)
    if keep_best and eval_strategy != save_strategy:  # the Trainer keeps the best only at eval points
        save_strategy, save_steps = eval_strategy, t.eval_every
    if keep_best and eval_strategy == "steps" and save_steps % t.eval_every:
        save_steps = t.eval_every
    # TensorBoard is added by _fit with the run's own folder (transformers 5 dropped `logging_dir`)
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
        eval_strategy=eval_strategy,
        eval_steps=t.eval_every or None,
        save_strategy=save_strategy,
        save_steps=save_steps or None,  # type: ignore[arg-type]  # None unless save_strategy is "steps"
        save_total_limit=t.save_total_limit,
        logging_strategy="steps",
        logging_steps=t.logging_every,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        greater_is_better=False if keep_best else None,
        report_to=report or "none",
        seed=t.seed,
        data_seed=t.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        dataloader_num_workers=0,
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
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.path / "tensorboard")))


def _collator(padding_free: bool, cfg: RunConfig, tokenizer: Any, model: Any) -> Any:
    if padding_free:
        from loratui.pipeline.train.fast import PaddingFreeCollator

        return PaddingFreeCollator(share_prefix=cfg.train.share_prefix)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, padding="longest")


def _free_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower() and "CUDA" in str(error)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _parent_adapter(cfg: RunConfig, run: RunDir) -> tuple[Path, dict[str, Any]]:
    """The adapter that continue/stack starts from, and its provenance."""
    if cfg.lora.init_from:
        path = Path(cfg.lora.init_from)
        if not (path / "adapter_config.json").is_file():
            raise LoratuiError(f"lora.init_from: {path} is not a PEFT adapter folder (no adapter_config.json)")
        return path, hist.adapter_meta(path)
    current = hist.current_version(run)
    if current is None or not (run.adapter / "adapter_config.json").is_file():
        raise LoratuiError(
            f"train.mode={cfg.train.mode}: {run.path} has no trained adapter yet",
            hint="Train once with train.mode=fresh (or set lora.init_from to an adapter folder).",
        )
    return hist.version_dir(run, current["version"]), current


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    quiet_bitsandbytes()
    if cfg.train.nproc > 1 and not os.environ.get(WORKER_ENV):
        from loratui.pipeline.train.launch import run_distributed

        return run_distributed(cfg, run, events, should_stop)
    return train(cfg, run, events, should_stop)


def train(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> Any:
    import warnings

    import torch
    from transformers import AutoTokenizer

    quiet_bitsandbytes()  # before peft imports bitsandbytes
    warnings.filterwarnings("ignore", message="mtime may not be reliable")
    started = time.monotonic()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if os.environ.get(WORKER_ENV):  # the launcher ran the data step before starting the processes
        manifest = json.loads((run.data / "dataset.json").read_text(encoding="utf-8"))
    else:
        manifest = prepare(cfg, run, events, should_stop)
    task = manifest.get("task", "causal")
    model_dir = Path(manifest["model_dir"])
    train_ds, val_ds = load_splits(run, manifest)
    lengths = [len(x) for x in train_ds["input_ids"]]

    cuda = torch.cuda.is_available()
    device = settings.resolve_device(cfg, cuda)
    precision = settings.resolve_precision(cfg, device.value, cuda and torch.cuda.is_bf16_supported())
    if cfg.lora.method == "qlora" and device.value == "cpu":
        events.log(
            "qlora on CPU: bitsandbytes' CPU 4-bit kernels are slower than an fp32 base here; "
            "use method lora on CPUs with the memory for it",
            level="warning",
        )
    resolved = settings.resolve_auto(cfg, lengths, device=device.value, nproc=world, free_gib=_free_gib())
    resume = resolve_resume(cfg, run)
    if resume is not None:  # a resumed run keeps the settings it started with
        resolved = _settings_of_checkpoint(resume, resolved)
    settings.apply(cfg, resolved)
    cfg.train.resume = False  # how this invocation started, not a setting of the run
    if rank == 0:
        write_config(run.config, cfg)
        events.log(f"device {device.value} ({device.reason}); precision {precision.value} ({precision.reason})")
        for line in resolved.lines():
            events.log(f"setting {line}")

    mode = cfg.train.mode
    parent_path, parent = (None, {}) if mode == "fresh" else _parent_adapter(cfg, run)
    stack = [Path(p) for p in parent.get("stack_paths", [])]  # merged into the base of the parent
    if mode == "stack":
        assert parent_path is not None  # not a fresh run
        stack.append(parent_path)
        init_from = None
    else:
        init_from = parent_path if mode == "continue" else None

    _check_family(cfg, model_dir, events if rank == 0 else None)
    padding_free = _wants_padding_free(cfg, model_dir, task, events if rank == 0 else None)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    micro, accum = resolved["train.batch_size"], resolved["train.grad_accum"]
    while True:
        from transformers import set_seed

        set_seed(cfg.train.seed)  # the adapter's initial weights depend on it
        model = load_base(cfg, model_dir, task, device.value, precision.value, padding_free, stack, events)
        model = add_adapter(cfg, model, task, resolved, init_from)
        if rank == 0:
            trainable, total = model.get_nb_trainable_parameters()
            events.log(
                f"adapter: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%); "
                f"{'padding-free batches' if padding_free else 'padded batches'}"
            )
        try:
            result = _fit(
                cfg,
                run,
                events,
                should_stop,
                model,
                tokenizer,
                train_ds,
                val_ds,
                resolved,
                device.value,
                precision.value,
                padding_free,
                resume,
            )
            break
        except Exception as e:
            if not (cfg.train.oom_fallback and is_oom(e)):
                raise
            del model
            if cuda:
                torch.cuda.empty_cache()
            if micro == 1:
                raise LoratuiError(
                    "out of memory at micro-batch 1",
                    hint="Use lora.method=qlora, a shorter "
                    "data.max_length, train.gradient_checkpointing=true, or a larger GPU.",
                ) from None
            micro, accum = micro // 2, accum * 2
            resolved.set("train.batch_size", micro, "halved after running out of memory")
            resolved.set("train.grad_accum", accum, "doubled after running out of memory (same effective batch)")
            settings.apply(cfg, resolved)
            if rank == 0:
                write_config(run.config, cfg)
            found = complete_checkpoints(run.checkpoints)
            resume = found[-1] if found else None
            events.log(
                f"out of memory: retrying with micro-batch {micro} x accumulation {accum}"
                + (f", from {resume.name}" if resume else ""),
                level="warning",
            )

    trainer, callback = result
    if callback.cancelled:
        found = complete_checkpoints(run.checkpoints)
        return StepResult(
            status="cancelled",
            resume_from=str(found[-1]) if found else None,
            summary={"step": trainer.state.global_step},
        )
    if rank != 0:
        return StepResult(summary={"rank": rank})

    curve = hist.curve_of(trainer.state.log_history)  # the whole run: a resume restored the steps before it
    losses = [loss for _, loss in curve["train"]]
    evals = [loss for _, loss in curve["eval"]]
    seconds = round(time.monotonic() - started, 2)
    train_seconds = max(trainer.state.log_history[-1].get("train_runtime", seconds), 1e-9)
    tokens = trainer.tokens_seen * world
    version = hist.next_version(run)
    entry = {
        "version": version,
        "mode": mode,
        "parent": parent.get("version") if mode != "fresh" else None,
        "stack": [*parent.get("stack", []), parent.get("version", str(parent_path))]
        if mode == "stack"
        else parent.get("stack", []),
        "stack_paths": [str(p.resolve()) for p in stack],  # absolute: merge and eval may run from elsewhere
        "base": cfg.model.base,
        "model_dir": str(model_dir),
        "task": task,
        "data": {
            "source": cfg.data.source,
            "cache_key": manifest.get("cache_key"),
            "config": cfg.data.model_dump(mode="json"),
        },  # the evaluate step re-scores it (retention)
        "method": cfg.lora.method,
        "r": resolved["lora.r"],
        "alpha": resolved["lora.alpha"],
        "lr": cfg.train.lr,
        "epochs": cfg.train.epochs,
        "max_steps": cfg.train.max_steps,
        "effective_batch": cfg.train.effective_batch,
        "steps": trainer.state.global_step,
        "metrics": {
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "eval_loss_best": min(evals) if evals else None,
            "tokens_per_s": round(tokens / train_seconds, 1),
        },
    }
    (run.path / "adapters").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".v{version}-", dir=run.path / "adapters") as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / hist.CURVE).write_text(json.dumps(curve) + "\n", encoding="utf-8")
        hist.record(run, entry, Path(tmp))
    events.artifact(run.adapter, kind="adapter")
    if evals and trainer.state.best_metric is not None:
        events.log(
            f"kept the adapter with the lowest eval loss {trainer.state.best_metric:.4f} "
            f"({trainer.state.best_model_checkpoint})"
        )
    summary = {
        "version": version,
        "mode": mode,
        "steps": trainer.state.global_step,
        "train_loss": entry["metrics"]["train_loss_last"],
        "eval_loss": entry["metrics"]["eval_loss_best"],
        "tokens": tokens,
        "tokens_per_s": entry["metrics"]["tokens_per_s"],
        "adapter": str(run.adapter),
        "seconds": seconds,
    }
    return StepResult(summary=summary, artifacts=[str(run.adapter)])


def _settings_of_checkpoint(resume: Path, resolved: settings.Resolved) -> settings.Resolved:
    """Micro-batch and accumulation as the checkpoint was trained (a resume must not change them)."""
    state = json.loads((resume / "trainer_state.json").read_text())
    micro = state.get("train_batch_size")
    if micro and micro != resolved["train.batch_size"]:
        resolved.set("train.batch_size", micro, f"as in {resume.name}")
    return resolved


def _fit(
    cfg: RunConfig,
    run: RunDir,
    events: EventSink,
    should_stop: ShouldStop,
    model: Any,
    tokenizer: Any,
    train_ds: Any,
    val_ds: Any,
    resolved: settings.Resolved,
    device: str,
    precision: str,
    padding_free: bool,
    resume: Path | None,
) -> tuple[Any, Any]:
    from transformers import EarlyStoppingCallback

    from loratui.pipeline.train.callbacks import EventsCallback
    from loratui.pipeline.train.fast import accepts_logits_to_keep
    from loratui.pipeline.train.trainer import LoratuiTrainer

    args = training_arguments(cfg, run, resolved, device, precision, has_eval=val_ds is not None)
    trainer = LoratuiTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=_collator(padding_free, cfg, tokenizer, model),
        keep_logits=padding_free and accepts_logits_to_keep(model),
    )
    callback = EventsCallback(events, should_stop, lambda: trainer.tokens_seen, world_size=args.world_size)
    trainer.add_callback(callback)
    if "tensorboard" in cfg.train.report_to:
        trainer.add_callback(_tensorboard(run))
    if cfg.train.early_stopping_patience is not None and val_ds is not None:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    for cb in list(trainer.callback_handler.callbacks):  # the Trainer's own console printing; events replace it
        if type(cb).__name__ in ("PrinterCallback", "ProgressCallback"):
            trainer.remove_callback(cb)
    if resume is not None:  # the curve so far rides along: the TUI draws the whole run, whatever is deleted later
        events.log(f"resuming from {resume}", curve=hist.checkpoint_curve(resume))
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, callback
