"""The real `loratui` in a real terminal: tmux drives data -> train -> merge on a tiny model by keys.

Everything else in tests/tui drives the App through Textual's Pilot in-process. This one runs the
installed entry point in a detached tmux session (100x30), sends the keys a person would press, reads
the screen with ``tmux capture-pane`` and checks that the step bar marks each finished step, that
``q`` quits with exit status 0, and that no process of it (the TUI, its step jobs, tmux) is left.
A private tmux server (``tmux -L <unique name>``, its own config file) never touches any other tmux.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

STEP_TIMEOUT_S = 180.0  # per step; each takes a few seconds on a 2-core CPU
FAILED_TAB = re.compile(r"\d [A-Z][a-z]+ ✗")


def _loratui() -> list[str]:
    entry = Path(sys.executable).with_name("loratui")
    return [str(entry)] if entry.is_file() else [sys.executable, "-m", "loratui"]


def _stat(pid: int) -> str | None:
    """The process state letter (``R``, ``S``, ``Z`` ...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _stat(pid) not in (None, "Z", "X")


def _marked(marker: str) -> dict[int, str]:
    """Live processes whose environment carries ``marker`` -> their command line: everything the pane
    started, whatever it forked or detached (the step jobs run in sessions of their own)."""
    needle = marker.encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if _alive(int(entry.name)):
            found[int(entry.name)] = cmdline
    return found


class Tmux:
    """One private tmux server running one session; its pane runs ``loratui`` and then writes its exit
    status to a file (tmux's own ``#{pane_dead_status}`` is not reliable: tmux 3.3a here sometimes never
    reaps the pane's process, which stays a zombie with the status empty)."""

    def __init__(self, tmp: Path) -> None:
        self.socket = f"loratui-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.conf = tmp / "tmux.conf"
        # remain-on-exit: a crash leaves its last screen readable instead of closing the pane
        self.conf.write_text("set -g remain-on-exit on\nset -g status off\n")
        self.status_file = tmp / "loratui.exit"
        self.session = "loratui"
        self.marker = f"LORATUI_TMUX_TEST={uuid.uuid4().hex}"
        self.screen = ""

    def __call__(self, *args: str, check: bool = True) -> str:
        # env: Python's view of it. The C-level one of a pytest process also has COLUMNS=80 and LINES=24
        # (set by GNU readline when it is loaded), and Textual takes those over the real terminal size.
        proc = subprocess.run(
            ["tmux", "-L", self.socket, "-f", str(self.conf), *args],
            capture_output=True,
            timeout=15,
            env=dict(os.environ),
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"tmux {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace').strip()}"
            )
        return proc.stdout.decode("utf-8", errors="replace")

    def start(self, cwd: Path, argv: list[str], env: list[str], width: int = 100, height: int = 30) -> list[int]:
        """Start the session; returns the pids of the tmux server and of the pane's shell."""
        command = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", self.marker, *env, *argv])
        command += f"; echo $? > {shlex.quote(str(self.status_file))}"
        self("new-session", "-d", "-s", self.session, "-x", str(width), "-y", str(height), "-c", str(cwd), command)
        return [int(x) for x in self("display-message", "-p", "-t", self.session, "#{pid} #{pane_pid}").split()]

    def capture(self) -> str:
        self.screen = self("capture-pane", "-p", "-t", self.session)
        return self.screen

    def keys(self, *keys: str) -> None:
        for key in keys:
            self("send-keys", "-t", self.session, key)
            time.sleep(0.2)

    def exit_status(self) -> str | None:
        """loratui's exit status once it has ended, else None."""
        try:
            return self.status_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def socket_path(self) -> Path:
        return Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}" / self.socket

    def wait_for(
        self, what: str, check: Callable[[str], bool], timeout: float = STEP_TIMEOUT_S, running: bool = True
    ) -> str:
        """Poll the screen until ``check(screen)``; fail at once when a step failed or (``running``) the app ended."""
        start = time.monotonic()
        while True:
            screen = self.capture()
            if check(screen):
                return screen
            elapsed = time.monotonic() - start
            problem = None
            if running and self.exit_status() is not None:
                problem = f"loratui exited with status {self.exit_status()}"
            elif FAILED_TAB.search(screen):
                problem = f"a step failed ({FAILED_TAB.search(screen).group(0)})"
            elif elapsed > timeout:
                problem = f"timed out after {timeout:.0f} s"
            if problem:
                processes = "\n".join(f"  {pid} [{_stat(pid)}] {cmd}" for pid, cmd in _marked(self.marker).items())
                pytest.fail(
                    f"waiting for {what}: {problem} ({elapsed:.1f} s).\nIts processes:\n"
                    f"{processes or '  none'}\nLast screen:\n{screen}",
                    pytrace=False,
                )
            time.sleep(0.5)


def _config(work: Path, model: Path) -> Path:
    path = work / "tiny.yaml"
    path.write_text(
        "name: tiny\n"
        "runs_dir: runs\n"
        f"model:\n  base: {json.dumps(str(model))}\n"
        "data:\n  source: quickstart\n"
        "train:\n  max_steps: 3\n  batch_size: 8\n  grad_accum: 1\n  lr: 5.0e-2\n  warmup_ratio: 0\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_data_train_merge_by_keys_in_a_real_terminal(tmp_path, tiny_llama):
    work, state = tmp_path / "work", tmp_path / "state"
    work.mkdir()
    state.mkdir()
    config = _config(work, tiny_llama)
    env = [
        f"LORATUI_STATE_DIR={state}",
        "HF_HUB_OFFLINE=1",
        "HF_DATASETS_OFFLINE=1",
        "TOKENIZERS_PARALLELISM=false",
        "LANG=C.UTF-8",
    ]

    tmux = Tmux(tmp_path)
    pids: list[int] = []
    leftovers: dict[int, str] = {}
    try:
        pids = tmux.start(work, [*_loratui(), "--config", config.name], env)
        screen = tmux.wait_for(
            "the step bar and the footer",
            lambda s: (
                "1 Data" in s and "6 Serve" in s and "No job yet" in s and "q Quit" in (s.splitlines() or [""])[-1]
            ),
            timeout=60,
        )
        lines = screen.splitlines()  # the app fills the 100x30 terminal: its footer on the last row, full width
        assert len(lines) == 30 and max(len(line.rstrip()) for line in lines) >= 98, screen

        for key, tab, step in (("1", "1 Data ✓", "data"), ("2", "2 Train ✓", "train"), ("4", "4 Merge ✓", "merge")):
            tmux.keys(key, "r")
            tmux.wait_for(f"{tab!r} and '{step} done'", lambda s, tab=tab, step=step: tab in s and f"{step} done" in s)

        screen = tmux.capture()
        stepbar = next((line for line in screen.splitlines() if "1 Data" in line), "")
        for tab in ("1 Data ✓", "2 Train ✓", "4 Merge ✓"):
            assert tab in stepbar, f"{tab!r} not in the step bar {stepbar!r}. Screen:\n{screen}"
        assert "3 Evaluate ✓" not in stepbar and "merge done" in screen, screen
        run = work / "runs" / "tiny"
        assert (run / "data" / "report.json").is_file()
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert (run / "merged" / "config.json").is_file()
        assert str(config.resolve()) in (state / "recent.json").read_text(), "recent runs go to LORATUI_STATE_DIR"

        tmux.keys("q")
        tmux.wait_for("loratui to exit after q", lambda s: tmux.exit_status() is not None, timeout=30, running=False)
        assert tmux.exit_status() == "0", f"loratui exited with status {tmux.exit_status()}. Screen:\n{tmux.capture()}"
    finally:
        tmux("kill-server", check=False)
        tmux.socket_path().unlink(missing_ok=True)  # tmux leaves its socket file behind
        deadline = time.monotonic() + 15
        while True:
            leftovers = _marked(tmux.marker)
            leftovers.update((pid, what) for pid, what in zip(pids, ("tmux server", "the pane's shell")) if _alive(pid))
            if not leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for pid in leftovers:  # never leave them behind; the test still fails below
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not leftovers, f"processes left behind after quitting: {leftovers}"
    assert subprocess.run(["tmux", "-L", tmux.socket, "ls"], capture_output=True, timeout=15).returncode != 0, (
        "the private tmux server is still up"
    )
