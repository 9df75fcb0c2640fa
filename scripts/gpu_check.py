"""The CUDA paths, checked in one run: training (LoRA bf16, QLoRA NF4), padding-free vs the usual recipe, the
out-of-memory fallback, merge and eval, the PyTorch serving backend at 8 clients vs 1, the memory estimate.

Each part runs in a child process of its own with a time limit, so one that fails, hangs or crashes CUDA is
reported and the others still run. The report is ``gpu-check.json`` and ``gpu-check.md`` under ``--out``.

``--mode cpu`` (the default without CUDA) runs the same parts at tiny sizes on the CPU, so the script is tested
in CI and never rots; parts that need CUDA say so and are skipped there.

    python scripts/gpu_check.py --out OUT [--mode auto|cuda|cpu] [--steps N] [--parts env,lora,...]
                                [--model smollm2-135m-instruct|PATH] [--budget-s 480]

On a lent GPU machine, ``scripts/gpu-check.sh`` installs the carried wheels first and then runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS = ("env", "lora", "qlora", "padding_free", "oom_fallback", "merge_eval", "serve", "estimate")
# seconds each part may take on CUDA (the whole check fits the 8 minutes a lent GPU session can give it)
LIMITS = {"env": 60, "lora": 240, "qlora": 90, "padding_free": 120, "oom_fallback": 60, "merge_eval": 90,
          "serve": 90, "estimate": 90}  # fmt: skip


# ---- helpers that run inside a part's child process -----------------------------------------------------------


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _config(work: Path, name: str, model: str, steps: int, extra: list[str]) -> list[str]:
    """`loratui` arguments for a short training run of the quickstart in ``work``."""
    return [
        "--config",
        str(REPO / "examples" / "quickstart.yaml"),
        f"runs_dir={work}",
        f"name={name}",
        f"model.base={model}",
        f"train.max_steps={steps}",
        "train.seed=0",
        f"train.save_every={steps}",
        *extra,
    ]


def _loratui(args: list[str]) -> int:
    from loratui import cli

    return int(cli.main(args))


def _events(run: Path, step: str) -> list[dict[str, Any]]:
    lines = (run / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e.get("step") == step]


def _train_figures(run: Path) -> dict[str, Any]:
    events = _events(run, "train")
    losses = [e["values"]["loss"] for e in events if e["type"] == "metric" and e.get("split") == "train"]
    done = next((e for e in events if e["type"] == "done"), None)
    warnings = [e["message"] for e in events if e["type"] == "log" and e.get("level") == "warning"]
    return {
        "losses": [round(x, 4) for x in losses],
        "tokens_per_s": done["summary"]["tokens_per_s"] if done else None,
        "seconds": done["summary"]["seconds"] if done else None,
        "warnings": warnings,
    }


def _peak() -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _train(work: Path, name: str, model: str, steps: int, extra: list[str]) -> dict[str, Any]:
    code = _loratui(["train", *_config(work, name, model, steps, extra)])
    figures = _train_figures(work / name)
    if code != 0:
        raise RuntimeError(f"loratui train exited {code}: {figures['warnings'][-3:]}")
    return {**figures, "peak_allocated_bytes": _peak()}


def part_env(work: Path, model: str, steps: int) -> dict[str, Any]:
    import platform
    from importlib import metadata

    import torch

    names = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "onnxruntime",
             "onnxruntime-gpu", "onnxruntime-genai", "llama-cpp-python", "fastapi", "loratui")  # fmt: skip
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    out: dict[str, Any] = {"python": platform.python_version(), "versions": versions, "cuda": _cuda()}
    if _cuda():
        props = torch.cuda.get_device_properties(0)
        out.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16=bool(torch.cuda.is_bf16_supported()),
            torch_cuda=torch.version.cuda,
        )
    else:
        out["cpu"] = platform.processor() or platform.machine()
    return out


def part_lora(work: Path, model: str, steps: int) -> dict[str, Any]:
    """LoRA on the device (bf16 on CUDA), then the same run in fp32 on the CPU: the two loss curves must have
    the same shape (same data order and seed; bf16 rounds differently, so not the same numbers)."""
    precision = "bf16" if _cuda() else "fp32"
    out = {"precision": precision, **_train(work, "lora", model, steps, [f"train.precision={precision}"])}
    if _cuda():
        cpu = _train(work, "lora-cpu", model, steps, ["train.device=cpu", "train.precision=fp32"])
        out["cpu_losses"] = cpu["losses"]
        out["curve"] = compare_curves(out["losses"], cpu["losses"])
        if not out["curve"]["same_shape"]:
            raise RuntimeError(f"the CUDA loss curve does not follow the CPU's: {out['curve']}")
    return out


def compare_curves(a: list[float], b: list[float]) -> dict[str, Any]:
    """Same shape: Pearson correlation of the per-step losses >= 0.9 and the last losses within 15% of each
    other (bf16 against fp32 over tens of steps of the same data; measured figures go in the report)."""
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if n < 3:
        return {"steps": n, "same_shape": True, "note": "too few steps to compare"}
    mean_a, mean_b = sum(a) / n, sum(b) / n
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    spread = (sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b)) ** 0.5
    correlation = cov / spread if spread else 1.0
    last = abs(a[-1] - b[-1]) / max(abs(b[-1]), 1e-9)
    return {"steps": n, "correlation": round(correlation, 4), "last_rel_diff": round(last, 4),
            "same_shape": correlation >= 0.9 and last <= 0.15}  # fmt: skip


def part_qlora(work: Path, model: str, steps: int) -> dict[str, Any]:
    return _train(work, "qlora", model, steps, ["lora.method=qlora"])


def part_oom_fallback(work: Path, model: str, steps: int) -> dict[str, Any]:
    """A micro-batch that cannot fit, on purpose: this process may use a small share of the GPU's memory
    (``set_per_process_memory_fraction``: allocations past it raise the same OutOfMemoryError a full GPU
    does), so the fallback must halve the micro-batch until it fits and finish the run."""
    import torch

    if not _cuda():
        return {"skipped": "CUDA only: on the CPU an oversized batch swaps or is killed instead of raising"}
    total = torch.cuda.get_device_properties(0).total_memory
    # 0.75 GiB: room for SmolLM2's bf16 weights (0.27 GiB), its adapter and optimizer, and a few sequences'
    # activations, not for 64 at once (about 1 MiB per token over its 30 layers)
    share = min(1.0, (0.75 * 2**30) / total)
    torch.cuda.set_per_process_memory_fraction(share)
    figures = _train(work, "oom", model, 2, ["train.batch_size=64", "train.grad_accum=1", "data.max_length=512"])
    halvings = [w for w in figures["warnings"] if w.startswith("out of memory: retrying")]
    if not halvings:
        raise RuntimeError(f"no out-of-memory happened within {share:.3f} of the GPU: nothing was checked")
    return {"memory_share": round(share, 4), "halvings": halvings, **figures}


def part_padding_free(work: Path, model: str, steps: int) -> dict[str, Any]:
    """bench/train_throughput.py (loratui's train step vs Trainer + peft, padded) on this device, same steps."""
    out = work / "throughput.jsonl"
    command = [sys.executable, str(REPO / "bench" / "train_throughput.py"), "--steps", str(max(steps, 3)),
               "--old-steps", "0", "--repeat", "1", "--models", model, "--json", str(out)]  # fmt: skip
    env = {**os.environ, "LORATUI_BENCH_CUDA": "1" if _cuda() else "0"}  # both recipes on this device, bf16 on CUDA
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode not in (0, 1):  # 1: ran, target not met
        raise RuntimeError(f"train_throughput.py exited {done.returncode}: {done.stderr[-1500:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    return {"figures": rows, "output_tail": done.stdout[-1500:]}


def part_merge_eval(work: Path, model: str, steps: int) -> dict[str, Any]:
    run = work / "lora"
    if not (run / "adapter" / "adapter_config.json").is_file():  # the lora part failed: train one of our own
        _train(work, "lora", model, 2, [])
    args = ["--config", str(run / "config.yaml")]
    started = time.monotonic()
    if _loratui(["merge", *args]) != 0:
        raise RuntimeError("loratui merge failed")
    merged_s = time.monotonic() - started
    limit = ["eval.max_samples=8", "eval.max_new_tokens=16"] if not _cuda() else []
    if _loratui(["eval", *args, "eval.metrics=[contains]", *limit]) != 0:
        raise RuntimeError("loratui eval failed")
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    return {
        "merge_s": round(merged_s, 1),
        "eval_s": round(time.monotonic() - started - merged_s, 1),
        "metrics": metrics,
    }


def part_serve(work: Path, model: str, steps: int) -> dict[str, Any]:
    """`loratui serve --format torch` on the merged run; aggregate tokens/s of 8 streaming clients vs 1."""
    import threading

    import httpx

    from tests.threaded_server import loratui_serve

    run = work / "lora"
    if not (run / "merged" / "config.json").is_file():
        part_merge_eval(work, model, steps)
    with loratui_serve([str(run), "--format", "torch", "--no-ui"], work / "parts" / "serve-server.log") as url:
        tokens = 48 if _cuda() else 16

        def one(i: int, results: list[int]) -> None:
            body = {"model": "lora", "max_tokens": tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Question {i}: where is the library?"}]}  # fmt: skip
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
            reply.raise_for_status()
            results.append(int(reply.json()["usage"]["completion_tokens"]))

        one(0, [])  # the first request warms the model up: not timed
        rates = {}
        for clients in (1, 8):
            results: list[int] = []
            threads = [threading.Thread(target=one, args=(i, results)) for i in range(clients * 2)]
            started = time.monotonic()
            for batch in range(2):  # two rounds of `clients` at once
                wave = threads[batch * clients : (batch + 1) * clients]
                for t in wave:
                    t.start()
                for t in wave:
                    t.join()
            rates[clients] = sum(results) / (time.monotonic() - started)
        return {"tokens_per_s_1": round(rates[1], 1), "tokens_per_s_8": round(rates[8], 1),
                "ratio_8_to_1": round(rates[8] / rates[1], 2)}  # fmt: skip


def part_estimate(work: Path, model: str, steps: int) -> dict[str, Any]:
    """`loratui estimate --json` (with its probe) for the lora part's config, against that part's measured peak."""
    import contextlib
    import io

    from loratui import cli

    args = _config(work, "estimate", model, steps, ["train.precision=bf16" if _cuda() else "train.precision=fp32"])
    buffer = io.StringIO()
    probe = [] if _cuda() else ["--no-probe"]  # the probe trains on the CPU for minutes: the analytic estimate there
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["estimate", *args, "--json", *probe])
    estimate = json.loads(buffer.getvalue() or "{}")
    measured = None
    lora = work / "parts" / "lora.json"
    if lora.is_file():
        measured = json.loads(lora.read_text()).get("result", {}).get("peak_allocated_bytes")
    parts = estimate.get("memory", {}).get("parts", {})
    total = sum(v for k, v in parts.items() if isinstance(v, int | float) and (k != "framework" or not _cuda()))
    ratio = round(measured / total, 3) if measured and total else None  # CUDA: torch's own allocations only
    return {"exit_code": code, "estimate": estimate, "estimated_bytes": total, "measured_peak_bytes": measured,
            "measured_over_estimated": ratio}  # fmt: skip


FUNCTIONS: dict[str, Callable[[Path, str, int], dict[str, Any]]] = {
    "env": part_env,
    "lora": part_lora,
    "qlora": part_qlora,
    "padding_free": part_padding_free,
    "oom_fallback": part_oom_fallback,
    "merge_eval": part_merge_eval,
    "serve": part_serve,
    "estimate": part_estimate,
}


def child(part: str, work: Path, model: str, steps: int) -> int:
    """One part in this process: its result (or its error) as JSON in ``work/parts/<part>.json``."""
    sys.path.insert(0, str(REPO))
    started = time.monotonic()
    try:
        record = {"status": "ok", "result": FUNCTIONS[part](work, model, steps)}
        if "skipped" in record["result"]:
            record["status"] = "skipped"
    except BaseException as e:  # noqa: BLE001 - reported, and the other parts still run
        record = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    record["seconds"] = round(time.monotonic() - started, 1)
    (work / "parts").mkdir(parents=True, exist_ok=True)
    (work / "parts" / f"{part}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return 0


# ---- the parent: every part in turn, then the report ---------------------------------------------------------


def run_part(part: str, work: Path, model: str, steps: int, limit: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", part, "--work", str(work), "--model", model, "--steps", str(steps)]
    log = work / "parts" / f"{part}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"over its time limit of {limit:.0f} s", "seconds": round(limit, 1)}
    result_file = work / "parts" / f"{part}.json"
    if not result_file.is_file():  # the child died (a CUDA crash, a kill) before writing its result
        tail = log.read_text(errors="replace")[-2000:]
        return {"status": "failed", "error": f"the part's process exited {code}", "log_tail": tail,
                "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    return dict(json.loads(result_file.read_text(encoding="utf-8")))


def markdown(report: dict[str, Any]) -> str:
    env = report["parts"].get("env", {}).get("result", {})
    lines = [
        f"# loratui GPU check ({report['mode']})",
        "",
        f"{env.get('device') or env.get('cpu', '?')}, torch {env.get('versions', {}).get('torch')}, "
        f"CUDA {env.get('torch_cuda', '-')}, Python {env.get('python')}; {report['date']}; model {report['model']}, "
        f"{report['steps']} steps; {report['seconds']:.0f} s in all.",
        "",
        "| part | status | seconds | figures |",
        "|---|---|---:|---|",
    ]
    for part, record in report["parts"].items():
        result = record.get("result", {})
        if record["status"] == "failed":
            figures = record.get("error", "")
        elif record["status"] == "skipped":
            figures = result.get("skipped", "")
        else:
            figures = summary(part, result)
        lines.append(f"| {part} | {record['status']} | {record.get('seconds', '')} | {figures} |")
    return "\n".join(lines) + "\n"


def summary(part: str, r: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"  # noqa: E731
    if part in ("lora", "qlora"):
        losses = r.get("losses", [])
        curve = r.get("curve")
        versus = (
            f"; vs CPU fp32: correlation {curve.get('correlation')}, last {curve.get('last_rel_diff')}" if curve else ""
        )
        return f"{r.get('tokens_per_s')} tok/s, peak {gib(r.get('peak_allocated_bytes'))}, loss {losses[:1]} -> {losses[-1:]}{versus}"
    if part == "oom_fallback":
        return f"{len(r['halvings'])} halving(s), finished: {r['halvings'][-1]}"
    if part == "padding_free":
        return "; ".join(f"{f['figure']}: {f['measured']} vs {f['baseline']}" for f in r.get("figures", []))
    if part == "merge_eval":
        return f"merge {r['merge_s']} s, eval {r['eval_s']} s"
    if part == "serve":
        return f"1 client {r['tokens_per_s_1']} tok/s, 8 clients {r['tokens_per_s_8']} tok/s ({r['ratio_8_to_1']}x)"
    if part == "estimate":
        return (f"estimated {gib(r.get('estimated_bytes'))}, measured peak {gib(r.get('measured_peak_bytes'))}"
                f" (ratio {r.get('measured_over_estimated')})")  # fmt: skip
    if part == "env":
        return ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items() if v)
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    ap.add_argument("--mode", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--steps", type=int, default=None, help="training steps per part (default: 30 CUDA, 2 CPU)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--model", default="smollm2-135m-instruct", help="what model.base accepts")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--budget-s", type=float, default=480, help="the whole check's time (CUDA; 4x on the CPU)")
    ap.add_argument("--child", choices=PARTS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.work, args.model, args.steps)
    import tempfile

    mode = args.mode
    if mode == "auto":
        import torch

        mode = "cuda" if torch.cuda.is_available() else "cpu"
    steps = args.steps or (30 if mode == "cuda" else 2)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; the parts are {', '.join(PARTS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.monotonic()
    report: dict[str, Any] = {"mode": mode, "model": args.model, "steps": steps, "parts": {},
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    scale = 1 if mode == "cuda" else 4  # the CPU is slower, its sizes smaller
    budget = args.budget_s * scale
    for part in parts:
        left = budget - (time.monotonic() - started)
        if left < 15:
            report["parts"][part] = {"status": "skipped", "result": {"skipped": "out of the check's time budget"}}
            continue
        record = run_part(part, work, args.model, steps, min(LIMITS[part] * scale, left))
        report["parts"][part] = record
        print(
            f"gpu-check: {part}: {record['status']} ({record.get('seconds')} s) {record.get('error', '')}", flush=True
        )
    report["seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (args.out / "gpu-check.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0 if all(r["status"] != "failed" for r in report["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
