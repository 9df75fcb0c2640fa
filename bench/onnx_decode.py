"""Decode speed and agreement of the quantized ONNX exports: onnxruntime-genai int4 and int8 against the
fp32 ONNX export (and PyTorch eager), same prompts, one run.

Decode: greedy, batch 1, ``--tokens`` new tokens after each of ``--prompts`` chat prompts from the run's
test split (stop tokens ignored, so every model decodes the same count; the prompt is processed once,
as in a chat turn), through onnxruntime-genai's own generation loop; PyTorch through transformers'
generate. Agreement: teacher-forced top-1 against the merged model in PyTorch fp32 on the labelled
(reply) tokens of the test split, the export check's own figure, with the perplexity delta. A quantized
folder the export refused (not in exports/) is built here by the exporter's own call.

    loratui export --format onnx --onnx-quant int4,int8 --config examples/quickstart.yaml
    .venv/bin/python bench/onnx_decode.py [--run runs/quickstart] [--tokens 64] [--prompts 4]

Targets: int4 decode >= 2x the fp32 ONNX export's tokens/s (decode reads every weight once per token:
memory-bound), with top-1 agreement >= 97%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path
from gguf_decode import prompts_of
from onnx_scoring import quant_folder


def test_rows(run: Path, n: int) -> list:
    from datasets import load_from_disk

    from loratui.pipeline.eval.runtimes import Example

    manifest = json.loads((run / "data" / "dataset.json").read_text())
    rows = load_from_disk(str(run / "data" / manifest["splits"].get("test", manifest["splits"]["train"])))
    return [
        Example(input_ids=list(r["input_ids"]), labels=list(r["labels"])) for r in rows.select(range(min(n, len(rows))))
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--rows", type=int, default=64, help="test rows for the agreement figures")
    add_json_arg(ap)
    args = ap.parse_args()

    import torch

    from loratui.exporters.onnx import compare, timed_decode
    from loratui.pipeline.eval.runtimes import OnnxModel, TorchModel, load_onnx, load_torch

    run = Path(args.run)
    merged, onnx = run / "merged", run / "exports" / "onnx"
    if not (onnx / "genai_config.json").is_file():
        print(f"missing: {onnx}\nrun: loratui export --format onnx --config <the run's config>", file=sys.stderr)
        return 2
    started = time.time()
    prompts = prompts_of(run, args.prompts)
    examples = test_rows(run, args.rows)
    scratch = tempfile.TemporaryDirectory(prefix="onnx-decode-")
    common = {"pad_id": 0, "stop_ids": set()}
    reference = TorchModel(load_torch(merged, "causal", "cpu", "fp32"), name="merged", task="causal", **common)
    folders = {"fp32": (onnx, "")}
    for quant in ("int4", "int8"):
        folders[quant] = quant_folder(run, merged, quant, Path(scratch.name))

    def decode(model: object) -> float:
        return sum(timed_decode(model, p, args.tokens) for p in prompts) / len(prompts)

    rows = [("PyTorch eager fp32 (merged)", None, decode(reference), None, None)]
    for kind, (folder, label) in folders.items():
        model = OnnxModel(load_onnx(folder), name=kind, **common)
        figures = compare(reference, model, examples, lambda: False)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".onnx" or p.name.endswith(".data"))
        rows.append(
            (
                f"onnxruntime-genai {kind}{label}",
                size,
                decode(model),
                figures["top1_agreement"],
                figures["perplexity"] / figures["reference_perplexity"] - 1,
            )
        )
        del model
    scratch.cleanup()
    print(
        f"decode, {run.name}: {len(prompts)} prompts x {args.tokens} new tokens, greedy, batch 1; agreement on "
        f"{len(examples)} test rows; {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({time.time() - started:.0f}s)"
    )
    fp32 = rows[1][2]
    print("\n| model | weights MiB | decode tok/s | vs ONNX fp32 | top-1 agreement | perplexity delta |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, size, rate, top1, ppl in rows:
        print(
            f"| {label} | {'-' if size is None else f'{size / 2**20:.1f}'} | {rate:.1f} | {rate / fp32:.2f}x | "
            f"{'-' if top1 is None else f'{top1:.1%}'} | {'-' if ppl is None else f'{ppl:+.2%}'} |"
        )
    for label, _size, rate, top1, _ppl in rows[2:]:
        kind = label.split()[1]
        ratio = rate / fp32
        met = ratio >= 2 and top1 >= 0.97
        print(
            f"target {kind}: decode >= 2x ONNX fp32 and top-1 >= 97%: {'met' if met else 'NOT met'} "
            f"({ratio:.2f}x, {top1:.1%})"
        )
        record(
            args.json,
            "onnx_decode",
            f"decode tok/s and top-1, onnxruntime-genai {kind}",
            f"{rate:.1f} tok/s, top-1 {top1:.1%}",
            f"ONNX fp32 {fp32:.1f} tok/s",
            ratio,
            ">= 2x and top-1 >= 97%",
            met,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
