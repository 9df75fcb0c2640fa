"""ONNX for onnxruntime: the merged model exported by optimum (optimum-onnx), optionally quantized to
int8, and each file verified in onnxruntime against the merged model in PyTorch.

```
runs/<name>/exports/onnx/        model.onnx (+ model.onnx_data past 2 GB), config, generation config, tokenizer
runs/<name>/exports/onnx-int8/   the same with int8 weights (export.onnx_int8, --int8)
runs/<name>/exports/onnx/report.json   the verification figures
runs/<name>/exports/report.md          the table (one row per file)
```
Both folders load with no loratui code: ``ORTModelForCausalLM.from_pretrained(dir)`` (or
``ORTModelForSeq2SeqLM`` for encoder-decoder models).

* Export: ``optimum.exporters.onnx.main_export`` in its own process (cancellable; the exporter's
  memory goes with it), task ``text-generation-with-past`` (``text2text-generation-with-past`` for
  encoder-decoder), opset ``export.onnx_opset``. optimum writes the weights as external data when
  the model is over protobuf's 2 GB limit.
* int8: onnxruntime's dynamic quantization through optimum's ``ORTQuantizer`` (weights int8 per
  channel, activations quantized at run time), with the instruction set of this CPU.
* Verification (``export.verify``): on ``export.verify_samples`` test rows, the largest logit
  difference and the teacher-forced top-1 agreement with the merged model, perplexity, greedy
  replies (do they stop, do they hold the key fact), decode and scoring speed. fp32 must keep every
  logit within 1e-3 of the merged model's (the same arithmetic in another summation order differs by
  about 1e-5); otherwise it is refused and nothing of it is written. Its top-1 agreement is reported,
  not required: within 1e-3 only near-ties can flip, and which way they go depends on the CPU's kernels. int8 has
  no target: its row says what it costs in perplexity and what it saves.
* Written to temporary folders beside the final ones and renamed after they pass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from loratui.exporters.common import (Stages, check_disk, clean_stale, count_params, ensure_merged, merged_reference,
                                      run_logged, write_report_section)
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import ExportRefused, LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir, atomic_write_text

TASKS = {"causal": "text-generation-with-past", "seq2seq": "text2text-generation-with-past"}
FP32_MAX_DIFF = 1e-3  # largest |logit difference| allowed for fp32
# int8 is "worth it" when it keeps perplexity within this share of the fp32 export's and agrees this often
INT8_PPL_SHARE, INT8_TOP1 = 0.02, 0.97
TITLE = "ONNX (onnxruntime)"
CARRIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "chat_template.jinja", "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "added_tokens.json")

EXPORT_CODE = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], opset=int(sys.argv[4]), device="cpu",
            do_validation=False, trust_remote_code=sys.argv[5] == "1")
"""
# dynamic int8 for every .onnx of the folder, with the instructions this CPU has
QUANTIZE_CODE = """
import sys
from pathlib import Path
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
flags = set(open("/proc/cpuinfo").read().split()) if Path("/proc/cpuinfo").exists() else set()
# without VNNI, u8 x s8 products can saturate: onnxruntime's advice is 7-bit weights (reduce_range)
if "avx512_vnni" in flags:
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
elif "avx512f" in flags:
    config = AutoQuantizationConfig.avx512(is_static=False, per_channel=True, reduce_range=True)
elif "avx2" in flags:
    config = AutoQuantizationConfig.avx2(is_static=False, per_channel=True, reduce_range=True)
else:
    config = AutoQuantizationConfig.arm64(is_static=False, per_channel=True)
print("int8 config:", config)
for onnx in sorted(Path(sys.argv[1]).glob("*.onnx")):
    external = onnx.with_name(onnx.name + "_data").exists()
    ORTQuantizer.from_pretrained(sys.argv[1], file_name=onnx.name).quantize(
        save_dir=sys.argv[2], quantization_config=config, file_suffix="", use_external_data_format=external)
"""


@dataclass
class OnnxRow:
    type: str
    folder: str
    bytes: int
    max_abs_logit_diff: float | None
    top1_agreement: float | None
    perplexity: float | None
    delta_perplexity: float | None
    key_facts: float | None
    replies_stopped: str | None
    decode_tokens_per_s: float | None
    scoring_rows_per_s: float | None


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".onnx", ".onnx_data", ".data"))


def carry_files(source: Path, dest: Path) -> None:
    """Config, generation config and tokenizer files, so the folder loads on its own."""
    for name in CARRIED:
        if (source / name).is_file() and not (dest / name).exists():
            shutil.copy2(source / name, dest / name)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def timed_decode(model: Any, prompt: list[int], n: int = 64) -> float:
    """Greedy decode tokens/s, batch 1, ``n`` new tokens whatever they are (prompt processing included
    once, as in a chat turn), after a short warm-up."""
    import torch

    ids = torch.tensor([prompt], device=model.device)

    def run(tokens: int) -> int:
        greedy = model._greedy(tokens)
        greedy.min_new_tokens = tokens
        with torch.inference_mode():
            out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=greedy,
                                       use_model_defaults=False)
        return out.shape[1] - (ids.shape[1] if model.task == "causal" else 1)

    run(4)  # warm-up: the first calls allocate and pick kernels
    started = time.perf_counter()
    new = run(n)
    return new / (time.perf_counter() - started)


def compare(reference: Any, candidate: Any, examples: list[Any], should_stop: Any) -> dict[str, Any]:
    """Both models on the same batches: largest |logit difference| on real tokens, top-1 agreement on
    labelled ones, each side's perplexity, and the candidate's scoring rows/s."""
    import torch
    import torch.nn.functional as F

    from loratui.pipeline.evaluate.runtimes import IGNORE

    diff, same, total = 0.0, 0, 0
    nll = {"reference": 0.0, "candidate": 0.0}
    seconds = 0.0
    batches = candidate.forward_batches(examples, should_stop)
    for (batch, ref_logits, target, real) in reference.forward_batches(examples, should_stop):
        started = time.perf_counter()
        _, logits, _, _ = next(batches)
        seconds += time.perf_counter() - started
        ref_logits, logits = ref_logits.float(), logits.float().to(ref_logits.device)
        step = float((ref_logits - logits).abs()[real].max())
        diff = step if not math.isfinite(step) else max(diff, step)  # max(0.0, nan) would be 0.0
        if not math.isfinite(diff):
            break
        counted = target != IGNORE
        same += int((ref_logits.argmax(-1) == logits.argmax(-1))[counted].sum())
        total += int(counted.sum())
        for side, values in (("reference", ref_logits), ("candidate", logits)):
            losses = F.cross_entropy(values.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
            nll[side] += float((losses * counted).sum())
    batches.close()
    ppl = {side: math.exp(v / total) if total else None for side, v in nll.items()}
    return {"max_abs_logit_diff": diff, "top1_agreement": same / total if total else None,
            "perplexity": ppl["candidate"], "reference_perplexity": ppl["reference"],
            "scoring_rows_per_s": len(examples) / seconds if seconds else None}


def replies(model: Any, examples: list[Any], tokenizer: Any, max_new_tokens: int, should_stop: Any) -> dict[str, Any]:
    from loratui.pipeline.evaluate import metrics as M

    prompted = [e for e in examples if e.prompt_ids and e.reference is not None]
    got = model.generate([e.prompt_ids for e in prompted], max_new_tokens, should_stop=should_stop)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in got]
    facts = [M.contains(t, e.fact or e.reference or "") for t, e in zip(texts, prompted)]
    return {"replies_stopped": f"{sum(len(r) < max_new_tokens for r in got)}/{len(got)}" if got else None,
            "key_facts": M.mean(facts) if facts else None,
            "replies": [{"source": e.source, "fact": e.fact, "reply": t, "contains": c}
                        for e, t, c in zip(prompted, texts, facts)]}


# --------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------


def _replace_dir(tmp: Path, final: Path) -> None:
    """``tmp`` becomes ``final``; an older ``final`` is removed only once the new one is in place."""
    old = final.with_name(f".{final.name}.old.tmp")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from loratui.pipeline.data.step import load_model_inputs, model_task
    from loratui.pipeline.evaluate.runtimes import OnnxModel, StopRequested, import_onnxruntime, load_onnx

    import_onnxruntime()  # before any work: the verification and the int8 step need it
    started = time.monotonic()
    ensure_merged(cfg, run, events, should_stop)
    merged = run.merged
    task = model_task(merged, cfg.model.trust_remote_code)
    int8 = cfg.export.onnx_int8
    out, out8 = run.exports / "onnx", run.exports / "onnx-int8"
    run.exports.mkdir(parents=True, exist_ok=True)
    clean_stale(run.exports)
    params = count_params(merged)
    # fp32 weights, the exporter's own copy while it writes, int8 weights
    check_disk(run.exports, params * (4 + 4 + (1 if int8 else 0)), "fp32 ONNX" + (" plus int8" if int8 else ""))
    log = run.exports / "onnx.log"
    log.write_text("", encoding="utf-8")
    tmp, tmp8 = run.exports / ".onnx.tmp", run.exports / ".onnx-int8.tmp"
    stage = Stages(events, 1 + (1 if int8 else 0) + (1 + (1 if int8 else 0) if cfg.export.verify else 0), "onnx",
                   "stages", should_stop)

    rows: list[OnnxRow] = []
    samples: dict[str, list[dict[str, Any]]] = {}
    reference_ppl = torch_decode = None
    n_rows = 0
    try:
        stage(f"exporting with optimum ({TASKS[task]}, opset {cfg.export.onnx_opset}) - minutes for large models")
        run_logged([sys.executable, "-c", EXPORT_CODE, str(merged), str(tmp), TASKS[task], str(cfg.export.onnx_opset),
                    "1" if cfg.model.trust_remote_code else "0"], dict(os.environ), log, should_stop,
                   what="exporting to ONNX")
        carry_files(merged, tmp)
        variants = [("fp32", tmp, out)]
        if int8:
            stage("quantizing to int8 (dynamic)")
            tmp8.mkdir()
            run_logged([sys.executable, "-c", QUANTIZE_CODE, str(tmp), str(tmp8)], dict(os.environ), log, should_stop,
                       what="quantizing the ONNX model to int8")
            carry_files(tmp, tmp8)
            variants.append(("int8", tmp8, out8))
        for kind, folder, final in variants:
            rows.append(OnnxRow(kind, final.name, folder_bytes(folder), None, None, None, None, None, None, None, None))
        if cfg.export.verify:
            tokenizer = AutoTokenizer.from_pretrained(str(merged), trust_remote_code=cfg.model.trust_remote_code)
            examples, stop, reference = merged_reference(cfg, run, tokenizer, load_model_inputs(cfg, events).template,
                                                         events, should_stop, task)
            n_rows = len(examples)
            pad = reference.pad_id
            prompt = next((e.prompt_ids for e in examples if e.prompt_ids), examples[0].input_ids[:16])
            torch_decode = timed_decode(reference, prompt)
            for i, (kind, folder, final) in enumerate(variants):
                stage(f"verifying {kind} in onnxruntime")
                candidate = OnnxModel(load_onnx(folder, task), name=kind, task=task, pad_id=pad, stop_ids=stop)
                try:
                    figures = compare(reference, candidate, examples, should_stop)
                    said = replies(candidate, examples, tokenizer, cfg.eval.max_new_tokens, should_stop)
                    decode = timed_decode(candidate, prompt)
                except StopRequested:
                    raise StepCancelled(f"cancelled while verifying {kind}; nothing was written") from None
                reference_ppl = figures.pop("reference_perplexity")
                samples[kind] = said.pop("replies")
                ppl = figures["perplexity"]
                rows[i] = OnnxRow(**{**asdict(rows[i]), **figures, **said, "decode_tokens_per_s": decode,
                                     "delta_perplexity": ppl - reference_ppl if ppl and reference_ppl else None})
                events.metric({k: float(v) for k, v in asdict(rows[i]).items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None},
                              split=f"onnx:{kind}")
                if kind == "fp32":
                    _check_fp32(rows[i], lambda: write_report_section(
                        run, TITLE, onnx_table(rows[:1], reference_ppl, torch_decode, n_rows)))
                del candidate
        stage.finish("verified" if cfg.export.verify else "written")
        for kind, folder, final in variants:
            _replace_dir(folder, final)
            events.artifact(final, kind=f"onnx-{kind}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp8, ignore_errors=True)

    report = {"task": TASKS[task], "opset": cfg.export.onnx_opset, "merged_perplexity": reference_ppl,
              "merged_decode_tokens_per_s": torch_decode, "params": params,
              "files": [{**asdict(r), "replies": samples.get(r.type, [])} for r in rows]}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_report_section(run, TITLE, onnx_table(rows, reference_ppl, torch_decode, n_rows))
    return {"path": str(out), "folders": [r.folder for r in rows], "rows": [asdict(r) for r in rows],
            "merged_perplexity": reference_ppl, "seconds": round(time.monotonic() - started, 2)}


def _figure(value: float | None, fmt: str) -> str:
    return "not measured" if value is None else format(value, fmt) if math.isfinite(value) else str(value)


def _check_fp32(row: OnnxRow, report: Callable[[], None]) -> None:
    """Refuse an fp32 export that does not compute what the merged model computes (``report`` first writes
    its row, so the refusal keeps its figures)."""
    if not (row.max_abs_logit_diff is not None and math.isfinite(row.max_abs_logit_diff)
            and row.max_abs_logit_diff <= FP32_MAX_DIFF):
        report()
        raise ExportRefused(
            f"the fp32 ONNX export differs from the merged model: largest logit difference "
            f"{_figure(row.max_abs_logit_diff, '.2e')} (at most {FP32_MAX_DIFF:.0e}), top-1 agreement "
            f"{_figure(row.top1_agreement, '.2%')}; "
            "nothing was written",
            hint="See exports/onnx.log; try another export.onnx_opset, and report it with the model.")


def int8_verdict(fp32: OnnxRow, int8: OnnxRow) -> str:
    """Whether int8 is worth it for this model, by the figures in its row."""
    if None in (fp32.perplexity, int8.perplexity, int8.top1_agreement):
        return "int8: not verified (export.verify is off)."
    share = (int8.perplexity - fp32.perplexity) / fp32.perplexity
    size = fp32.bytes / max(int8.bytes, 1)
    speed = (int8.scoring_rows_per_s or 0) / (fp32.scoring_rows_per_s or 1)
    worth = share <= INT8_PPL_SHARE and int8.top1_agreement >= INT8_TOP1
    return (f"int8 against fp32: perplexity {share:+.1%}, top-1 agreement {int8.top1_agreement:.1%}, {size:.1f}x smaller, "
            f"scoring {speed:.2f}x. " + ("Worth it for this model" if worth else "Not worth it for this model")
            + f" (the bar: perplexity within +{INT8_PPL_SHARE:.0%} and top-1 agreement >= {INT8_TOP1:.0%}).")


def onnx_table(rows: list[OnnxRow], ref_ppl: float | None, torch_decode: float | None, samples: int) -> list[str]:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"Verified in onnxruntime on {samples} test rows against the merged model in PyTorch fp32 "
             f"(perplexity {f(ref_ppl, '.3f')}, decode {f(torch_decode, '.1f')} tok/s). Max diff: largest |logit "
             "difference|. Top-1: teacher-forced next-token agreement. Scoring: rows/s of the teacher-forced pass.", "",
             "| type | folder | size | max diff | top-1 | perplexity | delta | key facts | replies stop | decode tok/s "
             "| scoring rows/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.type} | {r.folder}/ | {r.bytes / 2**20:.1f} MiB | {f(r.max_abs_logit_diff, '.2e')} | "
                     f"{'-' if r.top1_agreement is None else f'{r.top1_agreement:.1%}'} | {f(r.perplexity, '.3f')} | "
                     f"{f(r.delta_perplexity, '+.3f')} | {f(r.key_facts, '.3f')} | {r.replies_stopped or '-'} | "
                     f"{f(r.decode_tokens_per_s, '.1f')} | {f(r.scoring_rows_per_s, '.1f')} |")
    if len(rows) == 2:
        lines += ["", int8_verdict(rows[0], rows[1])]
    return lines
