"""Jobs: steps as subprocesses speaking the events protocol, driven by small fake scripts."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

from loratui.tui.jobs import Job, step_command

FAKE = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    mode = sys.argv[1]
    def emit(**e):
        print(json.dumps({"t": time.time(), "step": "train", **e}), flush=True)
    stop = {"asked": False}
    if mode != "stubborn":
        signal.signal(signal.SIGTERM, lambda *a: stop.update(asked=True))
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode in ("slow", "stubborn"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(json.dumps({"t": time.time(), "step": "train", "type": "log", "message": f"child {child.pid}"}), flush=True)
    print("a plain line that is not an event", flush=True)
    for i in range(1, 6 if mode != "slow" and mode != "stubborn" else 10000):
        if stop["asked"]:
            emit(type="checkpoint", path="ckpt-3", at=i)
            emit(type="cancelled", message="cancelled", resume_from="ckpt-3")
            sys.exit(130)
        emit(type="progress", current=i, total=5, task="train", unit="steps")
        emit(type="metric", values={"loss": 3.0 / i}, at=i, split="train")
        time.sleep(0.02)
    if mode == "fail":
        print("Traceback: boom", file=sys.stderr, flush=True)
        emit(type="error", message="data/train.jsonl row 3: field 'answer' is empty", hint="Fill it in.")
        sys.exit(2)
    if mode == "crash":
        print("Segmentation fault (core dumped)", file=sys.stderr, flush=True)
        os._exit(139)
    emit(type="done", summary={"steps": 5}, seconds=0.1)
""")


def _job(tmp_path: Path, mode: str, **kw) -> Job:
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    seen: list = []
    job = Job([sys.executable, str(script), mode], on_event=seen.append, **kw)
    job.seen = seen  # type: ignore[attr-defined]
    return job


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited: it only waits for its parent to read the status
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_job_reports_progress_metrics_and_done(tmp_path):
    job = _job(tmp_path, "ok").start()
    assert job.wait(30) == "done" and job.returncode == 0
    assert [e.type for e in job.seen][:2] == ["log", "progress"]  # the plain line became a log event
    assert job.seen[0].message == "a plain line that is not an event"
    assert job.progress("train").current == 5 and job.progress().total == 5
    losses = [(e.at, e.values["loss"]) for e in job.events_so_far() if e.type == "metric" and "loss" in e.values]
    assert losses == [(i, 3.0 / i) for i in range(1, 6)]
    assert job.final_event.type == "done" and job.error is None


def test_a_failing_job_keeps_its_error_for_the_dialog(tmp_path):
    job = _job(tmp_path, "fail").start()
    assert job.wait(30) == "failed" and job.returncode == 2
    assert job.error.message == "data/train.jsonl row 3: field 'answer' is empty" and job.error.hint == "Fill it in."
    assert "Traceback: boom" in job.stderr_tail


def test_a_crash_without_an_error_event_becomes_one(tmp_path):
    job = _job(tmp_path, "crash").start()
    assert job.wait(30) == "failed" and job.returncode == 139
    assert "exit code 139" in job.error.message and "Segmentation fault" in job.error.message
    assert job.error.user_error is False


def test_cancel_lets_the_step_checkpoint_and_leaves_no_process(tmp_path):
    job = _job(tmp_path, "slow").start()
    while not job.progress():
        time.sleep(0.01)
    child = int(next(e.message.split()[1] for e in job.seen if e.type == "log" and e.message.startswith("child")))
    job.cancel()
    assert job.wait(30) == "cancelled" and job.returncode == 130
    assert job.final_event.resume_from == "ckpt-3" and any(e.type == "checkpoint" for e in job.seen)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)  # the step's own child went with it


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    job = _job(tmp_path, "stubborn", grace_s=0.5).start()
    while not job.progress():
        time.sleep(0.01)
    child = int(next(e.message.split()[1] for e in job.seen if e.type == "log" and e.message.startswith("child")))
    started = time.monotonic()
    job.cancel()
    assert job.wait(30) == "cancelled" and job.returncode == -9
    assert 0.4 < time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_the_step_command_is_the_cli_line():
    argv = step_command("train", "run.yaml", ["train.lr=1e-4"], ["--resume"])
    assert argv[1:] == [
        "-m",
        "loratui",
        "train",
        "--config",
        "run.yaml",
        "train.lr=1e-4",
        "--resume",
        "--events",
        "jsonl",
    ]
    job = Job(argv)
    assert job.step == "train" and job.state == "idle"


def test_a_real_step_runs_as_a_job(tmp_path, tiny_llama):
    """`loratui data` through the same path the TUI uses: real events, done, the run's report written."""
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "name": "j",
                "runs_dir": str(tmp_path / "runs"),
                "model": {"base": str(tiny_llama)},
                "data": {"source": "quickstart"},
            }
        )
    )
    job = Job(step_command("data", config), cwd=Path(__file__).parents[2]).start()
    assert job.wait(120) == "done", (job.error, list(job.stderr_tail)[-5:])
    assert (
        any(e.type == "artifact" for e in job.events) and (tmp_path / "runs" / "j" / "data" / "report.json").is_file()
    )
