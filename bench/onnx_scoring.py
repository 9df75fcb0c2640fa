"""Batch scoring speed: the ONNX exports in onnxruntime (fp32, int4, int8) against the merged model in
PyTorch eager, on the same 2,000 rows in the same batches, in one run.

Rows: the quickstart data (every split, question and answer as one text), repeated with a row
number until there are ``--rows``. Each backend scores them with ``loratui score``'s code path
(shortest first, ``--batch-size`` rows per batch), after one warm-up batch, on every core. The
table gives sequences/s, the ratio to PyTorch, and the mean log-likelihood per token and its
perplexity, so a quantized model's speed is read beside what it costs. A quantized folder the
export refused (below its top-1 bar, so not in exports/) is built here into a temporary folder by
the exporter's own call, so its figures are still measured.

    loratui train/merge --config examples/quickstart.yaml
    loratui export --format onnx --onnx-quant int4,int8 --config examples/quickstart.yaml
    .venv/bin/python bench/onnx_scoring.py [--run runs/quickstart] [--rows 2000] [--batch-size 16]

Target: onnxruntime fp32 >= 1.3x PyTorch sequences/s on this CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path


def quant_folder(run: Path, merged: Path, quant: str, scratch: Path) -> tuple[Path, str]:
    """exports/onnx-<quant>/, or the same built here when the export did not keep it (its label says so)."""
    kept = run / "exports" / f"onnx-{quant}"
    if (kept / "genai_config.json").is_file():
        return kept, ""
    from loratui.exporters.onnx import build

    out = scratch / f"onnx-{quant}"
    build(merged, out, quant, scratch / "build.log", lambda: False, False)
    return out, " (built here: the export refused it)"


def rows_of(data: Path, n: int) -> list[str]:
    texts = []
    for split in ("train", "validation", "test"):
        for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts.append(f"{row['question']} {row['answer']}")
    return [f"{texts[i % len(texts)]} (row {i})" for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/quickstart", help="run directory with merged/ and exports/onnx*/")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    add_json_arg(parser)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from loratui.pipeline.eval.runtimes import Example, OnnxModel, TorchModel, load_onnx, load_torch

    run = Path(args.run)
    merged, onnx = run / "merged", run / "exports" / "onnx"
    for path in (merged, onnx):
        if not path.is_dir():
            raise SystemExit(f"{path} is missing: run `loratui export --format onnx --config <the run's config>`")
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    texts = rows_of(Path(__file__).resolve().parents[1] / "loratui" / "data" / "quickstart", args.rows)
    examples = [Example(input_ids=ids, labels=ids) for ids in tokenizer(texts)["input_ids"]]
    tokens = sum(len(e.input_ids) for e in examples)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    common = {
        "task": "causal",
        "pad_id": pad,
        "stop_ids": set(),
        "batch_size": args.batch_size,
        "token_budget": max(4096, args.batch_size * 256),
    }
    scratch = tempfile.TemporaryDirectory(prefix="onnx-bench-")
    backends = [
        (
            "PyTorch eager fp32 (merged)",
            lambda: TorchModel(load_torch(merged, "causal", "cpu", "fp32"), name="torch", **common),
        ),
        ("onnxruntime fp32", lambda: OnnxModel(load_onnx(onnx), name="fp32", **common)),
    ]
    for quant in ("int4", "int8"):
        folder, label = quant_folder(run, merged, quant, Path(scratch.name))
        backends.append(
            (f"onnxruntime {quant}{label}", lambda f=folder, q=quant: OnnxModel(load_onnx(f), name=q, **common))
        )
    print(
        f"# {len(examples)} rows, {tokens} tokens, batch {args.batch_size}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    results = []
    for label, build in backends:
        model = build()
        model.token_logprobs(examples[: args.batch_size])  # warm-up
        started = time.perf_counter()
        logps = model.token_logprobs(examples)
        seconds = time.perf_counter() - started
        total = sum(sum(lp) for lp in logps)
        count = sum(len(lp) for lp in logps)
        results.append((label, len(examples) / seconds, total / count, seconds))
        print(f"{label}: {seconds:.1f} s", flush=True)
        del model
    base = results[0][1]
    fp32_ll = results[1][2]
    print("\n| backend | sequences/s | vs PyTorch | mean log-likelihood/token | perplexity | vs ORT fp32 perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rate, mean_ll, _ in results:
        print(
            f"| {label} | {rate:.1f} | {rate / base:.2f}x | {mean_ll:.4f} | {math.exp(-mean_ll):.3f} | "
            f"{math.exp(-mean_ll) / math.exp(-fp32_ll) - 1:+.2%} |"
        )
    ratio = results[1][1] / base
    record(
        args.json,
        "onnx_scoring",
        "scoring sequences/s, onnxruntime fp32",
        f"{results[1][1]:.1f} seq/s",
        f"PyTorch eager fp32 {base:.1f} seq/s",
        ratio,
        ">= 1.3x",
        ratio >= 1.3,
    )
    for label, rate, mean_ll, _ in results[2:]:
        print(
            f"{label}: {rate / base:.2f}x PyTorch, perplexity {math.exp(-mean_ll) / math.exp(-fp32_ll) - 1:+.2%} "
            "against ORT fp32"
        )
    scratch.cleanup()


if __name__ == "__main__":
    main()
