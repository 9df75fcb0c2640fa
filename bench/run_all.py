"""`make bench`: every benchmark in bench/, one after the other, into one table: bench/results.md.

First brings the quickstart run up to date with the artifacts the benchmarks read (`loratui run
examples/quickstart.yaml`, with the q4_k_m and q8_0 GGUF and the fp32, int4 and int8 ONNX exports; a run that
is already there is skipped step by step). Then each script runs alone on the machine with ``--json``,
and appends its headline figures: what was measured, the baseline measured in the same script, the
ratio, the target and whether it is met. The full output of each script goes to bench/logs/<name>.log.

    .venv/bin/python bench/run_all.py [--runs-dir runs] [--only gguf_decode,onnx_scoring]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# (script, extra arguments); the scripts that read the quickstart run get --run
SCRIPTS: list[tuple[str, list[str]]] = [
    ("data_prep", []),
    ("augment_speed", []),
    ("train_throughput", []),
    ("quickstart_quality", ["--run"]),
    ("gguf_decode", ["--run"]),
    ("onnx_scoring", ["--run"]),
    ("onnx_decode", ["--run"]),
    ("serve_throughput", ["--run"]),
    ("chat_page", ["--run"]),
    ("tui_startup", []),
    ("estimate_accuracy", []),
    ("preference", []),
]
EXPORTS = [
    "export.formats=[safetensors,gguf,onnx]",
    "export.gguf_quants=[q4_k_m,q8_0]",
    "export.onnx_quants=[int4,int8]",
]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        kib = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def table(rows: list[dict], failures: list[str]) -> str:
    lines = [
        "| benchmark | figure | measured | baseline (same run) | ratio | target | |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for r in rows:
        ratio = (
            "" if r["ratio"] is None else (f"{r['ratio']:.0%}" if r["target"].endswith("%") else f"{r['ratio']:.2f}x")
        )
        lines.append(
            f"| `{r['bench']}` | {r['figure']} | {r['measured']} | {r['baseline']} | {ratio} | {r['target']} | "
            f"{'met' if r['met'] else '**NOT met**'} |"
        )
    lines += [f"| `{name}` | failed: see bench/logs/{name}.log | | | | | **failed** |" for name in failures]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", default="runs", help="where the quickstart run lives (default: runs)")
    ap.add_argument("--only", default="", help="comma-separated scripts to run (default: all)")
    ap.add_argument("--output", default=str(BENCH / "results.md"))
    args = ap.parse_args()
    only = {s for s in args.only.split(",") if s}
    logs = BENCH / "logs"
    logs.mkdir(exist_ok=True)
    run = Path(args.runs_dir) / "quickstart"
    started = time.time()

    print("== the quickstart run and its exports (steps already up to date are skipped)", flush=True)
    loratui = Path(sys.executable).with_name("loratui")
    code = subprocess.call(
        [str(loratui), "run", str(REPO / "examples" / "quickstart.yaml"), f"runs_dir={args.runs_dir}", *EXPORTS],
        cwd=REPO,
    )
    if code != 0:
        print(f"loratui run failed (exit {code}): the benchmarks need that run", file=sys.stderr)
        return code

    rows: list[dict] = []
    failures: list[str] = []
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SCRIPTS:
            if only and name not in only:
                continue
            out = Path(tmp) / f"{name}.jsonl"
            cmd = [
                sys.executable,
                str(BENCH / f"{name}.py"),
                "--json",
                str(out),
                *(["--run", str(run)] if "--run" in extra else []),
            ]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            t = time.time()
            with (logs / f"{name}.log").open("w", encoding="utf-8") as log:
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            seconds[name] = time.time() - t
            got = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
            if code != 0 or not got:
                failures.append(name)
                print(f"   failed (exit {code}); see {logs / (name + '.log')}", flush=True)
            rows += got
            for r in got:
                print(
                    f"   {r['figure']}: {r['measured']} vs {r['baseline']} -> {'met' if r['met'] else 'NOT met'}",
                    flush=True,
                )

    missed = [r for r in rows if not r["met"]]
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            f"Measured by `make bench` (`bench/run_all.py`) on {datetime.date.today().isoformat()}: {machine()}. "
            "Every ratio is against a baseline measured in the same script on the same machine; the targets are "
            "the ones bench/README.md gives. Full outputs: `bench/logs/<name>.log`.",
            "",
            table(rows, failures),
            "",
            f"{len(rows) - len(missed)} of {len(rows)} figures meet their target"
            + (f"; missed: {', '.join(r['bench'] for r in missed)}" if missed else "")
            + (f"; failed: {', '.join(failures)}" if failures else "")
            + ".",
            "",
            "Time per script: "
            + ", ".join(f"`{n}` {s / 60:.1f} min" for n, s in seconds.items())
            + f"; {(time.time() - started) / 60:.0f} minutes in all.",
            "",
        ]
    )
    tmp_out = Path(args.output).with_suffix(".md.tmp")
    tmp_out.write_text(text, encoding="utf-8")
    tmp_out.replace(args.output)
    print(f"\n{text}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
