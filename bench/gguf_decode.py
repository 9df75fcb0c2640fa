"""Decode speed: the GGUF exports in llama.cpp against the merged model in transformers, same prompts, one run.

For every model: greedy decoding of ``--tokens`` new tokens after each of ``--prompts`` chat prompts
from the run's test split, stop tokens ignored so every model decodes the same count. Decode
tokens/s excludes the prompt: transformers is timed at N and at 1 new tokens and the difference is
taken; llama.cpp is timed from its first generated token. The memory-bandwidth bound is the
measured copy bandwidth divided by the bytes of weights each token has to read (the file size).

    loratui train/merge/export --format gguf --quant q4_k_m,q8_0 --config examples/quickstart.yaml
    .venv/bin/python bench/gguf_decode.py [--run runs/quickstart] [--tokens 64] [--prompts 4]

Target: llama.cpp q4_k_m >= 3x transformers fp32 decode tokens/s on this CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s moved by a large memory copy (read + write), the best of ``repeats``."""
    src = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def prompts_of(run: Path, n: int) -> list[list[int]]:
    import json

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    manifest = json.loads((run / "data" / "dataset.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(run / "merged"))
    rows = load_from_disk(str(run / "data" / manifest["splits"].get("test", manifest["splits"]["train"])))
    out = []
    for row in rows.select(range(min(n, len(rows)))):
        messages = json.loads(row["messages"])[:-1]
        out.append(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
    return [list(p) for p in out]


def transformers_decode(merged: Path, prompts: list[list[int]], tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()

    def run(n: int, ids: list[int]) -> float:
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                use_cache=True,
            )
        return time.perf_counter() - t

    run(4, prompts[0])  # warm-up
    decode = sum(run(tokens, p) - run(1, p) for p in prompts)
    return (tokens - 1) * len(prompts) / decode


def llama_decode(path: Path, prompts: list[list[int]], tokens: int) -> float:
    """Mean over the prompts of loratui's own decode measurement (the one in exports/report.md)."""
    from loratui.exporters.gguf import decode_speed
    from loratui.pipeline.eval.runtimes import LlamaCppModel

    model = LlamaCppModel(path, name=path.name, stop_ids=set(), n_ctx=1024)
    try:
        decode_speed(model, prompts[0], tokens)  # warm-up
        return sum(decode_speed(model, p, tokens) for p in prompts) / len(prompts)
    finally:
        model.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4)
    add_json_arg(ap)
    args = ap.parse_args()
    run = Path(args.run)
    name = run.name
    ggufs = {q: run / "exports" / "gguf" / f"{name}-{q}.gguf" for q in ("q4_k_m", "q8_0")}
    missing = [str(p) for p in [run / "merged" / "config.json", *ggufs.values()] if not p.is_file()]
    if missing:
        print(
            f"missing: {', '.join(missing)}\nrun: loratui export --format gguf --quant q4_k_m,q8_0 "
            f"--config <the run's config>",
            file=sys.stderr,
        )
        return 2
    started = time.time()
    bandwidth = copy_bandwidth()
    prompts = prompts_of(run, args.prompts)
    merged_bytes = sum(p.stat().st_size for p in (run / "merged").glob("*.safetensors"))
    rows = [("transformers fp32 (merged)", merged_bytes, transformers_decode(run / "merged", prompts, args.tokens))]
    for q, path in ggufs.items():
        rows.append((f"llama.cpp {q}", path.stat().st_size, llama_decode(path, prompts, args.tokens)))
    base = rows[0][2]
    print(
        f"decode, {name}: {len(prompts)} prompts x {args.tokens} new tokens, greedy; {platform.machine()} "
        f"{os.cpu_count()} CPUs; copy bandwidth {bandwidth / 1e9:.1f} GB/s ({time.time() - started:.0f}s)"
    )
    print(f"{'model':<28} {'weights MiB':>11} {'tok/s':>8} {'vs fp32':>8} {'bound tok/s':>11} {'of bound':>8}")
    for label, size, rate in rows:
        bound = bandwidth / size
        print(
            f"{label:<28} {size / 2**20:>11.1f} {rate:>8.1f} {rate / base:>7.2f}x {bound:>11.1f} {rate / bound:>7.0%}"
        )
    ratio = rows[1][2] / base
    print(f"target: llama.cpp q4_k_m >= 3x transformers fp32: {'met' if ratio >= 3 else 'NOT met'} ({ratio:.2f}x)")
    record(
        args.json,
        "gguf_decode",
        "decode tok/s, llama.cpp q4_k_m",
        f"{rows[1][2]:.1f} tok/s",
        f"transformers fp32 {base:.1f} tok/s",
        ratio,
        ">= 3x",
        ratio >= 3,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
