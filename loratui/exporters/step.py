"""The export step: every format of ``export.formats`` (or ``--format``), each verified in its runtime."""

from __future__ import annotations

import importlib
import time
from typing import Any

from loratui.exporters.registry import EXPORTERS
from loratui.pipeline.config import RunConfig
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: Any) -> Any:
    from loratui.pipeline.steps import StepResult

    formats = list(dict.fromkeys(cfg.export.formats))
    started = time.monotonic()
    results: dict[str, Any] = {}
    artifacts: list[str] = []
    for fmt in formats:
        module, _, name = EXPORTERS[fmt].partition(":")
        events.log(f"export: {fmt}")
        results[fmt] = getattr(importlib.import_module(module), name)(cfg, run, events, should_stop)
        artifacts.append(results[fmt].get("merged") or results[fmt].get("path", ""))
    return StepResult(summary={"formats": results, "seconds": round(time.monotonic() - started, 2)},
                      artifacts=[a for a in artifacts if a])
