"""The one supervisor of the subprocesses loratui starts: the TUI's step jobs, the fine-tuning API's job
workers, the multi-process training launcher and the exporters' converters.

A :class:`Supervised` command runs in its own process group (``start_new_session``), so a signal reaches
everything it started. Its stdout is read as lines or run events (one JSON object per line), or appended
to a log file together with its stderr; otherwise the tail of its stderr is kept. :meth:`Supervised.cancel`
is the one cancel rule: SIGTERM to the whole group (a step saves what it can and exits), SIGKILL after a
grace period. ``parent_death`` has Linux signal the child when the thread that started it dies (the
parent crashed or was killed), so workers never outlive their parent. :func:`alive` and :func:`stop_group`
serve the pids found on disk (a job record, ``events.jsonl``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

from loratui.pipeline.events import Event, Log, parse_event

# Runs in the child before its command (a preexec_fn is unsafe in a threaded parent): Linux sends it ``sig``
# (prctl PR_SET_PDEATHSIG) when the thread that started it dies; a parent that died before the prctl is
# caught by the parent pid check. Then the command replaces the shim, keeping the pid.
_PARENT_DEATH_SHIM = (
    "import ctypes, os, sys\n"
    "sig, parent = int(sys.argv[1]), int(sys.argv[2])\n"
    "ctypes.CDLL(None).prctl(1, sig)\n"
    "if os.getppid() != parent:\n"
    "    os.kill(os.getpid(), sig)\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)
_PROC = Path("/proc")


class Supervised:
    """A command in its own process group; ``start()`` runs it once."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        output: Path | None = None,
        parent_death: signal.Signals | None = None,
        stderr_lines: int = 200,
    ) -> None:
        """``env``: the child's whole environment (None: this one's). ``output``: a file its stdout and
        stderr are appended to, instead of pipes. ``parent_death``: the signal it gets when its parent dies
        (Linux only). ``stderr_lines``: how much of the piped stderr :attr:`stderr_tail` keeps."""
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.output = output
        self.parent_death = parent_death
        self.stderr_tail: deque[str] = deque(maxlen=stderr_lines)
        self.cancel_asked = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_reader: threading.Thread | None = None

    def start(self) -> Supervised:
        """Start the command; raises OSError when it cannot be started."""
        if self._proc is not None:
            raise RuntimeError("a supervised command runs once; make a new one")
        argv = self.argv
        if self.parent_death is not None and sys.platform.startswith("linux"):
            argv = [sys.executable, "-c", _PARENT_DEATH_SHIM, str(int(self.parent_death)), str(os.getpid()), *argv]
        out: IO[bytes] | int = subprocess.PIPE
        if self.output is not None:
            out = self.output.open("ab")
        try:
            self._proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT if self.output is not None else subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # its own process group: a signal reaches whatever it starts
            )
        finally:
            if not isinstance(out, int):
                out.close()  # the child holds its own copy
        if self._proc.stderr is not None:
            self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True, name="supervised-stderr")
            self._stderr_reader.start()
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the command has not been started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True until the command itself has exited (what it started may still run: see group_alive)."""
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    # ------------------------------------------------------------------------------------ output

    def lines(self) -> Iterator[str]:
        """The lines of its stdout (without the newline) until it closes; read by one consumer."""
        if self.proc.stdout is None:
            raise RuntimeError("the output goes to a file, not to a pipe")
        for raw in self.proc.stdout:
            yield raw.decode("utf-8", errors="replace").rstrip("\r\n")

    def events(self, log_step: str | None = None) -> Iterator[Event]:
        """Its stdout as run events; a line that is not one becomes a log event of ``log_step``, or is
        skipped without one (blank lines always are)."""
        for line in self.lines():
            text = line.strip()
            if not text:
                continue
            try:
                yield parse_event(text)
            except ValueError:
                if log_step is not None:
                    yield Log(step=log_step, message=text)

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            self.stderr_tail.append(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def wait(self, timeout: float | None = None) -> int:
        """The exit code, once the command has exited and its stderr is read; raises
        subprocess.TimeoutExpired after ``timeout`` seconds."""
        code = self.proc.wait(timeout)
        if self._stderr_reader is not None:
            self._stderr_reader.join(timeout=5)
        return code

    # ------------------------------------------------------------------------------------ stopping

    def signal(self, sig: int) -> None:
        """Send ``sig`` to its whole process group (nothing when the group is gone)."""
        signal_group(self.pid, sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.cancel_asked = True
        self.signal(signal.SIGKILL)

    def group_alive(self) -> bool:
        """True while any process of its group is there (the command, or what it left behind)."""
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def cancel(self, grace_s: float | None) -> None:
        """SIGTERM to the group now, SIGKILL once ``grace_s`` seconds have passed with the command or anything
        of its group still there (in a thread: this returns at once). ``grace_s=None``: SIGTERM only."""
        self.cancel_asked = True
        self.terminate()
        if grace_s is not None:
            threading.Thread(target=self._kill_after, args=(grace_s,), daemon=True, name="supervised-kill").start()

    def _kill_after(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not self.running and not self.group_alive():
                return
            time.sleep(0.05)
        self.signal(signal.SIGKILL)

    def cancel_when(self, should_stop: Callable[[], bool], grace_s: float | None, poll_s: float = 0.2) -> None:
        """Cancel (``cancel(grace_s)``) as soon as ``should_stop()`` says so while the command runs; a thread
        asks every ``poll_s`` seconds."""

        def watch() -> None:
            while self.running:
                if should_stop():
                    self.cancel(grace_s)
                    return
                time.sleep(poll_s)

        threading.Thread(target=watch, daemon=True, name="supervised-stop").start()


# ---------------------------------------------------------------------------------- pids found on disk


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (nothing when it is gone or not ours)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def command_line(pid: int) -> list[str] | None:
    """The arguments of process ``pid`` from /proc; None where it is gone or /proc cannot tell."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode("utf-8", errors="replace").rstrip("\0").split("\0") if raw else None


def _state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, Z ...), None when it cannot be read."""
    try:
        return (_PROC / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def alive(pid: int, marker: str | None = None) -> bool:
    """True when ``pid`` is a running process (a zombie has ended) whose command line contains ``marker``:
    not a recycled pid of something else. Without /proc (macOS) only the pid itself is checked."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False
    if not _PROC.is_dir():
        return True
    return owned(pid, marker)


def owned(pid: int, marker: str | None = None) -> bool:
    """True only when /proc shows ``pid`` running (not a zombie) with ``marker`` in its command line: the
    check before signalling a pid read from disk."""
    if _state(pid) in (None, "Z", "X"):
        return False
    if marker is None:
        return True
    argv = command_line(pid)
    return argv is not None and any(marker in arg for arg in argv)


def stop_group(pid: int, grace_s: float) -> None:
    """SIGTERM to the group of ``pid`` (a step saves what it can), SIGKILL after ``grace_s`` seconds if ``pid``
    is still running; waits. For a process this one did not start: check :func:`owned` first."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and owned(pid):
        time.sleep(0.2)
    if owned(pid):
        signal_group(pid, signal.SIGKILL)
