"""RunState: what the TUI reads from a run folder and its events.jsonl (no Textual involved)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.events import EventSink, JsonlWriter
from loratui.tui.state import RunState, last_runs, recent_runs, remember, resolve_open_target, run_dir_overrides
from tests.tui.fake_run import make_run


def _wait_exec(pid: int, word: bytes) -> None:
    """Until the child has exec'd (before that, its command line is still the parent's)."""
    import time

    deadline = time.monotonic() + 10
    while word not in open(f"/proc/{pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_steps_are_done_blocked_or_todo_from_the_artifacts(tmp_path):
    state = RunState.load(load_config(make_run(tmp_path, steps=("data",))))
    assert state.steps == {
        "data": "done",
        "train": "todo",
        "eval": "blocked",
        "merge": "blocked",
        "export": "blocked",
        "serve": "blocked",
    }
    assert state.why_blocked["merge"] == "needs a trained adapter (run Train)"
    state = RunState.load(load_config(make_run(tmp_path, steps=("data", "train"))))
    assert state.steps["eval"] == "todo" and state.steps["serve"] == "todo"


def test_the_last_invocation_of_each_step_wins(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = EventSink("train", [JsonlWriter(path)])
    sink.log("train: run x in runs/x", level="debug", pid=999_999_999)
    sink.error("out of memory", hint="lower train.batch_size")
    sink.log("train: run x in runs/x", level="debug", pid=999_999_999)
    sink.cancelled(resume_from="runs/x/checkpoints/checkpoint-4")
    sink.step = "eval"
    sink.log("eval: run x in runs/x", level="debug", pid=999_999_999)
    sink.error("no test split", hint="set data.test_ratio")
    sink.close()
    from loratui.pipeline.events import read_events

    runs = last_runs(read_events(path))
    assert runs["train"].status == "cancelled" and runs["train"].resume_from.endswith("checkpoint-4")
    assert runs["eval"].status == "failed" and runs["eval"].hint == "set data.test_ratio"


def _merge_started_by(tmp_path, pid: int) -> str:
    """The merge step's status when events.jsonl says process ``pid`` started it and nothing since."""
    from loratui.pipeline.events import read_events

    path = tmp_path / "events.jsonl"
    sink = EventSink("merge", [JsonlWriter(path)])
    sink.log("merge: run x in runs/x", level="debug", pid=pid)
    sink.close()
    return last_runs(read_events(path))["merge"].status


def test_a_run_without_a_final_event_is_running_only_while_its_process_lives(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "loratui"])
    try:
        _wait_exec(proc.pid, b"loratui")
        assert _merge_started_by(tmp_path, proc.pid) == "running"
        proc.kill()
        proc.wait()
        assert _merge_started_by(tmp_path, proc.pid) == "interrupted"
    finally:
        proc.kill()


def test_a_pid_reused_by_another_program_is_not_a_running_job(tmp_path):
    other = subprocess.Popen(["sleep", "30"])  # alive, but not loratui
    try:
        _wait_exec(other.pid, b"sleep")
        assert _merge_started_by(tmp_path, other.pid) == "interrupted"
    finally:
        other.kill()


def test_recent_runs_newest_first_without_missing_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: a\n")
    b.write_text("name: b\n")
    remember(a)
    remember(b)
    remember(a)
    assert recent_runs() == [str(a), str(b)]
    b.unlink()
    assert recent_runs() == [str(a)]


def test_open_targets(tmp_path):
    config = make_run(tmp_path)
    run = tmp_path / "runs" / "demo"
    assert resolve_open_target(run) == run / "config.yaml"
    assert resolve_open_target(config) == config
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        resolve_open_target(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such run"):
        resolve_open_target(tmp_path / "missing")
    # a run's own config is re-pointed at the folder it sits in; any other config is taken as is
    assert run_dir_overrides(run / "config.yaml") == [f"runs_dir={(tmp_path / 'runs').resolve()}"]
    assert run_dir_overrides(config) == []


def test_loratui_open_with_a_bad_target_is_a_clean_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "loratui", "open", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "no such run directory or config file" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_loss_chart_spans_a_resume_and_shows_the_current_versions_curve(tmp_path):
    import json
    from types import SimpleNamespace

    from loratui.pipeline.events import parse_event
    from loratui.tui.state import loss_curves

    def ev(kind, **fields):
        return parse_event({"step": "train", "type": kind, **fields})

    def start():
        return ev("log", level="debug", message="train: run x in runs/x", pid=999_999_999)

    def loss(at, value):
        return ev("metric", at=at, split="train", values={"loss": value})

    cancelled = [start(), *(loss(s, 5.0 - s / 10) for s in range(1, 6)), ev("cancelled")]
    curve = {"train": [[1, 4.9], [2, 4.8], [3, 4.7]], "eval": [[3, 4.5]]}  # checkpoint-3's log_history
    resumed = [
        start(),
        ev("log", message="resuming from runs/x/checkpoints/checkpoint-3", curve=curve),
        loss(4, 4.55),
        loss(5, 4.45),
        ev("metric", at=5, split="validation", values={"eval_loss": 4.4}),
    ]
    # while the resumed run goes: the steps before the checkpoint, then its own (step 4 and 5 as redone)
    train, evals = loss_curves(cancelled + resumed)
    assert train == [(1, 4.9), (2, 4.8), (3, 4.7), (4, 4.55), (5, 4.45)]
    assert evals == [(3, 4.5), (5, 4.4)]

    # finished: the curve saved with the current adapter version, the one the report and eval plot use
    run = SimpleNamespace(adapter=tmp_path / "adapter")
    done = cancelled + resumed + [ev("done")]
    assert loss_curves(done, run)[0] == train  # no saved curve (an older loratui): the events
    run.adapter.mkdir()
    (run.adapter / "loss_history.json").write_text(json.dumps({"train": [[1, 1.0], [2, 0.5]], "eval": []}))
    assert loss_curves(done, run) == ([(1, 1.0), (2, 0.5)], [])  # e.g. after a rollback to another version
    # a later invocation that failed before training leaves the chart on the current version
    assert loss_curves(done + [start(), ev("error", message="bad")], run)[0] == [(1, 1.0), (2, 0.5)]
    # a fresh invocation going on shows only its own points, never mixed with the version's
    assert loss_curves(done + [start(), loss(1, 9.0)], run)[0] == [(1, 9.0)]
