"""The App owns the job: run, live progress, cancel with confirmation, quit while running, the error dialog."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from textual.widgets import ProgressBar, RichLog, Static

from loratui.tui.app import create_app
from loratui.tui.dialogs import Confirm, ErrorDialog
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


async def _run_until_progress(pilot, app) -> None:
    """Press r and wait for the job's first progress event."""
    await pilot.press("r")
    await _until(pilot, lambda: app.job is not None and app.job.progress() is not None)


def _status(app) -> str:
    return str(app.query_one("#job-status", Static).content)


@pytest.mark.anyio
async def test_a_job_runs_and_its_progress_and_log_show(tmp_path):
    app = _app(tmp_path, "ok")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2", "r")
        await _until(pilot, lambda: app.job is not None and app.job.state == "done" and "done" in _status(app))
        assert app.query_one("#job-progress", ProgressBar).progress == 5
        lines = [
            str(line.text) if hasattr(line, "text") else str(line) for line in app.query_one("#job-log", RichLog).lines
        ]
        assert any("loss=" in line for line in lines) and any("not an event" in line for line in lines)
        await pilot.press("1")  # switching steps never touches the job
        assert app.job.state == "done"


@pytest.mark.anyio
async def test_cancel_asks_then_stops_the_job(tmp_path):
    app = _app(tmp_path, "slow")
    async with app.run_test(size=(100, 30)) as pilot:
        await _run_until_progress(pilot, app)
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
        await _run_until_progress(pilot, app)
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
        # the screen is pushed before it is composed: wait for its text, not only for the screen
        await _until(pilot, lambda: isinstance(app.screen, ErrorDialog) and app.screen.query("#error-message"))
        message = str(app.screen.query_one("#error-message", Static).content)
        assert "row 3: field 'answer' is empty" in message and "Traceback" not in message
        assert "Fill it in." in str(app.screen.query_one("#error-hint", Static).content)
        await pilot.press("escape")
        assert not isinstance(app.screen, ErrorDialog) and "failed" in _status(app)


@pytest.mark.anyio
async def test_resume_runs_training_with_resume_and_the_loss_chart_follows_the_job(tmp_path):
    from loratui.pipeline.config import load_config
    from tests.tui.fake_run import make_run

    config = make_run(tmp_path, steps=("data", "train"))  # has checkpoints/checkpoint-20
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    app = create_app(
        load_config(config),
        config_path=config.name,
        command=lambda step: [sys.executable, str(script), "ok", step],
        grace_s=1.0,
    )
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("R")
        await _until(pilot, lambda: app.job is not None and not app.job.running and "done" in _status(app))
        assert app.job.argv[-2:] == ["train", "--resume"] and app.current_step == "train"
        # the fake job's losses (3/i for i = 1..5) were drawn while it ran
        assert app.query_one("#loss-chart").train[:5] == [(i, 3.0 / i) for i in range(1, 6)]


FAKE_SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"status": "ok", "model": "fake-model", "backend": "fake",
                           "serving": "fake: picked by the test"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if req["messages"][-1]["content"] == "fail":
            self.wfile.write(b'data: {"error": {"message": "generation failed", "type": "server_error"}}\\n\\n')
            return
        said = req["model"] + " heard: " + req["messages"][-1]["content"] + f" ({len(req['messages'])} messages)"
        for piece in (said[:5], said[5:]):
            self.wfile.write(("data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}) + "\\n\\n").encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\\n\\n")

print("serve: ready (fake)", file=sys.stderr, flush=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def _server_app(tmp_path: Path):
    """The app on a finished run whose "serve" starts the fake server on a free port."""
    import socket

    from loratui.pipeline.config import load_config
    from tests.tui.fake_run import make_run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = make_run(tmp_path)
    script = tmp_path / "server.py"
    script.write_text(FAKE_SERVER)
    overrides = [f"serve.port={port}"]
    return create_app(
        load_config(config, overrides),
        config_path=config.name,
        overrides=overrides,
        command=lambda step: [sys.executable, str(script), str(port)],
        grace_s=1.0,
    ), port


@pytest.mark.anyio
async def test_serve_starts_the_server_chats_with_it_streaming_and_stops_it(tmp_path):
    app, port = _server_app(tmp_path)

    def text(selector: str) -> str:
        return str(app.query_one(selector).render())

    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("6", "r")
        await _until(pilot, lambda: "ok" in text("#serve-status"))
        assert f"http://127.0.0.1:{port}" in text("#serve-status") and "backend fake" in text("#serve-status")
        server = app.server
        app.query_one("#chat-input").focus()
        await pilot.press(*"hello", "enter")
        log = app.query_one("#chat-log", RichLog)
        await _until(pilot, lambda: any("heard" in str(line.text) for line in log.lines))
        assert any("fake-model heard: hello (1 messages)" in str(line.text) for line in log.lines)
        await pilot.press(*"alone", "enter")  # by default each question goes alone
        await _until(pilot, lambda: any("alone (1 messages)" in str(line.text) for line in log.lines))
        app.query_one("#chat-keep-history").value = True  # then the conversation goes with it
        await pilot.press(*"again", "enter")
        await _until(pilot, lambda: any("again (5 messages)" in str(line.text) for line in log.lines))
        await pilot.press(*"fail", "enter")  # a failed answer takes its question back out of the history
        await _until(pilot, lambda: any("no answer" in str(line.text) for line in log.lines))
        await pilot.press(*"more", "enter")
        await _until(pilot, lambda: any("more (7 messages)" in str(line.text) for line in log.lines))
        await pilot.press("escape", "c")  # stop
        await _until(pilot, lambda: app.server is None and "stopped" in text("#serve-status"))
        assert not _alive(server.pid)


@pytest.mark.anyio
async def test_quitting_with_the_server_running_stops_it(tmp_path):
    app, _ = _server_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("6", "r")
        await _until(pilot, lambda: app.server is not None and app.server.pid is not None)
        server = app.server
        await pilot.press("q")
        assert isinstance(app.screen, Confirm)
        await pilot.press("y")
        await _until(pilot, lambda: not server.running)
    assert not _alive(server.pid)


@pytest.mark.anyio
async def test_an_app_that_ends_any_other_way_leaves_no_process(tmp_path):
    app = _app(tmp_path, "stubborn")
    async with app.run_test(size=(100, 30)) as pilot:
        await _run_until_progress(pilot, app)
        job = app.job
        app.exit()  # no question asked, as after an exception
    job.wait(timeout=10)
    assert not _alive(job.pid)
