"""Headline figures for bench/results.md: every bench script takes ``--json FILE`` and appends one JSON
object per figure it has a target for (``bench/run_all.py`` collects them into the table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="append the headline figures here (JSON lines), for make bench")


def record(
    path: str | None, bench: str, figure: str, measured: str, baseline: str, ratio: float | None, target: str, met: bool
) -> None:
    """One figure: what was measured, against which baseline (measured in the same run), the target."""
    if not path:
        return
    row = {
        "bench": bench,
        "figure": figure,
        "measured": measured,
        "baseline": baseline,
        "ratio": None if ratio is None else round(ratio, 3),
        "target": target,
        "met": bool(met),
    }
    with Path(path).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
