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
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_dir
from loratui.pipeline.steps import ShouldStop, StepResult
from loratui.pipeline.train.history import check_adapter_base

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # merge.dtype -> load_torch's names
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
STAGES = 5
RECORD = "loratui-merge.json"  # what merged/ was made from: adapter digest, version, settings, parity


@dataclass
class Source:
    """What gets merged."""

    adapter: Path
    stack: list[Path]
    meta: dict[str, Any]


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


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def resolve_source(cfg: RunConfig, run: RunDir) -> Source:
    from loratui.pipeline.train.history import adapter_meta

    path = Path(cfg.merge.adapter).expanduser() if cfg.merge.adapter else run.adapter
    if not (path / "adapter_config.json").is_file():
        if cfg.merge.adapter:
            raise LoratuiError(f"merge.adapter: {path} is not a PEFT adapter folder (no adapter_config.json)")
        raise LoratuiError(
            f"{path}: there is no trained adapter to merge",
            hint="Run `loratui train --config <file>` first, or set merge.adapter.",
        )
    meta = adapter_meta(path)
    stack = [Path(p) for p in meta.get("stack_paths", [])]
    for p in stack:
        if not (p / "adapter_config.json").is_file():
            raise LoratuiError(
                f"{path} was trained on top of {p} (a stack run), which is missing",
                hint="Restore that adapter version (`loratui train history`), then merge again.",
            )
    return Source(path, stack, meta)


def adapter_digest(source: Source) -> str:
    """SHA-256 over the adapter's config and weights, and those of every adapter stacked under it, in merge
    order: what the merged weights are made of (the version number alone does not survive a re-created run)."""
    h = hashlib.sha256()
    for folder in [*source.stack, source.adapter]:
        names = sorted(
            p.name for p in folder.iterdir() if p.name == "adapter_config.json" or p.name.startswith("adapter_model.")
        )
        for name in names:
            h.update(name.encode() + b"\0")
            with (folder / name).open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\1")
    return h.hexdigest()


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
    now, then = source.meta.get("version"), record.get("version")
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


def refuse_quantized(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method") or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else "?")
        raise LoratuiError(
            f"{model_dir} is stored quantized ({method}): merging into quantized weights rounds the adapter away",
            hint="Set model.base to the unquantized original of this model (QLoRA adapters merge into it "
            "exactly), or serve base + adapter without merging.",
        )


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


def parity_inputs(run: RunDir, tokenizer: Any, n: int, max_tokens: int = 64) -> list[dict[str, list[int]]]:
    """``n`` examples from the run's test data (else validation, train), cut to ``max_tokens``; built-in
    sentences when the run has no data."""
    manifest_file = run.data / "dataset.json"
    rows: list[dict[str, list[int]]] = []
    if manifest_file.is_file():
        from datasets import load_from_disk

        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        for split in ("test", "validation", "train"):
            if split in manifest["splits"] and (run.data / manifest["splits"][split]).is_dir():
                ds = load_from_disk(str(run.data / manifest["splits"][split]))
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


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------


def _load(model_dir: Path, task: str, dtype: str, trust_remote_code: bool) -> Any:
    from loratui.pipeline.evaluate.runtimes import load_torch

    return load_torch(model_dir, task, "cpu", PRECISION[dtype], trust_remote_code)


def tokenizer_for(cfg: RunConfig, run: RunDir, model_dir: Path, task: str, events: EventSink) -> Any:
    """The base tokenizer, carrying the chat template the adapter was trained with (``data.template``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    if task != "causal":
        return tokenizer
    manifest = run.data / "dataset.json"
    source = json.loads(manifest.read_text(encoding="utf-8")).get("chat_template") if manifest.is_file() else None
    if not source:
        from loratui.pipeline.data.templates import resolve_template

        source = resolve_template(cfg.data.template, tokenizer).source
    if source != getattr(tokenizer, "chat_template", None):
        events.log("the merged tokenizer carries the chat template the adapter was trained with")
        tokenizer.chat_template = source
    return tokenizer


def _plain_generation_config(model: Any, model_dir: Path) -> Path | None:
    """The base's generation_config.json, to copy over the saved one as it is. transformers validates the
    config strictly when saving (``do_sample=false`` with a temperature set fails), so a config that
    does not validate is swapped for a plain one for the save."""
    from transformers import GenerationConfig

    try:
        model.generation_config.validate(strict=True)
    except ValueError:
        own = model.generation_config
        model.generation_config = GenerationConfig(
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


def merge(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    """Write ``run.merged``; returns the summary (also used by the safetensors exporter)."""
    from loratui.pipeline.data.step import model_task
    from loratui.pipeline.merge.card import model_card
    from loratui.pipeline.models import resolve_model
    from loratui.pipeline.train.quiet import quiet_bitsandbytes

    quiet_bitsandbytes()  # before peft imports bitsandbytes

    def stage(i: int, message: str) -> None:
        if should_stop():
            raise StepCancelled(f"merge cancelled before: {message}; nothing was written")
        events.progress(i, STAGES, task="merge", unit="stages", message=message)

    started = time.monotonic()
    source = resolve_source(cfg, run)
    digest = adapter_digest(source)  # before the merge: an adapter replaced meanwhile reads as changed next time
    if not source.meta:
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
    if source.meta.get("method") == "qlora" or cfg.lora.method == "qlora":
        events.log("the adapter was trained on a 4-bit base (QLoRA); it is merged into the unquantized base")
    events.log(
        f"merge: {model_dir} ({source_dtype}) + {source.adapter}"
        + (f" on top of {len(source.stack)} stacked adapter(s)" if source.stack else "")
        + f" -> {run.merged} ({dtype}, about {need / 2**20:.0f} MiB)"
    )

    from peft import PeftModel

    tokenizer = tokenizer_for(cfg, run, model_dir, task, events)
    stage(0, "loading the base")
    model = _load(model_dir, task, dtype, cfg.model.trust_remote_code)
    for path in source.stack:
        events.log(f"merging the stacked adapter {path} first")
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(source.adapter)).eval()
    rows = parity_inputs(run, tokenizer, cfg.merge.parity_prompts) if cfg.merge.parity else []
    stage(1, "reference logits (base + adapter, and base alone)")
    reference = logits(model, rows, task) if rows else []
    check_finite(reference)
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
        (tmp / "README.md").write_text(model_card(cfg, run, source, model_dir, dtype, parity, task), encoding="utf-8")
        (tmp / RECORD).write_text(
            json.dumps(
                {
                    "base": cfg.model.base,
                    "base_dir": str(model_dir),
                    "adapter": str(source.adapter),
                    "stack": [str(p) for p in source.stack],
                    "version": source.meta.get("version"),
                    "dtype": dtype,
                    "adapter_sha256": digest,
                    "settings": merge_settings(cfg),
                    "parity": parity.as_dict() if parity else None,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
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


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    summary = merge(cfg, run, events, should_stop)
    return StepResult(summary=summary, artifacts=[summary["merged"]])
