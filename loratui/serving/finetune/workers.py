"""The job workers' processes, and only them: start, stop, and stop one a previous server left running.

Four functions make the whole surface, so that a shared process supervisor can take their place:

- :func:`start_worker` starts ``python <args>`` in its own process group, its output into a file; Linux sends
  it SIGTERM when the thread that started it dies (the server dying, whatever killed it).
- :func:`terminate` sends SIGTERM to the group now (the job saves a checkpoint) and SIGKILL after a grace period.
- :func:`stop_all` does that to several at once and waits for them (the server shutting down).
- :func:`stop_leftover` stops a process by pid when its command line names the job's config (a restart).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Runs before the job's own command: the parent-death signal, then the real interpreter in the same process.
_CHILD_SHIM = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def start_worker(args: list[str], output: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``python <args>`` in a new process group, stdout and stderr appended to ``output``; raises OSError."""
    with open(output, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD_SHIM, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM to the process group now; SIGKILL after ``grace_s`` if it still runs (a thread waits, not the caller)."""
    _signal_group(proc.pid, signal.SIGTERM)
    threading.Thread(target=_kill_after, args=(proc, grace_s), daemon=True).start()


def stop_all(procs: Iterable[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM to every group, then wait for them all within ``grace_s``; SIGKILL for those still running then."""
    procs = list(procs)
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_leftover(pid: int, marker: Path, grace_s: float, announce: Callable[[], None] = lambda: None) -> bool:
    """Stop ``pid`` (SIGTERM to its group, SIGKILL after ``grace_s``) if its command line holds ``marker``,
    calling ``announce`` first; False when it is no such process (ended, or the pid is someone else's now)."""
    if not _is_ours(pid, marker):
        return False
    announce()
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        _signal_group(pid, signal.SIGKILL)
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_after(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)


def _is_ours(pid: int, marker: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(marker).encode() in cmdline


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended
