"""The TUI shell: step bar over the resolved config, driven with Textual's Pilot."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import ContentSwitcher, Tabs

from loratui.pipeline.config import load_config
from loratui.pipeline.steps import STEP_ORDER
from loratui.tui.app import create_app

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def _text(widget) -> str:
    content = widget.content  # a rich Syntax for the config block, text for titles
    return getattr(content, "code", str(content))


@pytest.mark.anyio
async def test_step_bar_lists_the_six_steps_and_switches():
    app = create_app(load_config(QUICKSTART), config_path=QUICKSTART)
    async with app.run_test(size=(100, 30)) as pilot:
        tabs = app.query_one("#stepbar", Tabs)
        labels = [str(t.label) for t in tabs.query("Tab")]
        assert labels == ["1 Data", "2 Train", "3 Evaluate", "4 Merge", "5 Export", "6 Serve"]
        assert app.current_step == "data"
        await pilot.press("2")
        assert app.current_step == "train"
        assert tabs.active == "tab-train"
        await pilot.press("6")
        assert app.query_one("#steps", ContentSwitcher).current == "serve"
        await pilot.press("right")  # the tab bar has focus: arrows move between steps too
        await pilot.pause()
        assert app.current_step in STEP_ORDER


@pytest.mark.anyio
async def test_panels_show_the_resolved_config():
    cfg = load_config(QUICKSTART, ["train.lr=0.00123", "lora.r=8"])
    app = create_app(cfg, config_path=QUICKSTART)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        panel = app.query_one("#train")
        shown = "\n".join(_text(w) for w in panel.query(".step-config"))
        assert "lr: 0.00123" in shown and "r: 8" in shown and "smollm2-135m-instruct" in shown
        assert "quickstart" in app.sub_title


@pytest.mark.anyio
async def test_q_quits():
    app = create_app()
    async with app.run_test() as pilot:
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0 or app.return_code is None
    assert not app.is_running


def test_every_step_has_a_panel_description():
    from loratui.tui.app import STEP_INFO

    assert tuple(STEP_INFO) == STEP_ORDER
