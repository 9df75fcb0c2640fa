"""The Train view's estimate before ``r``: computed in a thread when the view is shown (the pipeline's
estimate, stubbed by ``estimates`` in conftest.py), its verdict and what would fit, an error's message and
hint in the area, ``e`` for the probe (its progress; ``c`` and leaving the view stop it), and an estimate of
settings changed meanwhile never shown."""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from textual.widgets import Input

from loratui.pipeline.config import load_config
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.estimate.plan import estimate as real_estimate
from loratui.tui.app import create_app
from loratui.tui.estimate import EstimateArea
from loratui.tui.views.train import TrainView
from tests.tui.fake_run import fake_estimate, make_run
from tests.tui.test_app_jobs import _until
from tests.tui.test_jobs import FAKE


def _app(tmp_path: Path):
    config = make_run(tmp_path)
    return create_app(load_config(config), config_path=config.name)


def _text(app) -> str:
    """The estimate area as plain text, one line per line of what it shows (printed wide: nothing wraps),
    spaces and borders squeezed: the tests look for phrases."""
    found = app.query(EstimateArea)
    if not found:
        return ""
    console = Console(width=400, file=io.StringIO(), record=True, color_system=None)
    console.print(found.first().content)
    return " ".join(console.export_text().replace("│", " ").split())


async def _shown(pilot, app, phrase: str) -> str:
    await _until(pilot, lambda: phrase in _text(app), timeout=10)
    return _text(app)


@pytest.mark.anyio
async def test_the_train_view_shows_the_estimate_before_r(tmp_path, estimates):
    app = _app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        assert not estimates  # nothing estimated before the Train view is shown
        await pilot.press("2")
        text = await _shown(pilot, app, "fits: about 3 min 50 s in all, peak memory 1.00 GiB")
        assert "micro-batch 4 x accumulation 2" in text and "RAM available 8.00 GiB" in text
        assert "e measures a few real training steps" in text
        assert [(cfg.name, probe) for cfg, probe in estimates] == [("demo", False)]
        assert estimates[0][0] == app.cfg
        await pilot.press("1", "2")  # shown again, same settings: the estimate stands
        await pilot.pause(0.2)
        assert len(estimates) == 1 and "fits: about" in _text(app)


@pytest.mark.anyio
async def test_a_run_that_does_not_fit_says_so_and_what_would(tmp_path, estimates):
    estimates.outcome = fake_estimate(fits=False)
    app = _app(tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("2")
        text = await _shown(pilot, app, "does not fit: needs 1.00 GiB of memory, RAM available 0.50 GiB")
        assert "would fit: QLoRA (4-bit base) (lora.method=qlora): memory 0.33 GiB" in text


@pytest.mark.anyio
async def test_the_whole_panel_where_it_fits(tmp_path, estimates):
    app = _app(tmp_path)
    async with app.run_test(size=(200, 40)) as pilot:
        await pilot.press("2")
        text = await _shown(pilot, app, "fits: about")
        assert "estimate (analytic: about a factor of 2 (no probe))" in text  # the panel's title
        assert "total 3 min 50 s RAM available 8.00 GiB" in text  # its table's last row


@pytest.mark.anyio
async def test_an_error_shows_its_message_and_hint_in_the_area(tmp_path, estimates):
    estimates.outcome = LoratuiError("model 'nope' not found", hint="Run `loratui models list` to see them.")
    app = _app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        text = await _shown(pilot, app, "estimate: model 'nope' not found")
        assert "hint: Run `loratui models list` to see them." in text
        assert app.screen is app.main  # no dialog, no traceback
        # a bug in the estimate: one line, never a traceback, and the app goes on
        estimates.outcome = ZeroDivisionError("division by zero")
        await pilot.press("1", "2")  # no estimate of these settings: shown again, estimated again
        text = await _shown(pilot, app, "estimate: ZeroDivisionError: division by zero")
        assert "Traceback" not in text and app.is_running and len(estimates) == 2


@pytest.mark.anyio
async def test_e_measures_with_the_probe_and_shows_its_progress(tmp_path, estimates):
    app = _app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        estimates.hold = threading.Event()
        await pilot.press("e")  # from the Data view: it shows the Train view and measures there
        text = await _shown(pilot, app, "measuring a few training steps")
        assert "probe 1/3 steps" in text and app.current_step == "train"
        assert [probe for _, probe in estimates] == [True]  # the probe only, not the estimate without it too
        estimates.outcome = fake_estimate(source="probe")
        estimates.hold.set()
        text = await _shown(pilot, app, "measured with a probe of a few real steps; e measures again")
        assert "fits: about" in text and "measuring" not in text


async def _probing(pilot, app, estimates, monkeypatch) -> list[str]:
    """The Train view with its estimate shown, then ``e``: a probe that runs until ``estimates.hold`` is set.
    Returns the list the app's notifications go to."""
    said: list[str] = []
    monkeypatch.setattr(app, "notify", lambda message, **kw: said.append(str(message)))
    await pilot.press("2")
    await _shown(pilot, app, "fits: about")
    estimates.hold = threading.Event()
    await pilot.press("e")
    await _shown(pilot, app, "measuring a few training steps")
    return said


@pytest.mark.anyio
async def test_c_and_leaving_the_view_stop_the_probe(tmp_path, estimates, monkeypatch):
    app = _app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        said = await _probing(pilot, app, estimates, monkeypatch)
        await pilot.press("c")
        await _until(pilot, lambda: estimates.stopped == [True])
        text = await _shown(pilot, app, "the probe was cancelled (c)")
        assert "fits: about" in text and "measuring" not in text  # the estimate without the probe stays
        assert said == ["cancelled the estimate's probe"] and app.screen is app.main  # no "cancel the job?"
        await pilot.press("e")
        await _shown(pilot, app, "measuring a few training steps")
        await pilot.press("1")
        await _until(pilot, lambda: estimates.stopped == [True, True])
        await pilot.press("c")  # nothing left to cancel
        await pilot.pause()
        assert said[-1] == "no job is running"


@pytest.mark.anyio
async def test_an_estimate_of_settings_changed_meanwhile_is_never_shown(tmp_path, estimates):
    def answer(cfg, probe):
        if cfg.train.lr != 3e-4:  # the old settings' estimate: it comes back last, after the new one
            time.sleep(0.5)
        return fake_estimate(fits=cfg.train.lr != 3e-4)

    estimates.outcome, estimates.hold, estimates.ignore_stop = answer, threading.Event(), True
    app = _app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        await _shown(pilot, app, "estimating time, memory and disk")
        app.query_one("#f-train--lr", Input).value = "0.0003"
        await _shown(pilot, app, "the settings changed: estimating them again")
        await _until(pilot, lambda: len(estimates) == 2)  # once the settings rest
        assert estimates[1][0].train.lr == 3e-4 and estimates[1][0] == app.cfg
        estimates.hold.set()
        await _until(pilot, lambda: estimates.returned == 2)
        await pilot.pause(0.1)
        text = _text(app)
        assert "does not fit" in text and "fits: about" not in text


@pytest.mark.anyio
async def test_the_real_estimate_of_a_tiny_model(tmp_path, tiny_llama, monkeypatch):
    """The pipeline's own estimate (no probe) behind the view: a tiny random model, the bundled data."""
    from loratui.pipeline.estimate import plan

    monkeypatch.setattr(plan, "estimate", real_estimate)
    config = make_run(tmp_path)
    cfg = load_config(config, [f"model.base={tiny_llama}", "data.source=quickstart", "train.device=cpu"])
    app = create_app(cfg)
    async with app.run_test(size=(100, 30)) as pilot:
        started = time.monotonic()
        await pilot.press("2")
        text = await _shown(pilot, app, "fits: about")
        assert "on cpu" in text and "micro-batch" in text
        found = app.query_one(EstimateArea).estimate
        assert found is not None and found.settings["rows"] == 100 and found.time.source == "analytic"
    assert time.monotonic() - started < 30


@pytest.mark.anyio
async def test_a_job_stops_the_probe_and_no_probe_starts_beside_one(tmp_path, estimates, monkeypatch):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    app = create_app(command=lambda step: [sys.executable, str(script), "slow"], grace_s=1.0)
    async with app.run_test(size=(100, 30)) as pilot:
        said = await _probing(pilot, app, estimates, monkeypatch)
        await pilot.press("r")  # the job would compete with the probe for the device: the probe stops
        await _until(pilot, lambda: estimates.stopped == [True] and app.job is not None and app.job.running)
        await _shown(pilot, app, "the probe stopped: a job started")
        await pilot.press("e")
        await pilot.pause()
        assert len(estimates) == 2 and "is running: measure when it ends" in said[-1]
        app.job.kill()


@pytest.mark.anyio
async def test_while_training_runs_the_estimate_is_its_verdict_line(tmp_path, estimates):
    app = _app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await _shown(pilot, app, "micro-batch")
        view = app.query_one(TrainView)
        app.state.steps["train"] = "running"
        view.show_results(app.state)
        assert _text(app) == "estimate (analytic): fits: about 3 min 50 s in all, peak memory 1.00 GiB"
        app.state.steps["train"] = "done"
        view.show_results(app.state)
        assert "micro-batch" in _text(app)
