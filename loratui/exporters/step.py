"""The export step: every format of ``export.formats`` (or ``--format``), each verified in its runtime."""

from __future__ import annotations

import importlib
import time
from typing import Any

from loratui.exporters.registry import EXPORTERS
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir


def run(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: Any) -> Any:
    from loratui.pipeline.steps import StepResult

    wanted = list(dict.fromkeys(cfg.export.formats))
    formats = [f for f in wanted if f in EXPORTERS]
    missing = [f for f in wanted if f not in EXPORTERS]
    if missing and not formats:
        raise LoratuiError(f"export.formats: {', '.join(missing)} cannot be exported by this version of loratui yet "
                           f"(available: {', '.join(EXPORTERS)})", hint="Run `loratui export --format safetensors`.")
    if missing:
        events.log(f"export: skipping {', '.join(missing)}: not available in this version yet "
                   f"(available: {', '.join(EXPORTERS)})", level="warning")
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
