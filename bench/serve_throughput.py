"""Serving throughput: aggregate generated tokens/s and time to first token at 1, 8 and 32 concurrent
streaming clients, for each backend of `loratui serve` on one run, in one run of this script; plus each
runtime alone on the same files and prompts, one request at a time: bare llama-cpp-python (``Llama.generate``)
on the GGUF, and bare onnxruntime-genai (the export's own ``og.Generator``) on the ONNX folder.

Each backend runs as a real server (`loratui serve <run> --format F`, a subprocess on loopback).
Every client sends ``--requests`` streaming chat requests one after another (prompts: the run's test
questions, greedy, up to ``--max-tokens``); the level's aggregate is all completion tokens (from
``usage``) over the level's wall time. TTFT: request sent -> first content chunk, p50 / p95 over all
requests of the level. This VM's speed drifts by tens of percent over minutes, so every level runs
``--rounds`` times and each ratio is taken within a round (a level against the 1-client level of the same
round; a bare runtime right after its backend's levels, the server idle).

    loratui train/merge/export --format gguf,onnx --config examples/quickstart.yaml
    .venv/bin/python bench/serve_throughput.py [--run runs/quickstart] [--formats gguf,torch,onnx] [--rounds 3]
    make vllm && .venv/bin/python bench/serve_throughput.py --formats torch,vllm --levels 1,8,32 --max-batch-size 32
    .venv/bin/python bench/serve_throughput.py --profile-llama   # llama.cpp decode step time by rows, threads
    .venv/bin/python bench/serve_throughput.py --profile-llama --gguf a-q8_0.gguf,a-q4_k_m.gguf   # by file

`vllm` in --formats is `loratui serve --engine vllm` (vLLM in .venv-vllm behind loratui's API); with the PyTorch
backend in the same run, the ratio of the two is printed per level.

Targets on this CPU: PyTorch and the llama.cpp backend at 8 clients >= 3x their 1-client aggregate;
llama.cpp backend at 1 client >= 80% of bare llama-cpp-python tokens/s (and the ONNX backend against
bare onnxruntime-genai, measured the same way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path


def questions(run: Path, n: int) -> list[str]:
    manifest = json.loads((run / "data" / "dataset.json").read_text())
    from datasets import load_from_disk

    rows = load_from_disk(str(run / "data" / manifest["splits"].get("test", manifest["splits"]["train"])))
    out = []
    for row in rows.select(range(min(n, len(rows)))):
        messages = json.loads(row["messages"])
        out.append(next(m["content"] for m in messages if m["role"] == "user"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config(run: Path, max_batch_size: int | None) -> list[str]:
    """``--config`` for the server: the run's own, with ``serve.max_batch_size`` raised when asked."""
    if max_batch_size is None:
        return []
    import tempfile

    import yaml

    data = yaml.safe_load((run / "config.yaml").read_text())
    data.setdefault("serve", {})["max_batch_size"] = max_batch_size
    data["serve"]["fine_tuning"] = False  # the jobs API is not measured (with vLLM it would also turn on LoRA)
    path = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return ["--config", str(path)]


def start(run: Path, fmt: str, max_batch_size: int | None = None) -> tuple[subprocess.Popen, str, str]:
    """``fmt``: a --format for loratui's own backends, or ``vllm`` for --engine vllm (its own environment)."""
    port = free_port()
    engine = ["--engine", "vllm"] if fmt == "vllm" else ["--format", fmt]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratui", "serve", str(run), *engine, "--port", str(port)]
        + serve_config(run, max_batch_size),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # vLLM takes minutes to start on 2 cores
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"loratui serve --format {fmt} exited: {proc.stderr.read()[-2000:]}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return proc, url, r.json()["model"]
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"loratui serve --format {fmt} did not get ready")


def one(client: httpx.Client, url: str, model: str, question: str, max_tokens: int) -> tuple[float | None, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    ttft, tokens = None, 0
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


def level(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    ttfts: list[float] = []
    total = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        # one connection per client, kept alive, as the openai SDK does (an httpx.Client per request
        # would cost ~30 ms of CPU each here, building its TLS context, and count against the server)
        with httpx.Client() as http:
            for k in range(requests):
                ttft, tokens = one(http, url, model, prompts[(c * requests + k) % len(prompts)], max_tokens)
                with lock:
                    total[0] += tokens
                    if ttft is not None:
                        ttfts.append(ttft)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - started
    ttfts.sort()
    return {
        "clients": clients,
        "tokens": total[0],
        "seconds": wall,
        "tok_s": total[0] / wall,
        "p50": statistics.median(ttfts) if ttfts else None,
        "p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
    }


def chat_ids(backend, prompts: list[str]) -> list[list[int]]:
    return [backend.chat_prompt([{"role": "user", "content": q}]) for q in prompts]


def timed(
    tokens_of: Callable[[list[int]], Iterator[int]], prompts: list[list[int]], stop_ids: set[int], max_tokens: int
) -> float:
    """tokens/s of one request at a time (prompt processing included), after one warm-up request, as the
    server gets."""
    tokens, seconds = 0, 0.0
    for k, ids in enumerate([prompts[0], *prompts]):
        started = time.perf_counter()
        gen = tokens_of(ids)
        n = 0
        for t in gen:
            if t in stop_ids:
                break
            n += 1
            if n >= (4 if k == 0 else max_tokens):
                break
        gen.close()  # type: ignore[attr-defined]
        if k:
            seconds += time.perf_counter() - started
            tokens += n
    return tokens / seconds


def bare_llama_cpp(gguf: Path, prompts: list[str], max_tokens: int) -> float:
    """llama-cpp-python alone: same GGUF, same chat prompts, greedy, same stop tokens as the server; the
    high-level ``Llama`` as the backend used it before it batched (one context, all cores)."""
    import llama_cpp

    from loratui.serving.backends import LlamaCppBackend

    backend = LlamaCppBackend(gguf, "bare", 2048, max_batch_size=1)  # only its prompts and stop ids
    ids, stop_ids = chat_ids(backend, prompts), backend.stop_ids
    backend.close()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    try:
        return timed(
            lambda p: llm.generate(p, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True),
            ids,
            stop_ids,
            max_tokens,
        )
    finally:
        llm.close()


def bare_onnxruntime_genai(folder: Path, prompts: list[str], max_tokens: int) -> float:
    """onnxruntime-genai alone: the export's own generator (``og.Generator``), same chat prompts (the
    folder's tokenizer and template, as the server's), greedy, the same stop tokens, one request at a time."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    from loratui.pipeline.eval.ort import genai_config
    from loratui.serving.backends.hf import HFBase

    eos = genai_config(folder)["model"].get("eos_token_id")
    side = HFBase()
    side._setup_tokenizer(AutoTokenizer.from_pretrained(str(folder)), eos)
    model = og.Model(str(folder))

    def tokens_of(ids: list[int]) -> Iterator[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False, batch_size=1)
        generator = og.Generator(model, params)
        try:
            generator.append_tokens([ids])
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])
        finally:
            del generator

    return timed(tokens_of, chat_ids(side, prompts), side.stop_ids, max_tokens)


def drive(backend, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> tuple[float, int, list, dict]:
    """``clients`` threads send ``per_client`` greedy requests each to an in-process llama.cpp backend:
    wall seconds, answer tokens, the batcher's (rows, tokens, seconds) per ``llama_decode``, and each
    prompt's reply (by prompt index)."""
    from loratui.serving.backends import GenRequest

    ids = chat_ids(backend, prompts)
    done = [0]
    replies: dict[int, str] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(per_client):
            i = (c * per_client + k) % len(ids)
            deltas = list(backend.stream(GenRequest(ids[i], max_tokens, temperature=0)))
            with lock:
                done[0] += deltas[-1].completion_tokens
                replies.setdefault(i, "".join(d.text for d in deltas))

    backend.batcher.profile = []
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    calls, backend.batcher.profile = backend.batcher.profile, None
    return time.perf_counter() - started, done[0], calls, replies


def step_ms(calls: list, rows: int) -> float:
    """Median milliseconds of the decode steps that ran ``rows`` rows of one token each."""
    return 1000 * statistics.median(s for r, n, s in calls if r == n == rows)


def profile_files(files: list[Path], prompts: list[str], max_tokens: int) -> None:
    """Per GGUF file (other quantization types of the same model): a decode step of 8 rows against 1, and
    whether 8 greedy requests at once get the replies each gets alone."""
    from loratui.serving.backends import LlamaCppBackend

    print(
        "| file | ms per step, 1 row | 8 rows | tokens/s of the step, 8 rows vs 1 | greedy replies identical alone and 8 at once |"
    )
    print("|---|---:|---:|---:|---:|")
    for path in files:
        ms = {}
        for slots in (1, 8):
            backend = LlamaCppBackend(path, "profile", 2048, max_batch_size=slots)
            try:
                drive(backend, prompts, slots, 1, max_tokens)  # warm-up
                ms[slots] = step_ms(drive(backend, prompts, slots, 2, max_tokens)[2], slots)
                if slots == 8:
                    alone = drive(backend, prompts[:8], 1, 8, max_tokens)[3]
                    together = drive(backend, prompts[:8], 8, 1, max_tokens)[3]
            finally:
                backend.close()
        same = sum(alone[i] == together[i] for i in alone)
        print(
            f"| {path.name} | {ms[1]:.1f} | {ms[8]:.1f} | {8 * ms[1] / ms[8]:.2f}x | {same} of {len(alone)} |",
            flush=True,
        )


def profile_llama(gguf: Path, prompts: list[str], requests: int, max_tokens: int) -> None:
    """The llama.cpp backend in-process, no HTTP: ``llama_decode`` time per decode step by rows and
    threads; then the workload of the bench (1 and 8 clients, ``requests`` each) split into decode
    steps, prompt prefill and the rest."""
    from loratui.serving.backends import LlamaCppBackend

    print("llama_decode time per decode step (every row one token), by rows and threads:\n")
    print("| threads | rows | ms per step | tokens/s of the step | vs 1 row |")
    print("|---:|---:|---:|---:|---:|")
    for threads in sorted({1, os.cpu_count() or 1}):
        one_row = 0.0
        for slots in (1, 2, 4, 8):
            backend = LlamaCppBackend(gguf, "profile", 2048, threads=threads, max_batch_size=slots)
            calls = drive(backend, prompts, slots, 2, max_tokens)[2]
            backend.close()
            ms = step_ms(calls, slots)
            one_row = one_row or ms
            print(
                f"| {threads} | {slots} | {ms:.1f} | {1000 * slots / ms:.0f} | {slots * one_row / ms:.2f}x |",
                flush=True,
            )
    print(f"\nThe bench's workload in-process ({requests} requests per client, all cores):\n")
    print("| clients | tok/s | answer tokens | decode steps: s (mean rows) | prefill: s (calls x tokens) | rest s |")
    print("|---:|---:|---:|---:|---:|---:|")
    backend = LlamaCppBackend(gguf, "profile", 2048, max_batch_size=8)
    try:
        for clients in (1, 8):
            wall, tokens, calls, _replies = drive(backend, prompts, clients, requests, max_tokens)
            steps = [(rows, s) for rows, n, s in calls if rows == n]
            fills = [(n, s) for rows, n, s in calls if rows == 1 and n > 1]
            print(
                f"| {clients} | {tokens / wall:.1f} | {tokens} | {sum(s for _, s in steps):.2f} "
                f"({sum(r for r, _ in steps) / len(steps):.1f}) | {sum(s for _, s in fills):.2f} "
                f"({len(fills)} x {sum(n for n, _ in fills) / max(len(fills), 1):.1f}) | "
                f"{wall - sum(s for *_, s in calls):.2f} |",
                flush=True,
            )
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/quickstart")
    parser.add_argument("--formats", default="gguf,torch,onnx")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument(
        "--requests",
        type=int,
        default=8,
        help="requests per client per level (enough that ramp-up and tail-off are a small part of it)",
    )
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repeat every level this many times per backend; ratios are taken within a round",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="serve.max_batch_size for every server (vLLM: --max-num-seqs); default: the run's config (8)",
    )
    parser.add_argument(
        "--profile-llama",
        action="store_true",
        help="instead: the llama.cpp backend in-process, decode step time by rows and threads",
    )
    parser.add_argument(
        "--gguf",
        default=None,
        help="with --profile-llama: these GGUF files (comma-separated) instead: step time 8 rows vs 1, and "
        "whether greedy replies stay the same in a batch",
    )
    add_json_arg(parser)
    args = parser.parse_args()
    run = Path(args.run)
    prompts = questions(run, 16)
    levels = [int(x) for x in args.levels.split(",")]
    from loratui.serving.selection import choose

    print(
        f"# {platform.machine()}, {os.cpu_count()} cores; run {run}; {args.requests} streaming chat requests per "
        f"client per level, greedy, max_tokens {args.max_tokens}; {args.rounds} rounds",
        flush=True,
    )
    if args.profile_llama and args.gguf:
        profile_files([Path(p) for p in args.gguf.split(",")], prompts, args.max_tokens)
        return
    if args.profile_llama:
        profile_llama(choose(run, "gguf", False).path, prompts, args.requests, args.max_tokens)
        return
    rows: list[tuple[str, int, dict]] = []  # (format, round, level result)
    bare: dict[str, dict[int, float]] = {"gguf": {}, "onnx": {}}  # format -> round -> its bare runtime's tok/s
    for fmt in args.formats.split(","):
        served = choose(run, fmt, False).path if fmt in bare else None  # the file the server picks
        proc, url, model = start(run, fmt, args.max_batch_size)
        try:
            with httpx.Client() as http:
                one(http, url, model, prompts[0], 4)  # warm-up
            for rnd in range(args.rounds):
                for n in levels:
                    result = level(url, model, prompts, n, args.requests, args.max_tokens)
                    rows.append((fmt, rnd, result))
                    print(f"{fmt} round {rnd + 1} x{n}: {result['tok_s']:.1f} tok/s", flush=True)
                if served is not None:  # the bare runtime in the same round, while the server sits idle
                    measure = bare_llama_cpp if fmt == "gguf" else bare_onnxruntime_genai
                    bare[fmt][rnd] = measure(served, prompts[: args.requests], args.max_tokens)
                    print(f"bare {BARE[fmt]} round {rnd + 1}: {bare[fmt][rnd]:.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    def ratio_text(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x" + (
            f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        )

    print(
        "\nMedians over the rounds; the ratio is each round's level against that round's 1 client "
        "(median, and the range over rounds).\n"
    )
    print("| backend | clients | aggregate tok/s | vs its 1 client | TTFT p50 s | TTFT p95 s |")
    print("|---|---:|---:|---:|---:|---:|")
    targets: list[str] = []
    for fmt in dict.fromkeys(f for f, _, _ in rows):
        base = {rnd: r for f, rnd, r in rows if f == fmt and r["clients"] == levels[0]}
        for n in levels:
            mine = [(rnd, r) for f, rnd, r in rows if f == fmt and r["clients"] == n]
            ratios = [r["tok_s"] / base[rnd]["tok_s"] for rnd, r in mine]
            print(
                f"| {fmt} | {n} | {statistics.median(r['tok_s'] for _, r in mine):.1f} | {ratio_text(ratios)} | "
                f"{statistics.median(r['p50'] for _, r in mine):.3f} | {statistics.median(r['p95'] for _, r in mine):.3f} |"
            )
            if fmt in ("torch", "gguf") and n == 8 and n > levels[0]:
                ratio = statistics.median(ratios)
                name = {"torch": "PyTorch", "gguf": "llama.cpp"}[fmt]
                targets.append(f"{name} backend, 8 clients vs 1: {ratio:.2f}x (target >= 3x)")
                record(
                    args.json,
                    "serve_throughput",
                    f"{name} backend, {n} streaming clients vs 1, aggregate tok/s",
                    f"{statistics.median(r['tok_s'] for _, r in mine):.1f} tok/s",
                    f"1 client {statistics.median(r['tok_s'] for r in base.values()):.1f} tok/s",
                    ratio,
                    ">= 3x",
                    ratio >= 3,
                )
    engines = {f for f, _, _ in rows}
    if {"vllm", "torch"} <= engines:
        print()
        for n in levels:
            by_round = {f: {rnd: r["tok_s"] for g, rnd, r in rows if g == f and r["clients"] == n} for f in engines}
            ratios = [
                by_round["vllm"][rnd] / by_round["torch"][rnd] for rnd in by_round["vllm"] if rnd in by_round["torch"]
            ]
            print(
                f"vLLM vs loratui's PyTorch backend at {n} clients: {ratio_text(ratios)} the aggregate tok/s "
                f"({statistics.median(by_round['vllm'].values()):.1f} vs {statistics.median(by_round['torch'].values()):.1f})"
            )
    for fmt, alone in bare.items():
        if not alone:
            continue
        one_client = {rnd: r for f, rnd, r in rows if f == fmt and r["clients"] == 1}
        shares = [one_client[rnd]["tok_s"] / alone[rnd] for rnd in alone]
        share = statistics.median(shares)
        name = {"gguf": "llama.cpp", "onnx": "ONNX Runtime"}[fmt]
        print(
            f"\nbare {BARE[fmt]}, same files and prompts: {statistics.median(alone.values()):.1f} tok/s (median); "
            f"the {name} backend at 1 client reaches {share:.0%} of it "
            f"(rounds: {', '.join(f'{x:.0%}' for x in shares)}; its figure includes HTTP, streaming and prompt time)"
        )
        targets.append(f"{name} backend at 1 client vs bare {BARE[fmt]}: {share:.0%} (target >= 80%)")
        record(
            args.json,
            "serve_throughput",
            f"{name} backend at 1 client vs bare {BARE[fmt]}, tok/s",
            f"{statistics.median(one_client[rnd]['tok_s'] for rnd in alone):.1f} tok/s",
            f"bare {BARE[fmt]} {statistics.median(alone.values()):.1f} tok/s",
            share,
            ">= 80%",
            share >= 0.8,
        )
    if targets:
        print("\nTargets:\n" + "\n".join(f"- {t}" for t in targets))


BARE = {"gguf": "llama-cpp-python", "onnx": "onnxruntime-genai"}


if __name__ == "__main__":
    main()
