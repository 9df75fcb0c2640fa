"""The Train view and a preference objective: the objective in the title, the reward chart (reward accuracy and
margin, train and eval) from a run's events and live from a job, none for sft, the last run's objective."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from textual.widgets import Select, Static

from loratui.pipeline.config import load_config
from loratui.pipeline.events import parse_event
from loratui.tui.app import create_app
from loratui.tui.state import curves
from loratui.tui.widgets import RewardChart
from tests.tui.fake_run import make_run
from tests.tui.test_app_jobs import _until


def _text(widget) -> str:
    return str(widget.render())


def _app(tmp_path: Path, objective: str, steps=("data", "train"), **kw):
    config = make_run(tmp_path, steps=steps, objective=objective)
    return create_app(load_config(config), config_path=config.name, **kw)


def _title(app) -> str:
    return _text(app.query_one("#train .step-title", Static))


@pytest.mark.anyio
async def test_a_dpo_run_shows_its_objective_and_reward_chart_with_the_last_values(tmp_path):
    app = _app(tmp_path, "dpo")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        assert "objective dpo (beta 0.1): preference pairs against the base" in _title(app)
        chart = app.query_one("#reward-chart", RewardChart)
        assert chart.display
        # fake_run: accuracy 0.5 + 0.45 * step / 20, margin 0.12 * step; eval every 5 steps at 0.9 of that
        assert chart.points["reward_accuracy"][-1] == (20, 0.95) and len(chart.points["reward_accuracy"]) == 20
        assert chart.points["reward_margin"][-1] == (20, 2.4)
        assert [s for s, _ in chart.points["eval_reward_accuracy"]] == [5, 10, 15, 20]
        assert chart.points["eval_reward_accuracy"][-1] == (20, 0.855)
        assert chart.points["eval_reward_margin"][-1] == (20, 2.16)
        assert _text(chart.query_one("#reward-summary")) == "reward accuracy 0.95 (eval 0.855), margin 2.4"
        # the loss chart is as for sft
        assert app.query_one("#loss-chart").train[-1] == (20, 0.15)
        summary = _text(app.query_one("#train-summary"))
        assert summary.startswith("last run: dpo (beta 0.1), 20 steps")
        assert "reward accuracy 0.95 (eval 0.855)" in summary


@pytest.mark.anyio
async def test_an_sft_run_has_no_reward_chart(tmp_path):
    app = _app(tmp_path, "sft")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        assert "objective sft: supervised" in _title(app)
        assert not app.query_one("#reward-chart").display
        assert not any(app.query_one("#reward-chart", RewardChart).points.values())
        summary = _text(app.query_one("#train-summary"))
        assert summary.startswith("last run: sft, 20 steps") and "reward" not in summary
        assert len(app.query_one("#loss-chart").train) == 20


@pytest.mark.anyio
async def test_the_objective_is_a_select_and_changing_it_changes_the_view(tmp_path):
    app = _app(tmp_path, "sft")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        select = app.query_one("#f-train--objective", Select)
        assert [value for _, value in select._options if value != Select.BLANK] == ["sft", "dpo", "orpo", "kto"]
        select.value = "dpo"
        await pilot.pause()
        assert app.cfg.train.objective == "dpo" and app.edits == {"train.objective": "dpo"}
        assert "objective dpo (beta 0.1): preference pairs against the base" in _title(app)
        chart = app.query_one("#reward-chart", RewardChart)
        assert chart.display  # empty until a preference training logs its figures
        assert _text(chart.query_one("#reward-summary")) == "rewards: no preference training yet"
        app.query_one("#f-train--mode", Select).value = "stack"
        select.value = "kto"
        await pilot.pause()
        assert "objective kto (beta 0.1): replies marked good or bad against the base with the earlier" in _title(app)
        select.value = "orpo"
        await pilot.pause()
        assert "objective orpo (beta 0.1): preference pairs plus SFT in one stage, no reference" in _title(app)
        select.value = "sft"
        await pilot.pause()
        assert "objective sft" in _title(app) and not chart.display


FAKE_DPO = textwrap.dedent("""
    import json, os, sys, time
    def emit(**e):
        print(json.dumps({"t": time.time(), "step": "train", **e}), flush=True)
    for i in range(1, 6):
        emit(type="progress", current=i, total=5, task="train", unit="steps")
        emit(type="metric", at=i, split="train",
             values={"loss": 0.7 - i / 20, "reward_accuracy": i / 5, "reward_margin": i / 2, "reward_chosen": 0.1})
        if i % 2 == 0:
            emit(type="metric", at=i, split="validation",
                 values={"eval_loss": 0.7, "eval_reward_accuracy": i / 10, "eval_reward_margin": i / 4})
        time.sleep(0.02)
    deadline = time.time() + 20
    while not os.path.exists(sys.argv[1]) and time.time() < deadline:  # the test looks at the live chart first
        time.sleep(0.02)
    emit(type="done", summary={"steps": 5}, seconds=0.1)
""")


@pytest.mark.anyio
async def test_the_reward_chart_follows_a_running_preference_job(tmp_path):
    script = tmp_path / "fake_dpo.py"
    script.write_text(FAKE_DPO)
    go = tmp_path / "go"  # the job ends once it is there; "loratui train" in its argv: a training job
    app = _app(
        tmp_path, "dpo", steps=("data",), command=lambda step: [sys.executable, str(script), str(go), "loratui", step]
    )
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        chart = app.query_one("#reward-chart", RewardChart)
        assert chart.display and not any(chart.points.values())  # no training yet
        await pilot.press("r")
        await _until(pilot, lambda: len(chart.points["reward_accuracy"]) == 5)
        assert app.job is not None and app.job.running
        assert chart.points["reward_accuracy"] == [(i, i / 5) for i in range(1, 6)]
        assert chart.points["eval_reward_margin"] == [(2, 0.5), (4, 1.0)]
        assert _text(chart.query_one("#reward-summary")) == "reward accuracy 1 (eval 0.4), margin 2.5"
        assert app.query_one("#loss-chart").train[-1] == (5, pytest.approx(0.45))
        go.touch()
        await _until(pilot, lambda: not app.job.running)


def _ev(kind: str, **fields):
    return parse_event({"step": "train", "type": kind, **fields})


def _start():
    return _ev("log", level="debug", message="train: run x in runs/x", pid=999_999_999)


def _step(at: int, accuracy: float):
    return _ev("metric", at=at, split="train", values={"loss": 1.0, "reward_accuracy": accuracy})


def test_reward_curves_span_a_resume_and_belong_to_the_current_version(tmp_path):
    cancelled = [_start(), *(_step(s, s / 10) for s in range(1, 6)), _ev("cancelled")]
    curve = {"train": [[1, 1.0], [2, 1.0], [3, 1.0]], "eval": []}  # checkpoint-3's log_history
    resumed = [_start(), _ev("log", message="resuming from checkpoint-3", curve=curve), _step(4, 0.9), _step(5, 0.8)]
    # the points up to the checkpoint from the cancelled invocation, then the resumed one's
    assert curves(cancelled + resumed)["reward_accuracy"] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9), (5, 0.8)]

    run = SimpleNamespace(adapter=tmp_path / "adapter")
    run.adapter.mkdir()
    (run.adapter / "loss_history.json").write_text(json.dumps({"train": [[1, 1.0]], "eval": []}))
    done = [*cancelled, *resumed, _ev("done", summary={"version": 2})]
    (run.adapter / "loratui.json").write_text(json.dumps({"version": 2, "objective": "dpo"}))
    found = curves(done, run)
    assert found["loss"] == [(1, 1.0)] and found["reward_accuracy"][-1] == (5, 0.8)
    # a later invocation that failed before training: still the finished one's figures
    assert curves([*done, _start(), _ev("error", message="bad")], run)["reward_accuracy"][-1] == (5, 0.8)
    # rolled back to version 1: its loss curve, and no reward figures of version 2
    (run.adapter / "loratui.json").write_text(json.dumps({"version": 1, "objective": "sft"}))
    assert curves(done, run)["reward_accuracy"] == []
    # an sft training: every reward key is there, empty
    sft = curves([_start(), _ev("metric", at=1, split="train", values={"loss": 2.0})])
    assert sft["loss"] == [(1, 2.0)] and sft["eval_reward_margin"] == [] and set(sft) >= {"reward_margin"}
