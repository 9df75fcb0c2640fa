"""The adapter as a llama.cpp LoRA GGUF (``--format gguf-lora``), for ``llama-cli -m base.gguf --lora adapter.gguf``
or an Ollama ``ADAPTER``: one base file, many small adapters, swapped without re-exporting the model.

```
runs/<name>/exports/gguf/<name>-lora-<type>.gguf   the adapter (general.type = adapter, adapter.type = lora)
runs/<name>/exports/gguf/<name>-base-<type>.gguf   the base it applies to, with the trained chat template
runs/<name>/exports/gguf/<name>-lora.Modelfile     FROM the base, ADAPTER the adapter
runs/<name>/exports/gguf/lora-report.json          the verification figures
```
* The adapter is converted by ``convert_lora_entry.py`` on llama.cpp's own converter classes (its tensor
  names and row layout); the base by the same converter as the merged GGUF.
* Verification (``export.verify``): the base with the adapter applied, in llama.cpp, against the
  merged model in transformers, judged by the same acceptance rule as the merged GGUF of that type
  (``acceptance.py``); the base alone is measured too, so the table shows what the adapter changes.
* Refused, with the reason: DoRA (llama.cpp has no magnitude vectors), ``modules_to_save`` and trained
  embeddings or biases (not LoRA pairs), stacked adapters (merge those), encoder-decoder models.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loratui.exporters.common import Stages, check_disk, clean_stale, count_params, ensure_merged, write_report_section
from loratui.exporters.gguf import (
    SPM_MODEL,
    GgufRow,
    Reference,
    bytes_per_weight,
    converter_dir,
    gguf_table,
    list_added_tokens,
    recorded_pre,
    run_converter,
    verify_row,
)
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import ExportRefused, LoratuiError
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_write_text
from loratui.pipeline.steps import ShouldStop

TITLE = "GGUF LoRA adapter (llama.cpp --lora)"


def check_adapter(adapter: Path) -> dict[str, Any]:
    """The adapter's peft config, when llama.cpp can apply it as a LoRA; a clear refusal otherwise."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise LoratuiError(
            f"{adapter}: a {kind} adapter cannot be written as a llama.cpp LoRA GGUF (only LoRA can)",
            hint="Export the merged model instead: --format gguf.",
        )
    if config.get("use_dora"):
        raise LoratuiError(
            f"{adapter}: DoRA adapters cannot be written as a llama.cpp LoRA GGUF "
            "(llama.cpp applies B @ A only; DoRA also rescales each weight column)",
            hint="Export the merged model instead (--format gguf): the merge folds DoRA in exactly.",
        )
    if config.get("modules_to_save"):
        raise LoratuiError(
            f"{adapter}: the adapter trains {', '.join(config['modules_to_save'])} in full "
            "(modules_to_save), which a llama.cpp LoRA GGUF cannot carry",
            hint="Export the merged model instead: --format gguf.",
        )
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise LoratuiError(
            f"{adapter}: the adapter trains biases, which a llama.cpp LoRA GGUF cannot carry",
            hint="Export the merged model instead: --format gguf.",
        )
    if "SEQ_2_SEQ" in str(config.get("task_type", "")):
        raise LoratuiError(
            "GGUF export is for decoder-only (causal) models; this adapter is for an encoder-decoder",
            hint="Export the merged safetensors (--format safetensors) and serve them with PyTorch.",
        )
    return config


def stage_base(model_dir: Path, tokenizer: Any, stage: Path) -> None:
    """A folder the converter reads as the base: its weights and config (linked, not copied) and the
    tokenizer carrying the chat template the adapter was trained with (with the base's tokenizer.model and
    the added tokens listed for the converter, for a SentencePiece vocabulary: see gguf.converter_input)."""
    stage.mkdir(parents=True)
    tokenizer.save_pretrained(str(stage))  # first: saving must never write through a link into the base
    for item in model_dir.iterdir():
        if item.is_file() and not (stage / item.name).exists():
            (stage / item.name).symlink_to(item.resolve())
    if (stage / SPM_MODEL).exists():
        list_added_tokens(stage, tokenizer)


def export(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    from loratui.exporters import ollama
    from loratui.pipeline.data.step import load_model_inputs, model_task
    from loratui.pipeline.merge.step import refuse_quantized, resolve_source, tokenizer_for
    from loratui.pipeline.models import resolve_model
    from loratui.pipeline.train.history import check_adapter_base

    started = time.monotonic()
    kind = cfg.export.gguf_lora_type
    source = resolve_source(cfg, run)
    if source.stack:
        raise LoratuiError(
            f"{source.adapter} was trained on top of {len(source.stack)} stacked adapter(s); one LoRA "
            "GGUF cannot carry the stack",
            hint="Export the merged model instead (--format gguf): the merge folds the stack in.",
        )
    check_adapter(source.adapter)
    converter_dir()
    model_dir = resolve_model(cfg.model.base, revision=cfg.model.revision, log=events.log).path
    check_adapter_base(source.meta, source.adapter, cfg.model.base, model_dir)
    if model_task(model_dir, cfg.model.trust_remote_code) != "causal":
        raise LoratuiError(
            "GGUF export is for decoder-only (causal) models; this one is encoder-decoder",
            hint="Export the merged safetensors (--format safetensors) and serve them with PyTorch.",
        )
    refuse_quantized(model_dir)
    out = run.exports / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    params = count_params(model_dir)
    adapter_file = source.adapter / "adapter_model.safetensors"
    check_disk(out, params * bytes_per_weight(kind) + adapter_file.stat().st_size, f"the {kind} base plus the adapter")
    log = out / "convert-lora.log"
    log.write_text("", encoding="utf-8")
    stem = cfg.name
    tokenizer = tokenizer_for(cfg, run, model_dir, "causal", events)
    template = load_model_inputs(cfg, events).template
    ref = Reference()
    if cfg.export.verify:
        ensure_merged(cfg, run, events, should_stop)
        ref = Reference.build(cfg, run, tokenizer, template, events, should_stop, [kind])

    step = Stages(events, 4 if cfg.export.verify else 2, "gguf-lora", "stages", should_stop)

    stage = out / f".{stem}-base-stage.tmp"
    base_tmp, lora_tmp = out / f".{stem}-base-{kind}.gguf.tmp", out / f".{stem}-lora-{kind}.gguf.tmp"
    base_final, lora_final = out / f"{stem}-base-{kind}.gguf", out / f"{stem}-lora-{kind}.gguf"
    rows: list[GgufRow] = []
    replies: dict[str, list[dict[str, Any]]] = {}
    try:
        step(f"converting the base to {kind}")
        stage_base(model_dir, tokenizer, stage)
        pre = recorded_pre(cfg)
        run_converter(
            "convert_entry.py",
            [
                str(stage.resolve()),
                "--outfile",
                str(base_tmp.resolve()),
                "--outtype",
                kind,
                "--model-name",
                f"{stem}-base",
            ],
            log,
            should_stop,
            f"converting the base to {kind}",
            {"LORATUI_GGUF_PRE": pre} if pre else {},
        )
        step(f"converting the adapter to a {kind} LoRA GGUF")
        run_converter(
            "convert_lora_entry.py",
            [str(source.adapter.resolve()), str(stage.resolve()), str(lora_tmp.resolve()), kind, f"{stem}-lora"],
            log,
            should_stop,
            "converting the adapter",
        )
        adapter_params = count_params(source.adapter)
        base_row = GgufRow(
            type=f"base {kind}",
            file=base_final.name,
            bytes=base_tmp.stat().st_size,
            bits_per_weight=8 * base_tmp.stat().st_size / max(params, 1),
            perplexity=None,
            delta_perplexity=None,
            top1_agreement=None,
            decode_tokens_per_s=None,
            replies_stopped=None,
            key_facts=None,
            fallbacks=None,
        )
        lora_row = GgufRow(
            **{
                **asdict(base_row),
                "type": f"base {kind} + LoRA {kind}",
                "file": lora_final.name,
                "bytes": lora_tmp.stat().st_size,
                "bits_per_weight": 8 * lora_tmp.stat().st_size / max(adapter_params, 1),
            }
        )
        if cfg.export.verify:
            step("measuring the base alone in llama.cpp")
            base_row, replies["base"] = verify_row(
                base_row, base_tmp, base_final.name, ref, tokenizer, cfg, events, should_stop, judged_as=""
            )
            step("verifying the base + adapter in llama.cpp")
            try:
                lora_row, replies["lora"] = verify_row(
                    lora_row,
                    base_tmp,
                    lora_final.name,
                    ref,
                    tokenizer,
                    cfg,
                    events,
                    should_stop,
                    lora=lora_tmp,
                    judged_as=kind,
                )
            except ExportRefused as e:  # nothing is written; the figures and the reason stay in the report
                write_report_section(
                    run,
                    TITLE,
                    gguf_table(
                        [base_row, e.row],
                        ref.perplexity,
                        len(ref.examples),
                    ),
                )
                raise
        rows = [base_row, lora_row]
        step.finish("verified" if cfg.export.verify else "written")
        os.replace(base_tmp, base_final)
        os.replace(lora_tmp, lora_final)
        events.artifact(base_final, kind=f"gguf-base-{kind}")
        events.artifact(lora_final, kind=f"gguf-lora-{kind}")
        if cfg.export.ollama_modelfile:
            modelfile = out / f"{stem}-lora.Modelfile"
            atomic_write_text(
                modelfile,
                ollama.modelfile(
                    base_final.name,
                    template,
                    ollama.stop_tokens(tokenizer, template),
                    adapter=lora_final.name,
                    file_name=modelfile.name,
                ),
            )
            events.artifact(modelfile, kind="ollama-modelfile")
    finally:
        base_tmp.unlink(missing_ok=True)
        lora_tmp.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)

    report = {
        "merged_perplexity": ref.perplexity,
        "samples": len(ref.examples),
        "params": params,
        "adapter_params": adapter_params,
        "adapter": str(source.adapter),
        "files": [{**asdict(r), "replies": replies.get(k, [])} for k, r in zip(("base", "lora"), rows)],
    }
    atomic_write_text(out / "lora-report.json", json.dumps(report, indent=2) + "\n")
    usage = [
        f"Use: `llama-cli -m {base_final.name} --lora {lora_final.name}` (any GGUF of the same base works, "
        "quantized ones too); bits/weight of the adapter row: per adapter parameter.",
        "",
    ]
    write_report_section(run, TITLE, usage + gguf_table(rows, ref.perplexity, len(ref.examples)))
    return {
        "path": str(out),
        "files": [base_final.name, lora_final.name],
        "merged_perplexity": ref.perplexity,
        "rows": [asdict(r) for r in rows],
        "seconds": round(time.monotonic() - started, 2),
    }
