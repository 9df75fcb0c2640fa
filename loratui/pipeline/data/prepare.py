"""The data step run for a later step, which then reads its manifest."""

from __future__ import annotations

from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.manifest import DatasetManifest
from loratui.pipeline.data.step import run
from loratui.pipeline.events import EventSink
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import ShouldStop


def prepare(cfg: RunConfig, run_dir: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    """Run the data step for a later step (a cache hit when nothing changed); returns its manifest's keys.

    Its events go out under the step name ``data``, through the caller's writers. When the run's data
    folder is already up to date (the data step ran with these inputs), that is one log line, not the
    data summary again: ``loratui run`` would otherwise repeat it before train, eval, merge and export.
    """
    run(cfg, run_dir, EventSink("data", events.writers), should_stop, quiet=True)
    # the keys as written: the steps that call this still read the manifest as a dict
    return DatasetManifest.load(run_dir.data).model_dump(mode="json", exclude_unset=True)
