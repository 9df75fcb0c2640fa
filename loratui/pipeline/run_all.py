"""``loratui run CONFIG``: every step of the config in order, skipping the ones already up to date.

data -> train -> eval -> merge -> export (export only when ``export.formats`` names a format). A step
is skipped when its last successful run had the same inputs and its outputs are still on disk
(:mod:`loratui.pipeline.uptodate`), so running the same config again after a crash, a Ctrl-C or a
finished run continues where it stopped: a train step that was interrupted resumes from its latest
complete checkpoint when it was started with the same settings. Each step goes through
:func:`~loratui.pipeline.steps.run_step`, exactly as its own subcommand would; the first step that
fails or is cancelled stops the run with that step's exit code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loratui.pipeline import uptodate
from loratui.pipeline.config import RunConfig
from loratui.pipeline.events import Writer
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_CANCELLED, EXIT_OK, StopFlag, load_step, run_step

ORDER: tuple[str, ...] = ("data", "train", "eval", "merge", "export")


@dataclass
class Outcome:
    step: str
    status: str  # "ran", "skipped" (up to date), "resumed", "failed", "cancelled", "not run"
    seconds: float = 0.0
    code: int = EXIT_OK


def enabled_steps(cfg: RunConfig, skip: tuple[str, ...] = ()) -> list[str]:
    steps = [s for s in ORDER if s not in skip]
    return [s for s in steps if s != "export" or cfg.export.formats]


def preflight(cfg: RunConfig, steps: list[str]) -> None:
    """Refuse, before the first step starts, a step or export format this model's family cannot take
    (:mod:`loratui.pipeline.families`): an ONNX export that cannot work must not wait for the training.
    A model that is not resolvable here yet (a built-in not prepared, a hub id not downloaded) is checked
    by each step when it gets there."""
    from loratui.pipeline.errors import ModelNotFound
    from loratui.pipeline.families import check
    from loratui.pipeline.models import resolve_model

    wanted: list[str] = [s for s in ("train", "merge") if s in steps]
    if "export" in steps:
        wanted += [f for f in dict.fromkeys(cfg.export.formats) if f != "safetensors"]
    try:
        model = resolve_model(cfg.model.base, revision=cfg.model.revision, prepare=False)
    except ModelNotFound:
        return
    check(model.path, wanted)


def _train_resumable(cfg: RunConfig, run: RunDir) -> bool:
    """An interrupted train step with these settings left a checkpoint to continue from."""
    from loratui.pipeline.train.checkpoints import complete_checkpoints

    started = uptodate.recorded(run).get("train", {}).get("started_with")
    return started == uptodate.fingerprint(cfg, "train") and bool(complete_checkpoints(run.checkpoints))


def _resume_train(step: str, step_cfg: RunConfig, run: RunDir) -> bool:
    """Set a train step without ``train.resume`` to resume when an interrupted run left a checkpoint."""
    if step != "train" or step_cfg.train.resume is not False or not _train_resumable(step_cfg, run):
        return False
    step_cfg.train.resume = "latest"
    return True


def run_all(
    cfg: RunConfig,
    *,
    writers: list[Writer] | None = None,
    stop: StopFlag | None = None,
    skip: tuple[str, ...] = (),
    force: tuple[str, ...] = (),
    announce: Callable[[int, int, str, str], Any] | None = None,
) -> tuple[int, list[Outcome]]:
    """Run the config's steps in order. ``force``: steps to run even when up to date (after a forced train,
    the steps that use the adapter are stale and run too). ``announce(index, total, step, what)`` is told
    before each step.

    Returns (exit code, one outcome per enabled step)."""
    run = RunDir.for_config(cfg)
    steps = enabled_steps(cfg, skip)
    preflight(cfg, steps)
    stop = stop or StopFlag()
    restore = stop.install()  # Ctrl-C between two steps stops the run too
    try:
        return _run_steps(cfg, run, steps, writers, stop, force, announce)
    finally:
        restore()


def _run_steps(
    cfg: RunConfig,
    run: RunDir,
    steps: list[str],
    writers: list[Writer] | None,
    stop: StopFlag,
    force: tuple[str, ...],
    announce: Callable[[int, int, str, str], Any] | None,
) -> tuple[int, list[Outcome]]:
    tell = announce or (lambda *_: None)
    outcomes: list[Outcome] = []
    for i, step in enumerate(steps, 1):
        if stop():
            outcomes += [Outcome(s, "not run") for s in steps[i - 1 :]]
            return EXIT_CANCELLED, outcomes
        step_cfg = cfg.model_copy(deep=True)  # steps resolve their config in place: never leak into the next
        forced = step in force
        if not forced and uptodate.up_to_date(step_cfg, run, step):
            outcomes.append(Outcome(step, "skipped"))
            tell(i, len(steps), step, "up to date")
            continue
        resumed = not forced and _resume_train(step, step_cfg, run)
        tell(i, len(steps), step, "resuming from the latest checkpoint" if resumed else "running")
        started = time.monotonic()
        code, _result, _events = run_step(step, load_step(step), step_cfg, writers=writers, stop=stop)
        took = round(time.monotonic() - started, 1)
        if code != EXIT_OK:
            outcomes.append(Outcome(step, "cancelled" if code == EXIT_CANCELLED else "failed", took, code))
            outcomes += [Outcome(s, "not run") for s in steps[i:]]
            return code, outcomes
        outcomes.append(Outcome(step, "resumed" if resumed else "ran", took))
    return EXIT_OK, outcomes
