"""Snapshots (pytest-textual-snapshot, Textual pinned in pyproject.toml) of each step's view over a
finished run at 100x30, and of the main dialogs. Animations and cursor blink are off; every path shown
is relative to the test's working folder, so the SVGs do not depend on where the tests run.

After an intended change of the look: ``pytest tests/tui/test_snapshots.py --snapshot-update``, then
review the SVGs in the diff (``snapshot_report.html`` shows failures side by side).
"""

from __future__ import annotations

import time

import pytest
from textual.widgets import Input

from loratui.pipeline.config import load_config
from loratui.tui.app import LoratuiApp
from loratui.tui.dialogs import Confirm, ErrorDialog
from loratui.tui.estimate import EstimateArea
from tests.tui.fake_run import make_run
from tests.tui.test_app_jobs import _until

SIZE = (100, 30)


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")
    config = make_run(tmp_path)
    # the class itself, not create_app: no recent-runs entry with a tmp path in the open dialog
    return LoratuiApp(load_config(config.name), config_path=config.name)


def _estimated(area: EstimateArea) -> bool:
    return area.running is None and (area.estimate is not None or area.message is not None)


async def _steady(pilot) -> None:
    """No blinking cursor in any input built so far (views are built when first shown), and the Train
    view's estimate (stubbed in conftest.py: a hand-built one) shown, not "estimating..."."""
    await pilot.pause()
    await _until(pilot, lambda: all(_estimated(a) for a in pilot.app.query(EstimateArea)), timeout=10)
    for widget in pilot.app.query(Input):
        widget.cursor_blink = False
    await pilot.pause()
    # a view built on first show fills its tables over a few frames: wait until two frames 0.2 s apart agree
    # (on a loaded CI machine the Evaluate view's table was caught before it was drawn)
    deadline = time.monotonic() + 10
    before = pilot.app.export_screenshot()
    while time.monotonic() < deadline:
        await pilot.pause(0.2)
        now = pilot.app.export_screenshot()
        if now == before:
            break
        before = now


def _after(*keys: str):
    async def run_before(pilot) -> None:
        await pilot.press(*keys)
        await _steady(pilot)

    return run_before


@pytest.mark.parametrize("key", ["1", "2", "3", "4", "5", "6"])
def test_step_views(snap_compare, app, key):
    assert snap_compare(app, terminal_size=SIZE, run_before=_after(key))


def test_small_terminal(snap_compare, app):
    assert snap_compare(app, terminal_size=(80, 24), run_before=_after("2"))


def test_field_help_dialog(snap_compare, app):
    async def focus_field(pilot) -> None:
        await pilot.press("2")
        await _steady(pilot)
        pilot.app.query_one("#f-lora--r", Input).focus()
        await pilot.pause()

    assert snap_compare(app, press=["f1"], terminal_size=SIZE, run_before=focus_field)


def test_invalid_setting_inline(snap_compare, app):
    async def bad_value(pilot) -> None:
        await pilot.press("2")
        await _steady(pilot)
        rank = pilot.app.query_one("#f-lora--r", Input)
        rank.value = "big"
        rank.focus()
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=bad_value)


def test_command_dialog(snap_compare, app):
    assert snap_compare(app, press=["exclamation_mark"], terminal_size=SIZE, run_before=_after("5"))


def test_open_dialog(snap_compare, app):
    assert snap_compare(app, press=["o"], terminal_size=SIZE, run_before=_steady)


def test_confirm_dialog(snap_compare, app):
    async def ask(pilot) -> None:
        await _steady(pilot)
        pilot.app.push_screen(Confirm("Cancel train? It saves what it can (a checkpoint) and stops."))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=ask)


def test_error_dialog(snap_compare, app):
    async def fail(pilot) -> None:
        await _steady(pilot)
        pilot.app.push_screen(
            ErrorDialog(
                "data failed",
                "data/train.jsonl row 3: field 'answer' is empty",
                "Fill it in, or set data.on_problem.empty_field: drop.",
            )
        )
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=fail)
