"""The TUI: step bar, every step's view over a finished run, forms from the schema, help, commands, open."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from textual.widgets import ContentSwitcher, DataTable, Input, Select, SelectionList, Static, Switch, Tabs

from loratui.pipeline.config import load_config
from loratui.pipeline.registry import STEP_ORDER
from loratui.tui.app import STEP_INFO, create_app
from loratui.tui.dialogs import ErrorDialog, OpenDialog, TextDialog
from tests.tui.fake_run import make_run

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def _text(widget) -> str:
    return str(widget.render())


def _labels(app) -> list[str]:
    return [str(t.label) for t in app.query_one("#stepbar", Tabs).query("Tab")]


def _cells(app, table_id: str) -> list[list[str]]:
    t = app.query_one(f"#{table_id}", DataTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


def _finished_app(tmp_path: Path, **kw):
    config = make_run(tmp_path, **kw)
    return create_app(load_config(config), config_path=config.name)


@pytest.mark.anyio
async def test_a_new_project_steps_after_train_are_blocked_and_switchable():
    app = create_app(load_config(QUICKSTART), config_path=QUICKSTART)
    async with app.run_test(size=(100, 30)) as pilot:
        assert _labels(app) == ["1 Data", "2 Train", "3 Evaluate ·", "4 Merge ·", "5 Export ·", "6 Serve ·"]
        assert app.query_one("#tab-merge").has_class("-blocked")
        assert app.current_step == "data"
        assert not app.query("#eval"), "views are built when first shown"
        await pilot.press("3")
        assert "needs a trained adapter" in _text(app.query_one("#eval-state"))
        await pilot.press("2")
        assert app.current_step == "train" and app.query_one("#stepbar", Tabs).active == "tab-train"
        await pilot.press("6")
        assert app.query_one("#steps", ContentSwitcher).current == "serve"
        await pilot.press("3", "r")  # blocked: says why instead of starting a job
        await pilot.pause()
        assert app.job is None


@pytest.mark.anyio
async def test_every_view_renders_a_finished_run(tmp_path):
    app = _finished_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        assert _labels(app) == ["1 Data ✓", "2 Train ✓", "3 Evaluate ✓", "4 Merge ✓", "5 Export ✓", "6 Serve"]
        # data: files with the detected format, problems with row numbers, lengths, trained tokens marked
        assert _cells(app, "data-files")[0][:4] == ["train.jsonl", "train", "3", "qa"]
        problems = _cells(app, "data-problems")
        assert [(r[1], r[2], r[3]) for r in problems] == [
            ("2", "missing_field", "answer"),
            ("3", "empty_field", "answer"),
        ]
        assert _cells(app, "data-lengths") == [["train", "1", "24", "24", "24", "24", "24"]]
        preview = app.query_one("#data-preview", Static).render()
        assert "⟦At 14 Tannery Row, Ostervale.<|im_end|>⟧" in str(preview)  # the markers of preview.txt kept
        assert any("reverse" in str(span.style) for span in preview.spans)
        # jump to a problem row: the raw line of the file shows
        table = app.query_one("#data-problems", DataTable)
        table.focus()
        await pilot.press("down")
        await pilot.pause()
        assert '{"question": "Who?", "answer": ""}' in _text(app.query_one("#data-row"))
        # train: the loss curve of the last run and its checkpoint
        await pilot.press("escape", "2")
        chart = app.query_one("#loss-chart")
        assert len(chart.train) == 20 and len(chart.eval) == 4 and chart.train[-1] == (20, 0.15)
        assert "checkpoint-20: R resumes from it" in _text(app.query_one("#train-summary"))
        # evaluate: base vs tuned, and generations side by side
        await pilot.press("3")
        assert ["main", "rougeL", "0.149", "0.545", "0.396"] in _cells(app, "eval-metrics")
        replies = [_text(w) for w in app.query(".gen-reply")]
        assert "The library is in the city." in replies[0] and "Ostervale" in replies[1]
        # merge: the parity verdict; export: one row per verified file
        await pilot.press("4")
        assert "parity passed" in _text(app.query_one("#merge-summary"))
        await pilot.press("5")
        rows = _cells(app, "export-table")
        # the file (wrapped to the width left), its format and type under it, then the size as the report gives it
        assert [("".join(r[0].splitlines()[:-1]), r[0].splitlines()[-1], r[1]) for r in rows] == [
            ("demo-q8_0.gguf", "gguf q8_0", "138.1 MiB"),
            ("demo-q4_k_m.gguf", "gguf q4_k_m", "100.6 MiB"),
        ]


def test_every_step_has_a_view():
    assert tuple(STEP_INFO) == STEP_ORDER


@pytest.mark.anyio
async def test_forms_come_from_the_schema_and_validate_inline(tmp_path):
    app = _finished_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        assert isinstance(app.query_one("#f-train--lr"), Input)
        assert isinstance(app.query_one("#f-train--gradient_checkpointing"), Switch)
        assert isinstance(app.query_one("#f-lora--method"), Select)
        await pilot.press("5")
        assert isinstance(app.query_one("#f-export--formats"), SelectionList)
        await pilot.press("2")
        assert app.edits == {}, "mounting the form is not an edit"
        lr = app.query_one("#f-train--lr", Input)
        lr.value = "fast"
        await pilot.pause()
        assert "train.lr" in app.problems
        row_error = lr.parent.parent.query_one(".field-error", Static)
        assert row_error.display and "number" in _text(row_error)
        before = (tmp_path / "demo.yaml").read_text()
        for key in ("r", "ctrl+s"):  # an invalid setting: no job, nothing saved, a dialog saying which
            await pilot.press("escape", key)
            await pilot.pause()
            assert app.job is None and isinstance(app.screen, ErrorDialog)
            assert "train.lr" in _text(app.screen.query_one("#error-message"))
            await pilot.press("escape")
        assert (tmp_path / "demo.yaml").read_text() == before
        lr.value = "0.0005"
        await pilot.pause()
        assert app.problems == {} and app.cfg.train.lr == 0.0005 and app.edits == {"train.lr": "0.0005"}
        assert "unsaved" in app.sub_title
        # the equivalent command carries the edit as an override
        await pilot.press("escape", "exclamation_mark")
        await pilot.pause()
        assert isinstance(app.screen, TextDialog)
        assert "loratui train --config demo.yaml train.lr=0.0005" in _text(app.screen.query_one("#dialog-body"))
        await pilot.press("escape")
        # a switch and a select edit the config too
        app.query_one("#f-train--gradient_checkpointing", Switch).value = True
        app.query_one("#f-lora--method", Select).value = "dora"
        await pilot.pause()
        assert app.cfg.train.gradient_checkpointing and app.cfg.lora.method == "dora"
        # setting a field back to the file's value is no longer an edit
        lr.value = "0.0002"
        await pilot.pause()
        assert "train.lr" not in app.edits
        # ctrl+s writes the config; it loads back to the same settings
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved = load_config(tmp_path / "demo.yaml")
        assert saved.lora.method == "dora" and saved.train.gradient_checkpointing and app.edits == {}
        assert "unsaved" not in app.sub_title


@pytest.mark.anyio
async def test_f1_shows_the_focused_fields_help_and_else_the_keys(tmp_path):
    app = _finished_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        app.query_one("#f-lora--alpha", Input).focus()
        await pilot.press("f1")
        await pilot.pause()
        body = _text(app.screen.query_one("#dialog-body"))
        assert "lora.alpha" in body and "auto" in body
        await pilot.press("escape", "escape", "f1")
        await pilot.pause()
        assert "ctrl+p" in _text(app.screen.query_one("#dialog-body"))


@pytest.mark.anyio
async def test_open_a_run_folder_from_the_dialog_and_recent_runs(tmp_path):
    first = make_run(tmp_path, name="first", steps=("data",))
    (tmp_path / "elsewhere").mkdir()
    other = make_run(tmp_path / "elsewhere", name="other")
    app = create_app(load_config(first), config_path=first.name)
    async with app.run_test(size=(100, 30)) as pilot:
        assert _labels(app)[1] == "2 Train"
        await pilot.press("o")
        await pilot.pause()
        assert isinstance(app.screen, OpenDialog)
        assert str(first.resolve()) in app.screen.recent
        app.screen.query_one("#open-path", Input).value = str(other.parent / "runs" / "other")
        await pilot.press("enter")
        await pilot.pause(0.3)
        # a run's own config.yaml names runs_dir relative to where it ran: it is re-pointed at its folder
        assert app.cfg.name == "other" and app.state.run.path == (tmp_path / "elsewhere" / "runs" / "other").resolve()
        assert _labels(app)[:2] == ["1 Data ✓", "2 Train ✓"]
        await pilot.press("o")
        await pilot.pause()
        assert app.screen.recent[0].endswith("elsewhere/runs/other/config.yaml")
        app.screen.query_one("#open-path", Input).value = str(tmp_path / "nope")
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ErrorDialog) and "no such run" in _text(app.screen.query_one("#error-message"))


@pytest.mark.anyio
async def test_a_run_interrupted_or_still_running_elsewhere_shows_from_its_events(tmp_path):
    import subprocess
    import sys

    from loratui.pipeline.events import EventSink, JsonlWriter

    config = make_run(tmp_path, steps=("data",))
    events = tmp_path / "runs" / "demo" / "events.jsonl"
    sink = EventSink("eval", [JsonlWriter(events)])
    sink.log("eval: run demo in runs/demo", level="debug", pid=999_999_999)  # no final event: it died
    # a training job of another loratui process, still alive
    from tests.tui.test_state import _wait_exec

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "loratui", "train"])
    _wait_exec(other.pid, b"loratui")
    try:
        sink.step = "train"
        sink.log("train: run demo in runs/demo", level="debug", pid=other.pid)
        sink.progress(3, 10, task="train", unit="steps")
        sink.close()
        app = create_app(load_config(config), config_path=config.name)
        async with app.run_test(size=(100, 30)) as pilot:
            assert _labels(app)[1:3] == ["2 Train ●", "3 Evaluate !"]
            await pilot.press("3")
            assert "interrupted" in _text(app.query_one("#eval-state"))
            await pilot.pause(1.3)  # the run is followed through events.jsonl
            status = _text(app.query_one("#job-status"))
            assert f"pid {other.pid}" in status and "3/10" in status
            other.kill()
            other.wait()
            deadline = time.monotonic() + 5
            while "ended in another process" not in _text(app.query_one("#job-status")):
                assert time.monotonic() < deadline
                await pilot.pause(0.2)
            assert _labels(app)[1] == "2 Train !"
    finally:
        other.kill()


@pytest.mark.anyio
async def test_the_command_palette_offers_every_action(tmp_path):
    app = _finished_app(tmp_path)
    async with app.run_test(size=(100, 30)):
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in (
            "Run Data",
            "Run Train",
            "Show Serve",
            "Start the server",
            "Cancel the job",
            "Resume training",
            "Save settings",
            "Show command",
            "Open a run",
            "Help",
        ):
            assert title in titles


@pytest.mark.anyio
async def test_q_quits():
    app = create_app()
    async with app.run_test() as pilot:
        await pilot.press("q")
        await pilot.pause()
    assert not app.is_running


@pytest.mark.anyio
async def test_small_terminals_stack_results_over_settings(tmp_path):
    app = _finished_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert app.screen.has_class("-narrow")
        body = app.query_one("#data .step-body")
        assert body.styles.layout.name == "vertical"
    app = _finished_app(tmp_path)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        assert app.screen.has_class("-wide")


@pytest.mark.anyio
async def test_saving_writes_the_resolved_config_the_cli_reads_back(tmp_path):
    app = _finished_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        app.query_one("#f-data--val_ratio", Input).value = "0.2"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
    data = yaml.safe_load((tmp_path / "demo.yaml").read_text())
    assert data["name"] == "demo" and data["data"]["source"] == "train.jsonl" and data["data"]["val_ratio"] == 0.2
    assert load_config(tmp_path / "demo.yaml") == app.cfg


@pytest.mark.anyio
async def test_f_picks_the_training_data_from_a_file_tree(tmp_path):
    app = _finished_app(tmp_path)
    (tmp_path / "more.csv").write_text("question,answer\nWhy?,Because.\n")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2", "f")
        await pilot.pause(0.5)
        assert app.current_step == "data"
        tree = app.screen.query_one("#pick-tree")
        names = [str(node.label) for node in tree.root.children]
        assert "more.csv" in names and "train.jsonl" in names and "demo.yaml" not in names  # data files only
        tree.move_cursor(tree.root.children[names.index("more.csv")])
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.cfg.data.source.endswith("more.csv") and "data.source" in app.edits
