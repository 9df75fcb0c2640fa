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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loratui.exporters.common import ExportJob, Stages, count_params, ensure_merged, make_room, write_report_section
from loratui.exporters.gguf import (
    SPM_MODEL,
    convert,
    converter_dir,
    list_added_tokens,
    recorded_pre,
    require_causal,
    run_converter,
)
from loratui.exporters.gguf_verify import GgufRow, Reference, gguf_table, verify_row
from loratui.exporters.records import LORA_REPORT, ExportReport
from loratui.exporters.reference import chat_template
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import ExportRefused, LoratuiError
from loratui.pipeline.estimate.disk import gguf_bytes_per_weight
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
    started = time.monotonic()
    kind = cfg.export.gguf_lora_type
    adapter, model_dir = checked_source(cfg, run, events)
    out = run.exports / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    params = make_room(out, model_dir, gguf_bytes_per_weight(kind), f"the {kind} base plus the adapter", adapter_bytes)
    log = out / "convert-lora.log"
    log.write_text("", encoding="utf-8")
    job = ExportJob(cfg, run, events, should_stop)
    lora = _LoraExport.start(job, out, model_dir, log)
    rows, adapter_params = lora.write(adapter, params)
    ref, files = lora.ref, lora.files
    ExportReport(
        merged_perplexity=ref.perplexity,
        samples=len(ref.examples),
        params=params,
        adapter_params=adapter_params,
        adapter=str(adapter),
        files=[{**asdict(r), "replies": lora.replies.get(k, [])} for k, r in zip(("base", "lora"), rows)],
    ).save(out / LORA_REPORT)
    usage = [
        f"Use: `llama-cli -m {files.base_final.name} --lora {files.lora_final.name}` (any GGUF of the same base "
        "works, quantized ones too); bits/weight of the adapter row: per adapter parameter.",
        "",
    ]
    write_report_section(run, TITLE, usage + gguf_table(rows, ref.perplexity, len(ref.examples)))
    return {
        "path": str(out),
        "files": [files.base_final.name, files.lora_final.name],
        "merged_perplexity": ref.perplexity,
        "rows": [asdict(r) for r in rows],
        "seconds": round(time.monotonic() - started, 2),
    }


def checked_source(cfg: RunConfig, run: RunDir, events: EventSink) -> tuple[Path, Path]:
    """The adapter and its base's folder, once llama.cpp is known to be able to apply that adapter to
    that base: one LoRA on a local, unquantized, decoder-only base it was trained on."""
    from loratui.pipeline.merge.source import refuse_quantized, resolve_source
    from loratui.pipeline.models import resolve_model
    from loratui.pipeline.train.history import check_adapter_base

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
    require_causal(model_dir, cfg.model.trust_remote_code)
    refuse_quantized(model_dir)
    return source.adapter, model_dir


@dataclass(frozen=True)
class _Files:
    """The LoRA export's files: the staged base folder, and the base and adapter GGUFs (temporary, final)."""

    stage: Path
    base_tmp: Path
    lora_tmp: Path
    base_final: Path
    lora_final: Path

    @classmethod
    def of(cls, out: Path, stem: str, kind: str) -> _Files:
        return cls(
            out / f".{stem}-base-stage.tmp",
            out / f".{stem}-base-{kind}.gguf.tmp",
            out / f".{stem}-lora-{kind}.gguf.tmp",
            out / f"{stem}-base-{kind}.gguf",
            out / f"{stem}-lora-{kind}.gguf",
        )


@dataclass
class _LoraExport:
    """One LoRA GGUF export: its inputs, its files, and the replies of the verified rows."""

    job: ExportJob
    out: Path
    model_dir: Path
    log: Path
    tokenizer: Any
    template: Any
    ref: Reference
    files: _Files
    replies: dict[str, list[dict[str, Any]]]

    @classmethod
    def start(cls, job: ExportJob, out: Path, model_dir: Path, log: Path) -> _LoraExport:
        """Loads the tokenizer and, when export.verify, the merged model's reference figures."""
        from loratui.pipeline.merge.source import tokenizer_for

        cfg, events = job.cfg, job.events
        tokenizer = tokenizer_for(cfg, job.run, model_dir, "causal", events)
        template = chat_template(cfg, events)
        ref = Reference()
        if cfg.export.verify:
            ensure_merged(cfg, job.run, events, job.should_stop)
            ref = Reference.build(job, tokenizer, template, [cfg.export.gguf_lora_type])
        files = _Files.of(out, cfg.name, cfg.export.gguf_lora_type)
        return cls(job, out, model_dir, log, tokenizer, template, ref, files, {})

    def write(self, adapter: Path, params: int) -> tuple[list[GgufRow], int]:
        """Converts the base and the adapter, verifies them when export.verify, and renames both; returns
        their rows and the adapter's parameter count."""
        cfg, kind, files = self.job.cfg, self.job.cfg.export.gguf_lora_type, self.files
        step = Stages(self.job.events, 4 if cfg.export.verify else 2, "gguf-lora", "stages", self.job.should_stop)
        try:
            self._convert(step, adapter, kind)
            adapter_params = count_params(adapter)
            base_bytes = files.base_tmp.stat().st_size
            base_row = GgufRow.unverified(
                f"base {kind}", files.base_final.name, base_bytes, 8 * base_bytes / max(params, 1)
            )
            lora_bytes = files.lora_tmp.stat().st_size
            lora_row = GgufRow.unverified(
                f"base {kind} + LoRA {kind}",
                files.lora_final.name,
                lora_bytes,
                8 * lora_bytes / max(adapter_params, 1),
            )
            if cfg.export.verify:
                base_row, lora_row = self._verify(step, base_row, lora_row, kind)
            step.finish("verified" if cfg.export.verify else "written")
            self._publish(kind)
        finally:
            files.base_tmp.unlink(missing_ok=True)
            files.lora_tmp.unlink(missing_ok=True)
            shutil.rmtree(files.stage, ignore_errors=True)
        return [base_row, lora_row], adapter_params

    def _convert(self, step: Stages, adapter: Path, kind: str) -> None:
        files, stem, should_stop = self.files, self.job.cfg.name, self.job.should_stop
        step(f"converting the base to {kind}")
        stage_base(self.model_dir, self.tokenizer, files.stage)
        pre = recorded_pre(self.job.cfg)
        convert(
            files.stage,
            files.base_tmp,
            kind,
            self.log,
            pre,
            should_stop,
            f"{stem}-base",
            f"converting the base to {kind}",
        )
        step(f"converting the adapter to a {kind} LoRA GGUF")
        run_converter(
            "convert_lora_entry.py",
            [str(adapter.resolve()), str(files.stage.resolve()), str(files.lora_tmp.resolve()), kind, f"{stem}-lora"],
            self.log,
            should_stop,
            "converting the adapter",
        )

    def _verify(self, step: Stages, base_row: GgufRow, lora_row: GgufRow, kind: str) -> tuple[GgufRow, GgufRow]:
        """The base alone (measured), then the base with the adapter (judged as ``kind``). A refused adapter
        leaves its figures in exports/report.md and raises."""
        files, ref = self.files, self.ref
        step("measuring the base alone in llama.cpp")
        base_row, self.replies["base"] = verify_row(
            base_row, files.base_tmp, files.base_final.name, ref, self.tokenizer, self.job, judged_as=""
        )
        step("verifying the base + adapter in llama.cpp")
        try:
            lora_row, self.replies["lora"] = verify_row(
                lora_row,
                files.base_tmp,
                files.lora_final.name,
                ref,
                self.tokenizer,
                self.job,
                lora=files.lora_tmp,
                judged_as=kind,
            )
        except ExportRefused as e:  # nothing is written; the figures and the reason stay in the report
            write_report_section(self.job.run, TITLE, gguf_table([base_row, e.row], ref.perplexity, len(ref.examples)))
            raise
        return base_row, lora_row

    def _publish(self, kind: str) -> None:
        """Both files under their final names, and the Modelfile that applies the adapter if asked for."""
        from loratui.exporters import ollama

        files, events = self.files, self.job.events
        os.replace(files.base_tmp, files.base_final)
        os.replace(files.lora_tmp, files.lora_final)
        events.artifact(files.base_final, kind=f"gguf-base-{kind}")
        events.artifact(files.lora_final, kind=f"gguf-lora-{kind}")
        if self.job.cfg.export.ollama_modelfile:
            modelfile = self.out / f"{self.job.cfg.name}-lora.Modelfile"
            text = ollama.modelfile(
                files.base_final.name,
                self.template,
                ollama.stop_tokens(self.tokenizer, self.template),
                adapter=files.lora_final.name,
                file_name=modelfile.name,
            )
            atomic_write_text(modelfile, text)
            events.artifact(modelfile, kind="ollama-modelfile")
