"""Preference tuning on SmolLM2: held-out preference accuracy of the base, after SFT, after SFT + DPO.

The recipe of ``examples/preference.yaml``, in a temporary runs folder, through the command line:

1. ``loratui train`` with ``train.objective=sft`` on the quickstart facts (the quickstart's own settings);
2. ``loratui eval`` on the bundled ``preference`` test split: the base model's and the SFT adapter's figures;
3. ``loratui train`` with ``train.objective=dpo``, ``train.mode=stack`` on the ``preference`` pairs (the SFT
   adapter merged into the base, which is also DPO's reference);
4. ``loratui eval`` again: the SFT + DPO figures.

Preference accuracy: the share of held-out pairs whose chosen reply the model gives a higher summed
log-probability than the rejected one (``eval/metrics.json``). The baselines (base, SFT alone) are measured
in the same run. Targets (issue 28): DPO at least +0.2 absolute over SFT alone; the two training steps
together under 15 minutes on the CPU.

    .venv/bin/python bench/preference.py [--keep DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import add_json_arg, record  # bench/, the scripts' own folder, is on sys.path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "preference.yaml"
GAIN_TARGET = 0.2
TRAIN_SECONDS_TARGET = 15 * 60
SFT = ["train.objective=sft", "train.mode=fresh", "data.source=quickstart", "train.epochs=20", "train.lr=1e-3"]


def loratui(step: str, runs: Path, *overrides: str) -> float:
    """Run one step of the example's run in ``runs``; its wall time in seconds."""
    command = [sys.executable, "-m", "loratui", step, "--config", str(CONFIG), f"runs_dir={runs}", *overrides]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {done.returncode}")
    return time.monotonic() - started


def figures(run: Path) -> dict[str, dict[str, Any]]:
    """model -> its metrics on the preference test split, from ``eval/metrics.json``."""
    report = json.loads((run / "eval" / "metrics.json").read_text())
    found = report["datasets"][0]  # the run's own data: the preference pairs' test split
    return {name: model.get("metrics", {}) for name, model in found.get("models", {}).items()}


def train_seconds(run: Path, version: int) -> float:
    meta = json.loads((run / "adapters" / f"v{version}" / "loratui.json").read_text())
    return float(meta["metrics"]["train_seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the runs folder here (default: a temporary one)")
    add_json_arg(parser)
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="loratui-preference-"))
    runs = work / "runs"
    run = runs / "preference"
    sft_wall = loratui("train", runs, *SFT)
    loratui("eval", runs)  # the example's data (the preference pairs): base and SFT adapter
    after_sft = figures(run)
    dpo_wall = loratui("train", runs)
    loratui("eval", runs)
    after_dpo = figures(run)
    base = after_sft["base"]["preference_accuracy"]
    sft = after_sft["tuned"]["preference_accuracy"]
    dpo = after_dpo["tuned"]["preference_accuracy"]
    seconds = train_seconds(run, 1) + train_seconds(run, 2)
    print(f"{'model':<10} {'pref. accuracy':>14} {'reward margin (nats)':>21}")
    for name, metrics in (("base", after_sft["base"]), ("SFT", after_sft["tuned"]), ("SFT+DPO", after_dpo["tuned"])):
        print(f"{name:<10} {metrics['preference_accuracy']:>14.3f} {metrics['reward_margin']:>21.2f}")
    print(
        f"training: SFT {train_seconds(run, 1):.0f} s (step {sft_wall:.0f} s), DPO {train_seconds(run, 2):.0f} s "
        f"(step {dpo_wall:.0f} s); together {seconds:.0f} s"
    )
    gain = dpo - sft
    record(
        args.json,
        "preference",
        "held-out preference accuracy, SFT+DPO vs SFT alone",
        f"{dpo:.3f} (base {base:.3f})",
        f"{sft:.3f} (SFT alone)",
        gain,
        f"+{GAIN_TARGET} absolute",
        gain >= GAIN_TARGET,
    )
    record(
        args.json,
        "preference",
        "SFT + DPO training time (the Trainer's), CPU",
        f"{seconds:.0f} s",
        "-",
        None,
        f"< {TRAIN_SECONDS_TARGET} s",
        seconds < TRAIN_SECONDS_TARGET,
    )
    print(f"DPO over SFT: {gain:+.3f} (target +{GAIN_TARGET}); runs in {work}")
    return 0 if gain >= GAIN_TARGET and seconds < TRAIN_SECONDS_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
