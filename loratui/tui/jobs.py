"""Long steps as subprocesses the App owns: ``loratui <step> --config ... --events jsonl``.

A :class:`Job` starts the command in its own process group (a
:class:`~loratui.pipeline.process.Supervised` command), reads its stdout as run events (one JSON
object per line; any other line becomes a log event), keeps the tail of its stderr for the error
dialog, and knows how it ended: ``done``, ``failed`` (an error event or a non-zero exit without
one), ``cancelled``. ``cancel()`` sends SIGTERM to the whole group (the step saves what it can, a
checkpoint for training, and exits 130), then SIGKILL after a grace period: no process outlives
the job, whatever it started (data-parallel workers included). Headless: no Textual import, so it
is tested with plain fake scripts; the screens subscribe through ``on_event``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loratui.pipeline.events import Error, Progress
from loratui.pipeline.process import Supervised

State = Literal["idle", "running", "done", "failed", "cancelled"]


def step_command(
    step: str, config: str | Path | None, overrides: list[str] | None = None, extra: list[str] | None = None
) -> list[str]:
    """The command line of a step as the TUI runs it (and shows it in "show command")."""
    return [
        sys.executable,
        "-m",
        "loratui",
        step,
        *(["--config", str(config)] if config else []),
        *(overrides or []),
        *(extra or []),
        "--events",
        "jsonl",
    ]


@dataclass
class Job:
    argv: list[str]
    on_event: Callable[[Any], None] | None = None
    cwd: str | Path | None = None
    env: dict[str, str] | None = None
    grace_s: float = 10.0  # SIGTERM -> SIGKILL
    events: list[Any] = field(default_factory=list)
    state: State = "idle"
    returncode: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    _proc: Supervised | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---------------------------------------------------------------------------------- control

    def start(self) -> Job:
        if self._proc is not None:
            raise RuntimeError("a Job runs once; make a new one")
        self.started_at = time.time()
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        self._proc = Supervised(self.argv, env=env, cwd=self.cwd).start()
        self.state = "running"
        reader = threading.Thread(target=self._read_stdout, daemon=True, name="job-stdout")
        reader.start()
        threading.Thread(target=self._watch, args=(reader,), daemon=True, name="job-wait").start()
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def stderr_tail(self) -> deque[str]:
        """The last lines of its stderr, for the error dialog."""
        return self._proc.stderr_tail if self._proc else deque()

    def cancel(self) -> None:
        """SIGTERM to the job's process group, SIGKILL after ``grace_s`` if it is still there."""
        if self.running and self._proc is not None:
            self._proc.cancel(self.grace_s)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()

    def wait(self, timeout: float | None = None) -> State:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "running":
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the job is still running after {timeout} s")
            time.sleep(0.02)
        return self.state

    # ---------------------------------------------------------------------------------- reading

    def _emit(self, event: Any) -> None:
        with self._lock:
            self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def _read_stdout(self) -> None:
        assert self._proc is not None
        for event in self._proc.events(log_step=self.step):
            self._emit(event)

    def _watch(self, reader: threading.Thread) -> None:
        assert self._proc is not None
        code = self._proc.wait()
        reader.join(timeout=5)
        if self._proc.group_alive():  # the step exited but left processes behind: they go with it
            self._proc.signal(signal.SIGKILL)
        self.returncode = code
        self.ended_at = time.time()
        last = self.final_event
        if last is not None and last.type == "done" and code == 0:
            self.state = "done"
        elif (last is not None and last.type == "cancelled") or self._proc.cancel_asked:
            self.state = "cancelled"
        else:
            if last is None or last.type != "error":
                tail = "\n".join(list(self.stderr_tail)[-5:]) or "no output"
                self._emit(
                    Error(step=self.step, message=f"the job ended with exit code {code}: {tail}", user_error=False)
                )
            self.state = "failed"

    # ---------------------------------------------------------------------------------- views

    @property
    def step(self) -> str:
        """The step of ``python -m loratui <step> ...``; "job" for any other command."""
        at = self.argv.index("loratui") + 1 if "loratui" in self.argv else len(self.argv)
        return self.argv[at] if at < len(self.argv) else "job"

    @property
    def final_event(self) -> Any:
        with self._lock:
            return next((e for e in reversed(self.events) if e.type in ("done", "error", "cancelled")), None)

    @property
    def error(self) -> Any:
        """The error event of a failed job (message and hint for the error dialog)."""
        with self._lock:
            return next((e for e in reversed(self.events) if e.type == "error"), None)

    def progress(self, task: str | None = None) -> Progress | None:
        """The latest progress event (of ``task``, if given)."""
        with self._lock:
            return next((e for e in reversed(self.events) if isinstance(e, Progress) and task in (None, e.task)), None)

    def events_so_far(self) -> list[Any]:
        """A copy of the events read so far (the reader thread keeps appending)."""
        with self._lock:
            return list(self.events)
