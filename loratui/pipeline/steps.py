"""The step entry-point shape and the runner that every face (CLI, TUI, CI) goes through.

A step is ``run(cfg, run_dir, events, should_stop) -> StepResult``; ``run_dir`` is a
:class:`~loratui.pipeline.runs.RunDir` (its ``.path`` plus the named paths of the layout). The runner creates the run
directory, wires the event writers, turns SIGTERM/SIGINT into ``should_stop() == True`` and maps the
outcome to an exit code: 0 done, 130 cancelled, 2 user error (bad input), 1 internal error.
A step that sees ``should_stop()`` saves what it can and returns ``StepResult(status="cancelled")``
(or raises :class:`StepCancelled`).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal, Protocol, cast

from pydantic import BaseModel, Field

from loratui.pipeline import uptodate
from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink, JsonlWriter, Writer
from loratui.pipeline.registry import STEP_ACTIONS, STEP_COMMANDS, STEP_ORDER, STEPS
from loratui.pipeline.runs import RunDir

__all__ = [
    "STEP_ORDER",
    "STEPS",
    "StepResult",
    "StepFn",
    "StopFlag",
    "load_action",
    "load_command",
    "load_step",
    "run_step",
]

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_CANCELLED = 0, 1, 2, 130
# Set in the processes of a multi-process launch: rank 0 reports on stdout only (the launcher relays it
# to events.jsonl and the terminal); the other ranks report nothing.
WORKER_ENV = "LORATUI_WORKER"


class StepResult(BaseModel):
    status: Literal["done", "cancelled"] = "done"
    summary: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list)
    resume_from: str | None = None


ShouldStop = Callable[[], bool]


class StepFn(Protocol):
    def __call__(self, cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> StepResult: ...


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr or "run")


def load_step(name: str) -> StepFn:
    return cast(StepFn, _load(STEPS[name]))


def load_action(step: str, action: str) -> Callable[..., Any]:
    """A step's follow-up action (``loratui data preview``), see registry.STEP_ACTIONS."""
    return cast(Callable[..., Any], _load(STEP_ACTIONS[step][action]))


def load_command(step: str, command: str) -> Callable[..., int]:
    """A command that replaces running the step (``loratui train rollback 2``), see registry.STEP_COMMANDS."""
    return cast(Callable[..., int], _load(STEP_COMMANDS[step][command]))


STOPPING_MESSAGE = b"Stopping at the next safe point (training saves a checkpoint first)... (Ctrl-C again to abort)\n"


class StopFlag:
    """``should_stop`` for a step: set by SIGTERM/SIGINT (in the main thread) or by ``set()``.

    The first Ctrl-C is acknowledged at once with one line on stderr (a step may take a while to reach the
    next point where it looks at the flag, such as the end of a training step); SIGTERM, what the TUI and
    the jobs API send, is not.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, signum: int | None = None) -> None:
        self.signal = signum
        self._event.set()

    def install(self) -> Callable[[], None]:
        """Route SIGTERM and SIGINT to this flag; returns a function that restores the old handlers.

        A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt for an impatient user.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, _frame: Any) -> None:
            if signum == signal.SIGINT and self():
                raise KeyboardInterrupt
            # the flag first: a second Ctrl-C that comes as soon as the acknowledgement shows must abort
            self.set(signum)
            if signum == signal.SIGINT and not os.environ.get(WORKER_ENV):
                _acknowledge()

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore


def _acknowledge() -> None:
    """Say at once that Ctrl-C was heard: a plain write(2) to fd 2 (no buffers, no locks, no rich), which is
    safe wherever the signal arrived."""
    try:
        os.write(2, STOPPING_MESSAGE)
    except OSError:  # stderr closed: nothing to tell
        pass


def _write_report(cfg: RunConfig, run: RunDir, events: EventSink) -> None:
    """Bring runs/<name>/report.md (and .html) up to date; a failure there never fails the step."""
    from loratui.pipeline.report import write_report

    try:
        write_report(cfg, run)
    except Exception as e:  # noqa: BLE001 (the step's own result stands)
        events.log(f"report.md not written: {type(e).__name__}: {e}", level="warning")


def _open_run(name: str, cfg: RunConfig, writers: list[Writer] | None) -> tuple[RunDir, EventSink]:
    """The run directory (created with its config.yaml) and the sink: events.jsonl plus ``writers``. In a worker
    of a multi-process launch, rank 0 reports on stdout only and the other ranks report nothing."""
    if os.environ.get(WORKER_ENV):
        run = RunDir.for_config(cfg)
        return run, EventSink(name, [JsonlWriter(sys.stdout)] if int(os.environ.get("RANK", 0)) == 0 else [])
    if _follower(name, cfg):  # the run folder (config, events, steps.json, report) is node 0's to write
        return RunDir.for_config(cfg), EventSink(name, list(writers or []))
    run = RunDir.for_config(cfg).create(cfg)
    return run, EventSink(name, [JsonlWriter(run.events), *(writers or [])])


def _follower(name: str, cfg: RunConfig) -> bool:
    """The training launcher of a node other than node 0 (``train.nodes`` > 1): it writes nothing to the shared
    run folder."""
    if name != "train" or os.environ.get(WORKER_ENV):
        return False
    from loratui.pipeline.train import topology

    try:
        return not topology.resolve(cfg.train).leader
    except LoratuiError:
        return False  # the train step reports it


def _cancel_reason(stop: StopFlag, result: StepResult) -> str:
    """What stopped a step: a step that stops by itself without a signal is a bug to chase."""
    if stop.signal is not None:
        return f"cancelled by {signal.Signals(stop.signal).name}"
    if stop():
        return "cancelled (stop requested)"
    return f"cancelled by the step: {result.summary.get('reason', '')}"


def run_step(
    name: str,
    fn: StepFn,
    cfg: RunConfig,
    *,
    writers: list[Writer] | None = None,
    stop: StopFlag | None = None,
) -> tuple[int, StepResult | None, EventSink]:
    """Run one step with events to ``runs/<name>/events.jsonl`` plus ``writers``.

    Returns (exit code, result or None, the sink). Never raises for step failures: they become an
    ``error`` event and an exit code.
    """
    run, events = _open_run(name, cfg, writers)
    stop = stop or StopFlag()
    restore = stop.install()
    started = time.monotonic()
    try:
        # the pid lets a TUI reopening the run tell a job still running from one that died
        events.log(f"{name}: run {cfg.name} in {run.path}", level="debug", pid=os.getpid())
        # the inputs as this invocation got them (a step may resolve its config in place)
        recorded = name in uptodate.SECTIONS_OF and not os.environ.get(WORKER_ENV) and not _follower(name, cfg)
        fp = uptodate.fingerprint(cfg, name) if recorded else None
        if fp is not None:
            uptodate.record(run, name, started_with=fp)
        try:
            result = fn(cfg, run, events, stop)
        except StepCancelled as e:
            result = StepResult(status="cancelled", summary={"reason": str(e) or "cancelled"})
        if result.status == "cancelled":
            events.cancelled(message=_cancel_reason(stop, result), resume_from=result.resume_from)
            return EXIT_CANCELLED, result, events
        if fp is not None:
            uptodate.record_done(run, name, fp)
        events.done(result.summary, seconds=round(time.monotonic() - started, 3))
        if fp is not None:
            _write_report(cfg, run, events)
        return EXIT_OK, result, events
    except LoratuiError as e:
        events.error(e.message, hint=e.hint, user_error=True)
        return e.exit_code, None, events
    except KeyboardInterrupt:
        events.cancelled(message="interrupted")
        return EXIT_CANCELLED, None, events
    except Exception as e:  # a bug: keep the traceback in the event log for the report
        events.log(traceback.format_exc(), level="debug")
        events.error(
            f"{type(e).__name__}: {e}",
            hint="This is a bug in loratui; the traceback is in events.jsonl.",
            user_error=False,
        )
        return EXIT_INTERNAL, None, events
    finally:
        restore()
        events.close()
