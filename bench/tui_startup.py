"""TUI startup: wall time from interpreter start to the first frame, and what is imported by then.

Each measurement is a fresh ``python -c`` subprocess (nothing cached in-process; the OS file cache
is warmed by one discarded run of each kind first). The parent takes ``time.time()`` just before it
starts the child and passes it in; the child reports, against that launch time:

* ``interpreter``: when its first line of code runs (interpreter start-up, no imports yet);
* ``app built``: after its imports and the app object are made (loratui: ``load_config`` + ``create_app``);
* ``first frame``: the first screen update Textual would write to the terminal (``App._display``
  called outside a batch with a rendered update; headless drivers drop it, the timing is the same);
* ``settled``: when the auto pilot's ``pilot.pause()`` returns (every pending message handled).

and whether ``torch`` or ``transformers`` are in ``sys.modules`` at the first frame (and when settled).

Runs: ``create_app(load_config("examples/quickstart.yaml"), config_path="examples/quickstart.yaml")``
headless at 100x30, against the baseline, a bare Textual ``App`` showing one ``Static``, run the same
way in the same script (the kinds alternate, so drift hits both alike).

    .venv/bin/python bench/tui_startup.py [--repeat 7] [--top-imports 15]

Target: loratui's first frame < 1.0 s with neither torch nor transformers imported. Exits 1 when
either is imported by the first frame (a slow first frame is reported, not an error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
HEAVY = ("torch", "transformers")
CONFIG = "examples/quickstart.yaml"

# The child: argv[1] = the parent's time.time() at launch, argv[2] = kind. Prints one JSON line.
CHILD = r"""
import sys, time
LAUNCH = float(sys.argv[1]); KIND = sys.argv[2]
marks = {"interpreter": time.time() - LAUNCH}
HEAVY = ("torch", "transformers")

def heavy():
    return [m for m in HEAVY if m in sys.modules]

from textual.app import App

_display = App._display

def display(self, screen, renderable):
    if "first_frame" not in marks and renderable is not None and not self._batch_count and self._running:
        marks["first_frame"] = time.time() - LAUNCH
        marks["heavy_at_first_frame"] = heavy()
    return _display(self, screen, renderable)

App._display = display

if KIND == "loratui":
    from loratui.pipeline.config import load_config
    from loratui.tui.app import create_app
    app = create_app(load_config("examples/quickstart.yaml"), config_path="examples/quickstart.yaml")
else:
    from textual.widgets import Static

    class Bare(App):
        def compose(self):
            yield Static("hello")

    app = Bare()
marks["app_built"] = time.time() - LAUNCH

async def pilot(p):
    await p.pause()
    marks["settled"] = time.time() - LAUNCH
    marks["heavy_settled"] = heavy()
    marks["widgets"] = sum(1 for _ in p.app.screen.walk_children())
    if KIND == "loratui":
        marks["stepbar"] = " | ".join(str(t.label) for t in p.app.query("#stepbar Tab"))
    p.app.exit()

app.run(headless=True, size=(100, 30), auto_pilot=pilot)
print("BENCH " + __import__("json").dumps(marks))
"""

KINDS = {"bare": "bare Textual App (one Static)", "loratui": "loratui create_app(quickstart)"}


def child_env(state_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTUAL")}
    env.update(LORATUI_STATE_DIR=state_dir, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def measure(kind: str, env: dict[str, str], extra: list[str] | None = None) -> tuple[dict, str]:
    argv = [sys.executable, *(extra or []), "-c", CHILD]
    launch = time.time()
    proc = subprocess.run([*argv, str(launch), kind], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{kind} child failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    marks = json.loads(line[len("BENCH ") :])
    if "first_frame" not in marks:
        raise SystemExit(f"{kind}: no frame was rendered before the auto pilot exited: {marks}")
    return marks, proc.stderr


def top_imports(env: dict[str, str], n: int) -> list[tuple[float, str]]:
    """The ``n`` slowest top-level imports (cumulative, -X importtime) of one loratui start."""
    _, stderr = measure("loratui", env, ["-X", "importtime"])
    rows = []
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # top level only (one space of indent)
            rows.append((int(m.group(1)) / 1e6, m.group(3)))
    return sorted(rows, reverse=True)[:n]


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} / {max(values):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="measured runs of each kind (after one warm-up each)")
    parser.add_argument(
        "--top-imports",
        type=int,
        default=12,
        help="list the slowest top-level imports of one loratui start (-X importtime); 0: skip",
    )
    add_json_arg(parser)
    args = parser.parse_args()

    import textual

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"# {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"# {platform.machine()}, {cores} usable cores, python {platform.python_version()}, "
        f"textual {textual.__version__}; {args.repeat} runs of each kind after one warm-up; "
        "times are seconds since the parent launched the child, median / max"
    )

    results: dict[str, list[dict]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory(prefix="loratui-bench-state-") as state:
        env = child_env(state)
        for kind in KINDS:  # warm-up: the file cache and __pycache__, not counted
            measure(kind, env)
        for _ in range(args.repeat):
            for kind in KINDS:
                results[kind].append(measure(kind, env)[0])
        imports = top_imports(env, args.top_imports) if args.top_imports > 0 else []

    base_ff = statistics.median(m["first_frame"] for m in results["bare"])
    print(
        "\n| app | interpreter | app built | first frame | settled | first frame vs bare | widgets "
        "| torch/transformers at first frame | when settled |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for kind, label in KINDS.items():
        runs = results[kind]
        col = {k: [m[k] for m in runs] for k in ("interpreter", "app_built", "first_frame", "settled")}
        at_frame = sorted({x for m in runs for x in m["heavy_at_first_frame"]})
        settled = sorted({x for m in runs for x in m["heavy_settled"]})
        print(
            f"| {label} | {fmt(col['interpreter'])} | {fmt(col['app_built'])} | {fmt(col['first_frame'])} "
            f"| {fmt(col['settled'])} | {statistics.median(col['first_frame']) / base_ff:.2f}x "
            f"| {runs[0]['widgets']} | {', '.join(at_frame) or 'neither'} | {', '.join(settled) or 'neither'} |"
        )
    print(f"\nloratui step bar when settled: {results['loratui'][0].get('stepbar', '?')}")
    if imports:
        print("\nslowest top-level imports of one loratui start (-X importtime, cumulative s):")
        for seconds, name in imports:
            print(f"  {seconds:6.3f}  {name}")

    ours = [m["first_frame"] for m in results["loratui"]]
    heavy = sorted({x for m in results["loratui"] for x in m["heavy_at_first_frame"]})
    median, worst = statistics.median(ours), max(ours)
    ok_time = median < TARGET_S
    print(
        f"\nverdict: loratui first frame median {median:.3f} s (max {worst:.3f} s), "
        f"{median / base_ff:.2f}x bare Textual: {'MEETS' if ok_time else 'MISSES'} the < {TARGET_S:.1f} s target"
        f"{'' if worst < TARGET_S else ' (not in every run)' if ok_time else ''}; "
        + (
            f"IMPORTED {' and '.join(heavy)} before the first frame: FAIL"
            if heavy
            else "neither torch nor transformers imported by the first frame"
        )
    )
    record(
        args.json,
        "tui_startup",
        "TUI first frame, median of fresh processes",
        f"{median:.3f} s",
        f"bare Textual app {base_ff:.3f} s",
        median / base_ff,
        "< 1.0 s, torch and transformers not imported",
        ok_time and not heavy,
    )
    return 1 if heavy else 0


if __name__ == "__main__":
    raise SystemExit(main())
