"""The App owns the job: run, live progress, cancel with confirmation, quit while running, the error dialog."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from textual.widgets import ProgressBar, RichLog, Static

from loratui.tui.app import Confirm, ErrorDialog, create_app
from tests.tui.test_jobs import FAKE, _alive


def _app(tmp_path: Path, mode: str):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    return create_app(command=lambda step: [sys.executable, str(script), mode], grace_s=1.0)


async def _until(pilot, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await pilot.pause(0.05)


def _status(app) -> str:
    return str(app.query_one("#job-status", Static).content)


@pytest.mark.anyio
async def test_a_job_runs_and_its_progress_and_log_show(tmp_path):
    app = _app(tmp_path, "ok")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2", "r")
        await _until(pilot, lambda: app.job is not None and app.job.state == "done" and "done" in _status(app))
        assert app.query_one("#job-progress", ProgressBar).progress == 5
        lines = [str(line.text) if hasattr(line, "text") else str(line) for line in app.query_one("#job-log", RichLog).lines]
        assert any("loss=" in line for line in lines) and any("not an event" in line for line in lines)
        await pilot.press("1")  # switching steps never touches the job
        assert app.job.state == "done"


@pytest.mark.anyio
async def test_cancel_asks_then_stops_the_job(tmp_path):
    app = _app(tmp_path, "slow")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("r")
        await _until(pilot, lambda: app.job.progress() is not None)
        await pilot.press("c")
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")  # no: it goes on
        assert app.job.running
        await pilot.press("c", "y")
        await _until(pilot, lambda: not app.job.running and "cancelled" in _status(app))
        assert app.job.state == "cancelled" and "resume from ckpt-3" in _status(app)


@pytest.mark.anyio
async def test_quitting_while_a_job_runs_asks_and_leaves_no_process(tmp_path):
    app = _app(tmp_path, "stubborn")  # ignores SIGTERM: killed after the grace period
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("r")
        await _until(pilot, lambda: app.job.progress() is not None)
        job = app.job
        child = int(next(e.message.split()[1] for e in job.events if e.type == "log" and e.message.startswith("child")))
        await pilot.press("q")
        assert isinstance(app.screen, Confirm)
        await pilot.press("y")
        await _until(pilot, lambda: not job.running)
    assert job.state == "cancelled" and not _alive(job.pid)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


@pytest.mark.anyio
async def test_a_failing_job_opens_the_error_dialog(tmp_path):
    app = _app(tmp_path, "fail")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("r")
        await _until(pilot, lambda: isinstance(app.screen, ErrorDialog))
        message = str(app.screen.query_one("#error-message", Static).content)
        assert "row 3: field 'answer' is empty" in message and "Traceback" not in message
        assert "Fill it in." in str(app.screen.query_one("#error-hint", Static).content)
        await pilot.press("escape")
        assert not isinstance(app.screen, ErrorDialog) and "failed" in _status(app)
