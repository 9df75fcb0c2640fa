"""Step functions for testing the runner and the CLI wiring (registered by the tests only)."""

from __future__ import annotations

import time

from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.steps import StepResult


def counting(cfg, run, events, should_stop):
    for i in range(1, 4):
        events.progress(i, 3, unit="step")
    events.metric({"loss": 1.5}, at=3, split="train")
    out = run.path / "out.txt"
    out.write_text("ok")
    events.artifact(out, kind="test")
    return StepResult(summary={"steps": 3}, artifacts=[str(out)])


def bad_input(cfg, run, events, should_stop):
    raise LoratuiError(
        "data.jsonl, row 3, field 'output': expected text, got a number",
        hint="fix the row or set data.on_problem.wrong_type=drop",
    )


def until_stopped(cfg, run, events, should_stop):
    """Works until SIGTERM, then saves a checkpoint and reports cancelled."""
    i = 0
    while not should_stop():
        i += 1
        events.progress(i, None, unit="step")
        time.sleep(0.05)
    ckpt = run.checkpoints / f"step-{i}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.txt").write_text(str(i))
    events.checkpoint(ckpt, at=i)
    return StepResult(status="cancelled", resume_from=str(ckpt))
