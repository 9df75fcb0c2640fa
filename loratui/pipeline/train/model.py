"""The model a training run fits: the base (4-bit for qlora, with stacked adapters merged in) and its LoRA adapter."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink
from loratui.pipeline.models import model_class
from loratui.pipeline.train import settings


def check_family(cfg: RunConfig, model_dir: Path, events: EventSink | None) -> None:
    """Refuse training a family that cannot be trained; warn when a configured export format will be
    refused for it later (``loratui run`` refuses that before this step even starts)."""
    from loratui.pipeline.families import check, refusal

    warn = (lambda text: events.log(text, level="warning")) if events is not None else None
    check(model_dir, ["train"], warn=warn)
    for fmt in dict.fromkeys(cfg.export.formats):
        error = refusal(model_dir, fmt)
        if error is not None and warn is not None:
            warn(f"export.formats names {fmt}, which this model cannot take: {error.message}")


def wants_padding_free(cfg: RunConfig, model_dir: Path, task: str, events: EventSink | None = None) -> bool:
    """Whether this run trains on padding-free batches (asked for, and the model's attention takes them)."""
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


def _load_kwargs(
    cfg: RunConfig, model_dir: Path, task: str, device: str, precision: str, padding_free: bool
) -> dict[str, Any]:
    """``from_pretrained`` arguments of the base: dtype, attention, device map (no quantization)."""
    import torch

    from loratui.pipeline.train.fast import register_attention

    # a GPU (CUDA or MPS) holds the base in the compute precision; the CPU in fp32 (autocast runs bf16)
    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        if device in ("cuda", "mps")
        else torch.float32
    )
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    if padding_free:
        kwargs["attn_implementation"] = register_attention()
    elif task == "causal":
        from loratui.pipeline.families import attention_implementation

        kwargs["attn_implementation"] = attention_implementation(model_dir)
    if device == "cuda":
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    elif device == "mps":
        kwargs["device_map"] = {"": "mps"}
    return kwargs


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
    kwargs = _load_kwargs(cfg, model_dir, task, device, precision, padding_free)
    quantize = cfg.lora.method == "qlora"
    if quantize and stack:  # merging into a 4-bit model rounds; merge on the full-precision base first
        events.log("stack on qlora: earlier adapters are merged into the full-precision base, then it is quantized")
    if quantize and not stack:
        kwargs["quantization_config"] = _bnb_config(cfg, precision)
    model = model_class(task).from_pretrained(str(model_dir), **kwargs)
    if stack:
        from peft import PeftModel

        for path in stack:
            events.log(f"stack: merging {path} into the base")
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        if quantize:
            model = _quantize_in_place(model, cfg, precision, model_dir, task, kwargs)
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing
        )
    return model


def _bnb_config(cfg: RunConfig, precision: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.lora.quant_type,
        bnb_4bit_use_double_quant=cfg.lora.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def _quantize_in_place(
    model: Any, cfg: RunConfig, precision: str, model_dir: Path, task: str, kwargs: dict[str, Any]
) -> Any:
    with tempfile.TemporaryDirectory(prefix="loratui-stack-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp)
        del model
        return model_class(task).from_pretrained(
            tmp,
            quantization_config=_bnb_config(cfg, precision),
            **{k: v for k, v in kwargs.items() if k != "quantization_config"},
        )


def lora_targets(cfg: RunConfig, model: Any) -> dict[str, Any]:
    """``lora.target_modules`` resolved for this model's family (``target_modules``/``target_parameters``)."""
    from loratui.pipeline.families import lora_targets as resolve

    return resolve(cfg.lora.target_modules, model.config)


def add_adapter(cfg: RunConfig, model: Any, task: str, resolved: settings.Resolved, init_from: Path | None) -> Any:
    """``model`` with a new LoRA adapter, or with the adapter in ``init_from`` (trainable) to continue it."""
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


def free_gib() -> float | None:
    """Free GPU memory in GiB, None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return float(free / 2**30)


def is_oom(error: BaseException) -> bool:
    import torch

    text = str(error)  # MPS raises a RuntimeError: "MPS backend out of memory (MPS allocated: ...)"
    return (
        isinstance(error, torch.OutOfMemoryError)
        or "out of memory" in text.lower()
        and ("CUDA" in text or "MPS" in text)
    )
