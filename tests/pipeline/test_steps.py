"""The step runner: exit codes, final events, config.yaml, and real SIGTERM/SIGINT cancellation."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from loratui.pipeline.config import ConfigError, ConfigProblem, RunConfig, load_config
from loratui.pipeline.errors import LoratuiError, ModelNotFound, StepCancelled
from loratui.pipeline.events import MemoryWriter, read_events
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import (
    EXIT_CANCELLED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USER,
    STEP_ORDER,
    StepResult,
    StopFlag,
    run_step,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg(tmp_path) -> RunConfig:
    return RunConfig(name="unit", runs_dir=str(tmp_path / "runs"))


def _events(cfg: RunConfig):
    return read_events(RunDir.for_config(cfg).events)


def test_exit_code_constants():
    assert (EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_CANCELLED) == (0, 1, 2, 130)
    assert STEP_ORDER == ("data", "train", "eval", "merge", "export", "serve")


def test_done_step(cfg, tmp_path, capfd):
    seen = {}

    def step(c, run_dir, events, should_stop):
        seen["cfg"], seen["run_dir"], seen["stop"] = c, run_dir, should_stop()
        events.metric({"loss": 0.25}, at=1)
        return StepResult(summary={"rows": 12}, artifacts=["a"])

    mem = MemoryWriter()
    code, result, sink = run_step("data", step, cfg, writers=[mem])
    assert code == EXIT_OK
    assert result is not None and result.summary == {"rows": 12}
    assert seen["cfg"] is cfg and seen["stop"] is False
    run = RunDir.for_config(cfg)
    assert seen["run_dir"] == run
    assert run.path == tmp_path / "runs" / "unit"

    events = _events(cfg)
    assert [e.type for e in events] == ["log", "metric", "done"]
    assert all(e.step == "data" for e in events)
    done = events[-1]
    assert done.summary == {"rows": 12}
    assert isinstance(done.seconds, float) and done.seconds >= 0
    # the extra writer saw exactly the same events
    assert [e.model_dump() for e in mem] == [e.model_dump() for e in events]

    # config.yaml is the resolved config and reproduces the run
    assert run.config.is_file()
    assert run.config.read_text().startswith("# Resolved loratui config")
    assert load_config(run.config) == cfg
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "exc,code",
    [
        (ModelNotFound("no model called 'nope'", hint="run `loratui models list`"), 2),
        (LoratuiError("the data file is empty"), 2),
        (ConfigError([ConfigProblem("x.yaml", "train.lr", "got 'fast'", 3)]), 2),
    ],
    ids=["ModelNotFound", "LoratuiError", "ConfigError"],
)
def test_user_error(cfg, capfd, exc, code):
    assert exc.exit_code == code

    def step(c, run_dir, events, should_stop):
        events.log("starting")
        raise exc

    exit_code, result, _ = run_step("train", step, cfg)
    assert exit_code == code
    assert result is None
    events = _events(cfg)
    assert [e.type for e in events][-1] == "error"
    error = events[-1]
    assert error.user_error is True
    assert error.message == exc.message
    assert error.hint == exc.hint
    assert error.step == "train"
    # no traceback anywhere: not printed, not logged
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert "Traceback" not in RunDir.for_config(cfg).events.read_text()


def test_internal_error(cfg, capfd):
    def step(c, run_dir, events, should_stop):
        raise RuntimeError("boom")

    code, result, _ = run_step("merge", step, cfg)
    assert code == EXIT_INTERNAL
    assert result is None
    events = _events(cfg)
    error = events[-1]
    assert error.type == "error"
    assert error.user_error is False
    assert error.message == "RuntimeError: boom"
    assert "bug" in error.hint
    # the traceback goes to the event log (debug level), not to the terminal
    tracebacks = [e for e in events if e.type == "log" and "Traceback" in e.message]
    assert len(tracebacks) == 1 and tracebacks[0].level == "debug"
    assert "RuntimeError: boom" in tracebacks[0].message
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_step_returning_cancelled(cfg):
    def step(c, run_dir, events, should_stop):
        return StepResult(status="cancelled", resume_from="ck/3")

    code, result, _ = run_step("train", step, cfg)
    assert code == EXIT_CANCELLED == 130
    assert result is not None and result.status == "cancelled"
    last = _events(cfg)[-1]
    assert last.type == "cancelled"
    assert last.resume_from == "ck/3"
    assert not [e for e in _events(cfg) if e.type in ("done", "error")]


def test_step_raising_step_cancelled(cfg):
    def step(c, run_dir, events, should_stop):
        raise StepCancelled("user asked")

    code, result, _ = run_step("export", step, cfg)
    assert code == 130
    assert result is not None and result.status == "cancelled"
    assert result.summary == {"reason": "user asked"}
    last = _events(cfg)[-1]
    assert last.type == "cancelled"
    assert last.resume_from is None


def test_keyboard_interrupt_is_cancelled(cfg):
    def step(c, run_dir, events, should_stop):
        raise KeyboardInterrupt

    code, result, _ = run_step("train", step, cfg)
    assert code == 130 and result is None
    last = _events(cfg)[-1]
    assert last.type == "cancelled" and last.message == "interrupted"


def test_preset_stop_flag_is_seen_by_the_step(cfg):
    stop = StopFlag()
    stop.set()

    def step(c, run_dir, events, should_stop):
        assert should_stop()
        return StepResult(status="cancelled")

    assert run_step("train", step, cfg, stop=stop)[0] == 130


def test_signal_handlers_are_restored(cfg):
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    inside = {}

    def step(c, run_dir, events, should_stop):
        inside["term"] = signal.getsignal(signal.SIGTERM)
        return StepResult()

    assert run_step("data", step, cfg)[0] == 0
    assert inside["term"] is not before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_in_process_sigterm_sets_the_flag():
    stop = StopFlag()
    restore = stop.install()
    try:
        assert stop() is False
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop() is True
        assert stop.signal == signal.SIGTERM
    finally:
        restore()


def test_stop_flag_install_off_main_thread_is_a_noop():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def target():
        restore = StopFlag().install()
        result["handler"] = signal.getsignal(signal.SIGTERM)
        restore()

    t = threading.Thread(target=target)
    t.start()
    t.join()
    assert result["handler"] is before


# --------------------------------------------------------------------------------------------
# A real signal to a real process
# --------------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from loratui.pipeline.config import RunConfig
    from loratui.pipeline.steps import StepResult, run_step

    def step(cfg, run_dir, events, should_stop):
        i = 0
        while not should_stop():
            if i == 0:
                print("ready", flush=True)
            i += 1
            time.sleep(0.01)
        saved = run_dir.path / "saved.txt"
        saved.write_text(f"stopped after {i} iterations")
        events.checkpoint(saved, at=i)
        return StepResult(status="cancelled", resume_from=str(saved))

    cfg = RunConfig(name="sig", runs_dir=sys.argv[1])
    code, _result, _sink = run_step("train", step, cfg)
    sys.exit(code)
    """
)


def _wait_for_ready(proc: subprocess.Popen, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip() == "ready":
            return line
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"step never became ready; rc={proc.returncode} stdout={out!r} stderr={err!r}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_cancels_a_running_step(tmp_path, signum):
    runs = tmp_path / "runs"
    env = {**os.environ, "LORATUI_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(runs)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_ready(proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err

    run_path = runs / "sig"
    saved = run_path / "saved.txt"
    assert saved.is_file()
    assert saved.read_text().startswith("stopped after ")

    events = read_events(run_path / "events.jsonl")
    assert events[-1].type == "cancelled"
    assert events[-1].message == f"cancelled by {signal.Signals(signum).name}"  # what stopped it
    assert events[-1].resume_from == str(saved)
    assert events[-2].type == "checkpoint"
    assert not [e for e in events if e.type in ("done", "error")]
    # the file holds only complete lines
    for line in (run_path / "events.jsonl").read_text().splitlines():
        json.loads(line)
