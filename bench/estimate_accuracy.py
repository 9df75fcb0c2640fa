"""How close ``loratui estimate`` comes to what training then takes, on this machine.

For each configuration (they differ in model, max_length, micro-batch, gradient checkpointing and rank):
``loratui estimate --json`` with its probe and with ``--no-probe``, then the real ``loratui train`` in a
child process whose wall time and peak resident memory (``os.wait4``) are measured. Training time is the
train step's own duration (its ``done`` event, data preparation included) against the estimate's data +
training; memory is the child's peak RSS against the estimated peak. The first configuration then runs
merge and export too, and every byte the run wrote is compared with the disk estimate. Last, the 7B config
that cannot fit (``examples/estimate-7b.yaml``) is timed through the command line.

    .venv/bin/python bench/estimate_accuracy.py [--only NAME] [--json FILE]

Targets (issue 27): training time and peak RSS within +-25% with the probe, disk within +-10%, the 7B
estimate in under 5 s. The machine should be otherwise idle: the probe measures this machine as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIME_TOLERANCE = 0.25
MEMORY_TOLERANCE = 0.25
DISK_TOLERANCE = 0.10
SEVEN_B_SECONDS = 5.0
SMOLLM2 = "smollm2-135m-instruct"


def configs(work: Path) -> dict[str, list[str]]:
    """name -> overrides of examples/quickstart.yaml (each bounded by max_steps to a minute or two)."""
    docs = work / "docs"
    docs.mkdir(exist_ok=True)
    for f in (ROOT / "README.md", ROOT / "docs" / "architecture.md"):
        shutil.copy(f, docs / f.name)
    from tests.tiny_models import make_tiny_model

    tiny = make_tiny_model(
        work / "tiny", family="llama", tokenizer="smollm2", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768
    )
    return {
        "smollm2-auto-r16": [f"model.base={SMOLLM2}", "train.max_steps=12"],
        "smollm2-ckpt-mb4-r8": [
            f"model.base={SMOLLM2}",
            "train.gradient_checkpointing=true",
            "train.batch_size=4",
            "train.grad_accum=4",
            "lora.r=8",
            "train.max_steps=12",
        ],
        "smollm2-docs-len384-mb2-r32": [
            f"model.base={SMOLLM2}",
            f"data.source={docs}",
            "data.format=text",
            "data.chunk_tokens=384",
            "data.max_length=384",
            "train.batch_size=2",
            "train.grad_accum=4",
            "lora.r=32",
            "train.max_steps=8",
        ],
        "tiny-llama-mb16-r64": [
            f"model.base={tiny}",
            "train.batch_size=16",
            "train.grad_accum=1",
            "lora.r=64",
            "data.max_length=128",
            "train.max_steps=40",
        ],
    }


def _loratui(args: list[str], work: Path) -> tuple[int, float, float, str, str]:
    """(exit code, wall seconds, peak RSS bytes, stdout, stderr) of ``loratui ARGS``, run in ``work``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "loratui", *args], cwd=work, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024.0, out.read(), err.read()


def _estimate(common: list[str], work: Path, probe: bool) -> tuple[dict[str, Any], float]:
    code, wall, _, out, err = _loratui(["estimate", *common, "--json", *([] if probe else ["--no-probe"])], work)
    if code not in (0, 3):
        raise SystemExit(f"loratui estimate failed ({code}):\n{err[-3000:]}")
    return json.loads(out), wall


def _step_seconds(run: Path, step: str) -> float:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["type"] == "done" and e["step"] == step]
    return float(done[-1]["seconds"])


def _train_seconds(run: Path) -> float:
    return _step_seconds(run, "train")


def _bytes_written(run: Path) -> dict[str, int]:
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    return {
        "data": size(run / "data"),
        "checkpoints": size(run / "checkpoints"),
        "adapter": size(run / "adapter") + size(run / "adapters"),
        "merged": size(run / "merged"),
        "exports": size(run / "exports"),
        "total": size(run),
    }


def measure(name: str, overrides: list[str], work: Path, full: bool) -> dict[str, Any]:
    common = [
        "--config",
        str(ROOT / "examples" / "quickstart.yaml"),
        f"runs_dir={work / 'runs'}",
        f"name={name}",
        "train.keep_best=false",
        *overrides,
    ]
    analytic, analytic_wall = _estimate(common, work, probe=False)
    probed, probe_wall = _estimate(common, work, probe=True)
    code, wall, peak, _, err = _loratui(["train", *common], work)
    if code != 0:
        raise SystemExit(f"loratui train failed ({code}):\n{err[-3000:]}")
    run = work / "runs" / name
    row: dict[str, Any] = {
        "name": name,
        "settings": probed["settings"],
        "train_s": _train_seconds(run),
        "train_wall_s": wall,
        "peak_rss": peak,
        "probe_time": probed["time"]["parts"]["data"] + probed["time"]["parts"]["train"],
        "analytic_time": analytic["time"]["parts"]["data"] + analytic["time"]["parts"]["train"],
        "probe_rss": sum(probed["memory"]["parts"].values()),
        "analytic_rss": sum(analytic["memory"]["parts"].values()),
        "probe_wall_s": probe_wall,
        "analytic_wall_s": analytic_wall,
    }
    if full:
        for step in ("merge", "export"):
            code, _, _, _, err = _loratui([step, *common], work)
            if code != 0:
                raise SystemExit(f"loratui {step} failed ({code}):\n{err[-3000:]}")
        row["steps_s"] = {s: _step_seconds(run, s) for s in ("merge", "export")}
        row["steps_estimated"] = {
            "merge": probed["time"]["parts"]["merge"],
            "export": probed["time"]["parts"]["export gguf"],
        }
        written = _bytes_written(run)
        parts = probed["disk"]["parts"]
        kept = {k: v for k, v in parts.items() if k != "gguf f16 intermediate"}  # deleted after quantizing
        row["disk_written"] = written
        row["disk_estimated"] = sum(kept.values())
        row["disk_parts"] = parts
    return row


def seven_b(work: Path) -> tuple[float, int, str]:
    code, wall, _, out, err = _loratui(  # from the repository: the config names examples/mistral-7b
        ["estimate", "--config", "examples/estimate-7b.yaml", "--no-probe", "--json", f"runs_dir={work / 'runs'}"], ROOT
    )
    if code not in (0, 3):
        raise SystemExit(f"loratui estimate (7B) failed ({code}):\n{err[-3000:]}")
    data = json.loads(out)
    changes = "; ".join(f"{c['what']} -> {c['memory'] / 2**30:.1f} GiB" for c in data["changes"])
    return wall, code, changes


def _ratio(estimated: float, measured: float) -> float:
    return estimated / measured if measured else float("nan")


def report(rows: list[dict[str, Any]], seven: tuple[float, int, str], json_path: str | None) -> int:
    failures = 0
    print(
        "\n| configuration | micro x accum | train measured | probe est. (ratio) | no-probe est. (ratio) | "
        "peak RSS measured | probe est. (ratio) | no-probe est. (ratio) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t_ratio, m_ratio = _ratio(r["probe_time"], r["train_s"]), _ratio(r["probe_rss"], r["peak_rss"])
        s = r["settings"]
        print(
            f"| {r['name']} | {s['batch_size']} x {s['grad_accum']} | {r['train_s']:.1f} s | "
            f"{r['probe_time']:.1f} s ({t_ratio:.2f}) | {r['analytic_time']:.1f} s "
            f"({_ratio(r['analytic_time'], r['train_s']):.2f}) | {r['peak_rss'] / 2**20:,.0f} MiB | "
            f"{r['probe_rss'] / 2**20:,.0f} MiB ({m_ratio:.2f}) | {r['analytic_rss'] / 2**20:,.0f} MiB "
            f"({_ratio(r['analytic_rss'], r['peak_rss']):.2f}) |"
        )
        for figure, ratio, tol in (("training time", t_ratio, TIME_TOLERANCE), ("peak RSS", m_ratio, MEMORY_TOLERANCE)):
            met = abs(ratio - 1) <= tol
            failures += not met
            record(
                json_path,
                "estimate_accuracy",
                f"{r['name']}: {figure}, probe estimate / measured",
                f"{ratio:.2f}",
                "measured in the same script",
                ratio,
                f"within ±{tol:.0%}",
                met,
            )
        if "disk_written" in r:
            d_ratio = _ratio(r["disk_estimated"], r["disk_written"]["total"])
            met = abs(d_ratio - 1) <= DISK_TOLERANCE
            failures += not met
            print(
                f"\ndisk ({r['name']}, data + train + merge + export): estimated {r['disk_estimated'] / 2**20:,.1f} MiB, "
                f"written {r['disk_written']['total'] / 2**20:,.1f} MiB, ratio {d_ratio:.3f}"
            )
            print("  written: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in r["disk_written"].items()))
            print("  estimated: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in r["disk_parts"].items()))
            took = r["steps_s"].items()
            print(
                "  other steps (no target): "
                + ", ".join(f"{k} estimated {r['steps_estimated'][k]:.0f} s, took {v:.0f} s" for k, v in took)
            )
            record(
                json_path,
                "estimate_accuracy",
                "disk, estimate / written",
                f"{d_ratio:.3f}",
                "bytes the run wrote",
                d_ratio,
                f"within ±{DISK_TOLERANCE:.0%}",
                met,
            )
    wall, code, changes = seven
    met = wall < SEVEN_B_SECONDS and code == 3
    failures += not met
    print(
        f"\n7B config (examples/estimate-7b.yaml, --no-probe): {wall:.2f} s, exit {code} (3: does not fit); {changes}"
    )
    record(
        json_path,
        "estimate_accuracy",
        "7B estimate that does not fit, seconds",
        f"{wall:.2f} s",
        "-",
        None,
        f"< {SEVEN_B_SECONDS:.0f} s, exit 3",
        met,
    )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="one configuration by name")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    add_json_arg(parser)
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="loratui-estimate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        for i, (name, overrides) in enumerate(configs(work).items()):
            if args.only and name != args.only:
                continue
            print(f"{name}: estimating and training ...", flush=True)
            rows.append(measure(name, overrides, work, full=i == 0))
            (work / "rows.json").write_text(json.dumps(rows, indent=1))  # kept with --keep if a later step fails
        failures = report(rows, seven_b(work), args.json)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
