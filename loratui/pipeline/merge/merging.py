"""Folding an adapter into its base: ``runs/<name>/merged/`` and its record, and whether it is still current.

``merge`` is the merge step's work, also called by the exporters (which reuse a current ``merged/``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.merge.parity import Parity, check_finite, check_parity, compare, logits, parity_inputs
from loratui.pipeline.merge.source import Source, adapter_digest, refuse_quantized, resolve_source, tokenizer_for
from loratui.pipeline.runs import RunDir, atomic_dir
from loratui.pipeline.steps import ShouldStop
from loratui.pipeline.train.history import check_adapter_base

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # merge.dtype -> load_torch's names
STAGES = 5
RECORD = "loratui-merge.json"  # what merged/ was made from: adapter digest, version, settings, parity


def merge_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings the merged weights and files depend on (parity settings do not change them)."""
    return {
        "base": cfg.model.base,
        "revision": cfg.model.revision,
        "dtype": cfg.merge.dtype,
        "max_shard_size": cfg.merge.max_shard_size,
    }


def missing_files(merged: Path) -> str | None:
    """Why ``merged`` is not a complete merged model directory, or None when it is."""
    if not merged.is_dir():
        return f"{merged} is missing"
    for name in ("config.json", RECORD, "tokenizer_config.json"):
        if not (merged / name).is_file():
            return f"{merged} has no {name}"
    index = merged / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return f"{index.name} cannot be read"
        lost = sorted(name for name in shards if not (merged / name).is_file())
        if lost:
            return f"{merged} lacks {', '.join(lost)}"
    elif not (merged / "model.safetensors").is_file():
        return f"{merged} has no model.safetensors"
    return None


def current_merge(cfg: RunConfig, run: RunDir) -> tuple[dict[str, Any] | None, str]:
    """(the record of ``merged/``, why) when ``merged/`` is complete and was made from the adapter that
    ``cfg`` merges now, with the same settings; (None, why not) when it must be merged again."""
    why = missing_files(run.merged)
    if why:
        return None, why
    try:
        record = json.loads((run.merged / RECORD).read_text(encoding="utf-8"))
        source = resolve_source(cfg, run)
    except (OSError, ValueError, LoratuiError) as e:
        return None, str(e)
    if record.get("adapter_sha256") is None:
        return None, f"{RECORD} was written by an older loratui (no adapter digest)"
    now, then = source.meta.version if source.meta is not None else None, record.get("version")
    if now != then:  # a new version or a rollback: the model card names the version it was made from
        return None, f"the adapter changed since the last merge (v{then} -> v{now})"
    if record["adapter_sha256"] != adapter_digest(source):
        return None, "the adapter's weights changed since the last merge"
    if record.get("settings") != merge_settings(cfg):
        return None, "the merge settings changed since the last merge"
    return record, f"{run.merged} is current (adapter " + (
        f"v{record['version']}" if record.get("version") is not None else record.get("adapter", "?")
    ) + ")"


def reused_summary(run: RunDir, record: dict[str, Any]) -> dict[str, Any]:
    """The summary of a merge that was not redone: what ``merge`` returned when it wrote ``merged/``."""
    files = sorted(p.name for p in run.merged.iterdir())
    return {
        "merged": str(run.merged),
        "dtype": record.get("dtype"),
        "files": files,
        "parity": record.get("parity"),
        "seconds": 0.0,
        "reused": True,
    }


def stored_dtype(model_dir: Path) -> str:
    """The dtype the base's weights are stored in: the first floating tensor of its safetensors, else config.json."""
    names = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
    for path in sorted(model_dir.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtype = str(f.get_slice(key).get_dtype()).lower()
                if dtype in names:
                    return names[dtype]
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    named = str(config.get("dtype") or config.get("torch_dtype") or "").replace("torch.", "")
    return named if named in DTYPES else "float32"


def weights_bytes(model_dir: Path) -> int:
    """Size of the model's weight files: its safetensors when it has any, else its PyTorch .bin shards."""
    for pattern in ("model*.safetensors", "*.safetensors", "pytorch_model*.bin"):
        files = list(model_dir.glob(pattern))
        if files:
            return sum(p.stat().st_size for p in files)
    return 0


def check_disk(run: RunDir, model_dir: Path, source_dtype: str, dtype: str) -> int:
    """Bytes the merged weights need; raises when the run's disk has less free (with 5% to spare)."""
    need = int(weights_bytes(model_dir) * DTYPES[dtype] / DTYPES.get(source_dtype, 4))
    run.path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run.path).free
    if free < need * 1.05 + 64 * 2**20:
        raise LoratuiError(
            f"{run.path}: {free / 2**30:.2f} GiB free, the merged model needs about {need / 2**30:.2f} GiB",
            hint="Free some space, or set runs_dir to a larger disk.",
        )
    return need


# The merge runs on the CPU whatever train.device chose: folding an adapter in is one addition per weight,
# bound by reading and writing the files, and the unquantized base of a QLoRA run may not fit the GPU it
# trained on. Parity compares two passes on the same device, so its tolerances hold everywhere.
MERGE_DEVICE = "cpu"


def _load(model_dir: Path, task: str, dtype: str, trust_remote_code: bool) -> Any:
    from loratui.pipeline.eval.runtimes import load_torch

    return load_torch(model_dir, task, MERGE_DEVICE, PRECISION[dtype], trust_remote_code)


def _plain_generation_config(model: Any, model_dir: Path) -> Path | None:
    """The base's generation_config.json, to copy over the saved one as it is. transformers validates the
    config strictly when saving (``do_sample=false`` with a temperature set fails), so a config that
    does not validate is swapped for a plain one for the save."""
    from transformers import GenerationConfig

    try:
        model.generation_config.validate(strict=True)
    except ValueError:
        own = model.generation_config
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=own.bos_token_id,
            eos_token_id=own.eos_token_id,
            pad_token_id=own.pad_token_id,
            decoder_start_token_id=own.decoder_start_token_id,
        )
    original = model_dir / "generation_config.json"
    return original if original.is_file() else None


def _check_finite_weights(model: Any, dtype: str) -> None:
    import torch

    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise LoratuiError(
                f"the merged weight {name} holds inf or NaN in {dtype}",
                hint="The merged values do not fit this dtype: merge with merge.dtype=float32 "
                "(or bfloat16, which has float32's range).",
            )


class _Stages:
    """The merge's progress in ``STAGES`` stages; a stop request ends it before the next one."""

    def __init__(self, events: EventSink, should_stop: ShouldStop):
        self.events, self.should_stop = events, should_stop

    def __call__(self, i: int, message: str) -> None:
        if self.should_stop():
            raise StepCancelled(f"merge cancelled before: {message}; nothing was written")
        self.events.progress(i, STAGES, task="merge", unit="stages", message=message)


def _check_inputs(cfg: RunConfig, run: RunDir, source: Source, events: EventSink) -> tuple[Path, str, str]:
    """(the base's folder, its task, the merged dtype) after the refusals and the disk check."""
    from loratui.pipeline.models import model_task, resolve_model

    if source.meta is None:
        events.log(
            f"{source.adapter} has no loratui.json: if it was trained on top of stacked adapters, they are "
            "not merged (merge the run's adapter/ or adapters/vN instead)",
            level="warning",
        )
    model_dir = resolve_model(cfg.model.base, revision=cfg.model.revision, log=events.log).path
    refuse_quantized(model_dir)
    check_adapter_base(source.meta, source.adapter, cfg.model.base, model_dir)
    task = model_task(model_dir, cfg.model.trust_remote_code)
    source_dtype = stored_dtype(model_dir)
    dtype = source_dtype if cfg.merge.dtype == "auto" else cfg.merge.dtype
    for stale in run.path.glob(f".{run.merged.name}.*.tmp"):  # left by a merge that was killed
        shutil.rmtree(stale, ignore_errors=True)
    need = check_disk(run, model_dir, source_dtype, dtype)
    if (source.meta is not None and source.meta.method == "qlora") or cfg.lora.method == "qlora":
        events.log("the adapter was trained on a 4-bit base (QLoRA); it is merged into the unquantized base")
    events.log(
        f"merge: {model_dir} ({source_dtype}) + {source.adapter}"
        + (f" on top of {len(source.stack)} stacked adapter(s)" if source.stack else "")
        + f" -> {run.merged} ({dtype}, about {need / 2**20:.0f} MiB), on the CPU"
    )
    return model_dir, task, dtype


def _adapted(
    cfg: RunConfig, model_dir: Path, task: str, dtype: str, source: Source, events: EventSink, stage: _Stages
) -> Any:
    """The base in ``dtype`` with the stacked adapters merged in and ``source``'s adapter on top (unmerged)."""
    from peft import PeftModel

    stage(0, "loading the base")
    model = _load(model_dir, task, dtype, cfg.model.trust_remote_code)
    for path in source.stack:
        events.log(f"merging the stacked adapter {path} first")
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    return PeftModel.from_pretrained(model, str(source.adapter)).eval()


def _record(
    cfg: RunConfig, source: Source, model_dir: Path, dtype: str, digest: str, parity: Parity | None
) -> dict[str, Any]:
    """The contents of ``RECORD``: what ``merged/`` was made from."""
    return {
        "base": cfg.model.base,
        "base_dir": str(model_dir),
        "adapter": str(source.adapter),
        "stack": [str(p) for p in source.stack],
        "version": source.meta.version if source.meta is not None else None,
        "dtype": dtype,
        "adapter_sha256": digest,
        "settings": merge_settings(cfg),
        "parity": parity.as_dict() if parity else None,
    }


def merge(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    """Write ``run.merged``; returns the summary (also used by the safetensors exporter)."""
    from loratui.pipeline.merge.card import model_card
    from loratui.pipeline.train.quiet import quiet_bitsandbytes

    quiet_bitsandbytes()  # before peft imports bitsandbytes
    stage = _Stages(events, should_stop)
    started = time.monotonic()
    source = resolve_source(cfg, run)
    digest = adapter_digest(source)  # before the merge: an adapter replaced meanwhile reads as changed next time
    model_dir, task, dtype = _check_inputs(cfg, run, source, events)
    tokenizer = tokenizer_for(cfg, run, model_dir, task, events)
    model = _adapted(cfg, model_dir, task, dtype, source, events, stage)
    rows = parity_inputs(run, tokenizer, cfg.merge.parity_prompts) if cfg.merge.parity else []
    stage(1, "reference logits (base + adapter, and base alone)")
    reference = logits(model, rows, task) if rows else []
    check_finite(reference)
    base = []
    if rows:
        with model.disable_adapter():
            base = logits(model, rows, task)
    stage(2, "merging")
    model = model.merge_and_unload()
    _check_finite_weights(model, dtype)
    model.config.use_cache = True
    original_generation = _plain_generation_config(model, model_dir)
    with atomic_dir(run.merged) as tmp:
        stage(3, "writing safetensors")
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=cfg.merge.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        if original_generation is not None:
            shutil.copy2(original_generation, tmp / "generation_config.json")
        del model
        parity = None
        if rows:
            stage(4, "parity: the written model against base + adapter")
            merged = _load(tmp, task, dtype, cfg.model.trust_remote_code)
            parity = compare(reference, logits(merged, rows, task), base, dtype, cfg.merge.parity_tolerance)
            del merged
            check_parity(parity, events)
        (tmp / "README.md").write_text(model_card(cfg, run, source, model_dir, dtype, parity, task), encoding="utf-8")
        record = _record(cfg, source, model_dir, dtype, digest, parity)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    files = sorted(p.name for p in run.merged.iterdir())
    for name in files:
        if name.endswith(".safetensors"):
            events.artifact(run.merged / name, kind="merged-weights")
    events.artifact(run.merged, kind="merged")
    events.progress(STAGES, STAGES, task="merge", unit="stages", message="done")
    return {
        "merged": str(run.merged),
        "dtype": dtype,
        "files": files,
        "parity": parity.as_dict() if parity else None,
        "seconds": round(time.monotonic() - started, 2),
    }
