"""Does ``data.augment`` help? Held-out key-fact match with and without augmentation, same training budget.

For each bundled dataset whose test split holds paraphrases of the training questions (``quickstart``,
``quickstart-more``) and each seed, two runs of ``examples/quickstart.yaml`` in a scratch runs folder,
through the command line (data, train, eval; no merge or export):

1. without augmentation: the example's own training (20 epochs, lr 1e-3);
2. with ``data.augment`` (``--methods``, ``--variations`` per row, the same seed): the same number of
   optimizer steps as run 1 (``train.max_steps``), hence the same learning-rate schedule and about the
   same compute. Same epochs instead would give the augmented run 3x the steps: a gain could then come
   from the longer training alone.

Key-fact match: the eval step's ``contains`` on the test split (the normalized ``fact`` of the row inside
the normalized greedy reply), for the base model and the tuned adapter, from ``eval/metrics.json``. The
base figure is the same model in both runs. The augmented run's data report gives the variations added and
dropped. Nothing here is tuned on the test split: the settings are the defaults of ``data.augment``.

    .venv/bin/python bench/augment_quality.py [--datasets quickstart,quickstart-more] [--seeds 0,1]
        [--methods template] [--keep DIR]

Target (issue 30): with ``template`` alone, the tuned model's key-fact match on the quickstart's held-out
paraphrases above the un-augmented run's at the same budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "quickstart.yaml"


def run(runs: Path, name: str, *overrides: str) -> Path:
    """``loratui run`` of the quickstart example as ``name`` (data, train, eval); the run folder."""
    command = [
        sys.executable,
        "-m",
        "loratui",
        "run",
        str(CONFIG),
        "--skip",
        "merge,export",
        f"runs_dir={runs}",
        f"name={name}",
        "eval.metrics=[contains]",
        *overrides,
    ]
    print("$", " ".join(command[3:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {done.returncode}")
    return runs / name


def train_summary(folder: Path) -> dict[str, Any]:
    """The train step's ``done`` summary (steps, seconds, ...) from the run's events."""
    for line in reversed((folder / "events.jsonl").read_text().splitlines()):
        event = json.loads(line)
        if event.get("step") == "train" and event.get("type") == "done":
            return event["summary"]
    raise SystemExit(f"{folder}: no finished train step in events.jsonl")


def key_facts(folder: Path) -> dict[str, float]:
    """model ("base", "tuned") -> ``contains`` on the test split."""
    report = json.loads((folder / "eval" / "metrics.json").read_text())
    found = report["datasets"][0]
    return {name: float(model["metrics"]["contains"]) for name, model in found["models"].items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="quickstart,quickstart-more")
    parser.add_argument("--seeds", default="0", help="comma-separated: train.seed and data.augment.seed")
    parser.add_argument("--methods", default="template", help="data.augment.methods, comma-separated")
    parser.add_argument("--variations", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the runs folder here (default: a temporary one)")
    add_json_arg(parser)
    args = parser.parse_args()
    runs = (args.keep or Path(tempfile.mkdtemp(prefix="loratui-augment-"))) / "runs"
    methods = args.methods.split(",")
    rows: list[dict[str, Any]] = []
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            common = [f"data.source={dataset}", f"train.seed={seed}"]
            started = time.monotonic()
            plain = run(runs, f"{dataset}-plain-s{seed}", *common)
            steps = int(train_summary(plain)["steps"])
            augment = f"{{methods: [{', '.join(methods)}], variations: {args.variations}, seed: {seed}}}"
            varied = run(
                runs, f"{dataset}-augmented-s{seed}", *common, f"data.augment={augment}", f"train.max_steps={steps}"
            )
            data = json.loads((varied / "data" / "report.json").read_text())
            aug = data.get("augment") or {}
            row = {
                "dataset": dataset,
                "seed": seed,
                "steps": steps,
                "plain": key_facts(plain),
                "augmented": key_facts(varied),
                "added": aug.get("added", {}),
                "dropped": aug.get("dropped", {}),
                "augmented_steps": int(train_summary(varied)["steps"]),
                "minutes": (time.monotonic() - started) / 60,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmethods {methods}, {args.variations} variations per training row; same optimizer steps per pair\n")
    print("| dataset | seed | steps | base | tuned, plain | tuned, augmented | variations added | dropped |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['seed']} | {r['steps']} ({r['augmented_steps']}) | {r['plain']['base']:.3f} | "
            f"{r['plain']['tuned']:.3f} | {r['augmented']['tuned']:.3f} | {r['added']} | {r['dropped']} |"
        )
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        plain = statistics.mean(r["plain"]["tuned"] for r in mine)
        varied = statistics.mean(r["augmented"]["tuned"] for r in mine)
        print(
            f"\n{dataset}: tuned key-fact match {plain:.3f} plain -> {varied:.3f} augmented (mean of {len(mine)} seeds)"
        )
        record(
            args.json,
            "augment_quality",
            f"{dataset}: held-out key-fact match with data.augment {'+'.join(methods)}, same steps",
            f"{varied:.3f}",
            f"{plain:.3f} without augmentation",
            varied - plain,
            "> 0 (quickstart, template)",
            varied > plain,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
