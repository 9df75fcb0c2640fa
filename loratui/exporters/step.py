"""The export step: every format of ``export.formats`` (or ``--format``), each verified in its runtime.

A format whose file fails its verification (:class:`ExportRefused`) does not end the step: it is
reported (a warning, ``refused`` in the summary, its row in exports/report.md) and the other formats
go on, so a run or a fine-tuning job keeps what passed. Any other error still fails the step.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loratui.exporters.registry import EXPORTERS
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import ExportRefused
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop, StepResult


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult:
    formats = list(dict.fromkeys(cfg.export.formats))
    _check_family(cfg, run, formats, events)
    started = time.monotonic()
    results: dict[str, Any] = {}
    artifacts: list[str] = []
    refused: dict[str, list[str]] = {}
    for fmt in formats:
        module, _, name = EXPORTERS[fmt].partition(":")
        events.log(f"export: {fmt}")
        try:
            results[fmt] = getattr(importlib.import_module(module), name)(cfg, run, events, should_stop)
        except ExportRefused as e:
            events.log(f"export: {fmt} refused: {e.message}", level="warning")
            results[fmt] = {"refused": [e.message]}
            refused[fmt] = [e.message]
            continue
        if results[fmt].get("refused"):
            refused[fmt] = results[fmt]["refused"]
        artifacts.append(results[fmt].get("merged") or results[fmt].get("path", ""))
    if refused:
        events.log(
            "export: done, with refused files (not written): "
            + "; ".join(f"{fmt} {why}" for fmt, whys in refused.items() for why in whys),
            level="warning",
        )
    return StepResult(
        summary={"formats": results, "refused": refused, "seconds": round(time.monotonic() - started, 2)},
        artifacts=[a for a in artifacts if a],
    )


def _check_family(cfg: RunConfig, run: RunDir, formats: Sequence[str], events: EventSink) -> None:
    """Refuse the formats this model's family cannot take before anything is merged or converted."""
    from loratui.pipeline.data.manifest import DatasetManifest
    from loratui.pipeline.families import check

    model_dir: str | Path
    try:
        model_dir = DatasetManifest.load(run.data).model_dir
    except (OSError, ValueError):
        model_dir = run.merged  # no data manifest: the merged model has the same config
    check(model_dir, formats, warn=lambda text: events.log(text, level="warning"))
