"""The process supervisor, driven by small fake scripts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loratui.pipeline.process import Supervised, alive, command_line, owned, stop_group

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")

# Starts a grandchild (a sleeping python), says both pids, then sleeps; "stubborn" ignores SIGTERM,
# "polite" exits 130 on it.
FAMILY = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(json.dumps({"pid": os.getpid(), "child": child.pid}), flush=True)
    time.sleep(60)
""")


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def _family(tmp_path: Path, mode: str, **kw) -> tuple[Supervised, dict[str, int]]:
    script = tmp_path / "family.py"
    script.write_text(FAMILY)
    proc = Supervised([sys.executable, str(script), mode], **kw).start()
    pids = json.loads(next(proc.lines()))
    return proc, pids


def test_cancel_reaches_the_grandchildren(tmp_path):
    proc, pids = _family(tmp_path, "polite")
    assert alive(pids["child"])
    proc.cancel(grace_s=10)
    assert proc.wait(10) == 130  # the command's own SIGTERM handler ran
    assert _gone(pids["child"]), "the grandchild got the group's SIGTERM"
    assert proc.cancel_asked


def test_sigterm_then_sigkill_after_the_grace_period(tmp_path):
    proc, pids = _family(tmp_path, "stubborn")
    started = time.monotonic()
    proc.cancel(grace_s=0.5)
    assert proc.running  # SIGTERM ignored: it runs through the grace period
    assert proc.wait(10) == -signal.SIGKILL
    assert time.monotonic() - started >= 0.45
    assert _gone(pids["child"])


def test_sigterm_only_without_a_grace_period(tmp_path):
    proc, _ = _family(tmp_path, "stubborn")
    proc.cancel(grace_s=None)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.5)
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL


def test_cancel_when_asks_the_callback(tmp_path):
    asked = {"stop": False}
    proc, _ = _family(tmp_path, "polite")
    proc.cancel_when(lambda: asked["stop"], grace_s=10, poll_s=0.02)
    time.sleep(0.2)
    assert proc.running and not proc.cancel_asked
    asked["stop"] = True
    assert proc.wait(10) == 130 and proc.cancel_asked


def test_lines_events_and_the_stderr_tail(tmp_path):
    event = {"t": 1.0, "step": "train", "type": "progress", "current": 1, "total": 2, "task": "train"}
    script = textwrap.dedent(f"""
        import sys
        print({json.dumps(json.dumps(event))})
        print("a plain line")
        print("")
        print("é \\xff", file=sys.stderr)
        print("last", file=sys.stderr)
    """)
    proc = Supervised([sys.executable, "-c", script], stderr_lines=1).start()
    events = list(proc.events(log_step="job"))
    assert [e.type for e in events] == ["progress", "log"]
    assert events[0].current == 1 and events[1].step == "job" and events[1].message == "a plain line"
    assert proc.wait(10) == 0
    assert list(proc.stderr_tail) == ["last"]  # the last stderr_lines lines

    skipped = Supervised([sys.executable, "-c", script]).start()
    assert [e.type for e in skipped.events()] == ["progress"]  # no log_step: other lines are left out
    skipped.wait(10)
    assert list(skipped.stderr_tail) == ["é ÿ", "last"]


def test_output_to_a_file_appends_stdout_and_stderr(tmp_path):
    log = tmp_path / "out.log"
    log.write_text("# before\n")
    script = "import sys; print('out', flush=True); print('err', file=sys.stderr)"
    proc = Supervised([sys.executable, "-c", script], output=log, env={**os.environ, "X": "1"}, cwd=tmp_path)
    assert proc.start().wait(10) == 0
    assert log.read_text().splitlines() == ["# before", "out", "err"]
    with pytest.raises(RuntimeError, match="to a file"):
        next(proc.lines())


def test_a_command_runs_once_and_a_missing_one_raises():
    proc = Supervised([sys.executable, "-c", "pass"]).start()
    with pytest.raises(RuntimeError, match="runs once"):
        proc.start()
    proc.wait(10)
    with pytest.raises(OSError):
        Supervised(["/nonexistent/loratui-test-command"]).start()


@linux_only
def test_liveness_checks_the_command_line_and_zombies(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "marker-42"])
    try:
        deadline = time.monotonic() + 10  # on a loaded machine /proc may show the pre-exec command line briefly
        while not owned(sleeper.pid, "marker-42") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert alive(sleeper.pid) and alive(sleeper.pid, "marker-42") and owned(sleeper.pid, "marker-42")
        assert not alive(sleeper.pid, "another-command") and not owned(sleeper.pid, "another-command")
        assert command_line(sleeper.pid)[-1] == "marker-42"
    finally:
        sleeper.kill()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{sleeper.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not alive(sleeper.pid) and not owned(sleeper.pid)  # a zombie: ended, not yet reaped
    sleeper.wait()
    assert not alive(sleeper.pid) and command_line(sleeper.pid) is None


@linux_only
def test_stop_group_stops_a_pid_found_on_disk(tmp_path):
    proc, pids = _family(tmp_path, "stubborn")
    started = time.monotonic()
    stop_group(proc.pid, grace_s=0.5)  # as for a pid read from a job record: SIGTERM, then SIGKILL
    assert time.monotonic() - started >= 0.45
    assert proc.wait(10) == -signal.SIGKILL and _gone(pids["child"])


@linux_only
def test_a_worker_dies_with_its_parent(tmp_path):
    parent = textwrap.dedent("""
        import signal, sys, time
        from loratui.pipeline.process import Supervised
        worker = Supervised([sys.executable, "-c", "import time; time.sleep(60)", "orphan-test"],
                            parent_death=signal.SIGTERM).start()
        print(worker.pid, flush=True)
        time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    launcher = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(launcher.stdout.readline())
    deadline = time.monotonic() + 10
    while not owned(worker, "orphan-test"):  # the shim has replaced itself with the command
        assert time.monotonic() < deadline
        time.sleep(0.02)
    launcher.kill()
    launcher.wait()
    assert _gone(worker), "the worker got SIGTERM when its parent died"
