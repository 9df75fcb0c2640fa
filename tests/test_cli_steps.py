"""`loratui <step>`: the CLI runs registered steps with events on stdout and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratui import cli
from loratui.pipeline import registry
from loratui.pipeline.events import parse_event, read_events

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_steps(monkeypatch):
    monkeypatch.setitem(registry.STEPS, "fake", "tests.fake_steps:counting")
    monkeypatch.setitem(registry.STEPS, "broken", "tests.fake_steps:bad_input")


def test_step_with_events_jsonl_on_stdout(fake_steps, tmp_path, capsys):
    code = cli.main(["fake", "--events", "jsonl", f"runs_dir={tmp_path}", "name=r1"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    events = [parse_event(line) for line in out]
    assert [e.type for e in events][-3:] == ["metric", "artifact", "done"]
    assert [e.current for e in events if e.type == "progress"] == [1, 2, 3]
    assert events[-1].summary == {"steps": 3}
    logged = read_events(tmp_path / "r1" / "events.jsonl")
    assert [e.model_dump() for e in logged] == [e.model_dump() for e in events], "file and stdout carry the same events"
    assert (tmp_path / "r1" / "config.yaml").read_text().count("name: r1") == 1


def test_step_user_error_is_one_clear_message(fake_steps, tmp_path, capsys):
    code = cli.main(["broken", "--events", "jsonl", f"runs_dir={tmp_path}"])
    assert code == 2
    captured = capsys.readouterr()
    last = parse_event(captured.out.splitlines()[-1])
    assert last.type == "error" and last.user_error and "row 3" in last.message
    assert "row 3, field 'output'" in captured.err and "hint:" in captured.err
    assert "Traceback" not in captured.err


def test_step_bad_config_exits_2_before_running(fake_steps, tmp_path, capsys):
    code = cli.main(["fake", f"runs_dir={tmp_path}", "train.lr=fast"])
    assert code == 2
    assert "train.lr" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing written for a config that does not validate"


def test_sigterm_saves_a_checkpoint_and_exits_130(tmp_path):
    script = (
        "from loratui.pipeline import registry\n"
        "registry.STEPS['slow'] = 'tests.fake_steps:until_stopped'\n"
        "from loratui.cli import main\n"
        f"raise SystemExit(main(['slow', '--events', 'jsonl', 'runs_dir={tmp_path}', 'name=s']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    first = json.loads(proc.stdout.readline())  # wait until the step is working
    assert first["type"] in ("log", "progress")
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    events = [parse_event(line) for line in rest.splitlines()]
    assert events[-1].type == "cancelled"
    ckpt = Path(events[-1].resume_from)
    assert (ckpt / "state.txt").is_file()
    assert read_events(tmp_path / "s" / "events.jsonl")[-1].type == "cancelled"


STUBBORN = """
import sys, time
from loratui.pipeline import registry
from loratui.pipeline.steps import StepResult


def stubborn(cfg, run, events, should_stop):
    events.progress(1, None, unit="step")
    for _ in range(300):  # one long training step: 30 s before it looks at should_stop again
        time.sleep(0.1)
    return StepResult(status="cancelled" if should_stop() else "done")


registry.STEPS["stubborn"] = "__main__:stubborn"
from loratui.cli import main
raise SystemExit(main(["stubborn", "--events", "jsonl", "runs_dir=%s", "name=s"]))
"""


def test_ctrl_c_is_acknowledged_at_once_and_ctrl_c_again_aborts(tmp_path):
    import queue
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN % tmp_path],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    err: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [err.put(line) for line in proc.stderr], daemon=True).start()
    try:
        out = [proc.stdout.readline()]
        while json.loads(out[-1])["type"] != "progress":  # the step is in its long stretch
            out.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        seen = []
        while not any("Stopping at the next safe point" in line for line in seen):
            assert time.monotonic() - sent < 5, f"no acknowledgement within 5 s of Ctrl-C; stderr so far: {seen}"
            try:
                seen.append(err.get(timeout=0.2))
            except queue.Empty:
                pass
        (line,) = [ln for ln in seen if "Stopping" in ln]
        assert (
            line.strip()
            == "Stopping at the next safe point (training saves a checkpoint first)... (Ctrl-C again to abort)"
        )
        proc.send_signal(signal.SIGINT)  # the impatient second Ctrl-C
        proc.wait(timeout=15)
        rest = proc.stdout.read()
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert time.monotonic() - sent < 15, "aborted without waiting for the step"
    events = [parse_event(line) for line in out + rest.splitlines() if line.strip()]  # stdout: events only
    assert events[-1].type == "cancelled"


def test_sigint_is_acknowledged_on_stderr_and_sigterm_is_not(capfd):
    """SIGTERM is how the TUI and the jobs API stop a step: it stops quietly, as before."""
    from loratui.pipeline.steps import StopFlag

    for signum, said in ((signal.SIGTERM, ""), (signal.SIGINT, "Stopping at the next safe point")):
        stop = StopFlag()
        restore = stop.install()
        try:
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
        finally:
            restore()
        captured = capfd.readouterr()
        assert stop() and stop.signal == signum
        assert captured.out == "" and (said in captured.err if said else captured.err == "")


def test_the_flag_is_up_before_ctrl_c_is_acknowledged(monkeypatch):
    """A user who presses Ctrl-C again as soon as the acknowledgement shows must abort. Were the flag set
    after the message, a second SIGINT landing between the two would be taken for a first one and
    ignored (seen on a loaded machine: the step then ran to its end)."""
    from loratui.pipeline import steps

    stop = steps.StopFlag()
    up_when_acknowledged = []
    monkeypatch.setattr(steps, "_acknowledge", lambda: up_when_acknowledged.append(stop()))
    restore = stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        restore()
    assert up_when_acknowledged == [True]
