"""Merged safetensors: the merge step under its format name (``loratui export --format safetensors``).

Writes ``runs/<name>/merged/`` (sharded safetensors, tokenizer, chat template, generation config,
model card), verified in transformers by the merge's parity check. A ``merged/`` that is current (made
from the same adapter with the same merge settings, every file in place) is kept as it is: right after
the merge step, exporting it costs nothing.
"""

from __future__ import annotations

from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop


def export(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    from loratui.exporters.common import ensure_merged

    return ensure_merged(cfg, run, events, should_stop)
