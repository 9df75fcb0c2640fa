"""What the views show and how they take keys: numbers, sizes and shares as the run report gives them,
data text never read as markup, forms whose names never run into their values, a 120-column export
table, the chat box's temperature and history, stray typing, typing after Tab, and which file ctrl+s writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from textual.widgets import Checkbox, ContentSwitcher, DataTable, Input, Static, Tabs

from loratui.pipeline.config import load_config
from loratui.tui.app import create_app
from loratui.tui.dialogs import Confirm, OpenDialog
from tests.tui.fake_run import make_run, write_json
from tests.tui.test_app_jobs import _until


def _cells(app, table_id: str) -> list[list[str]]:
    t = app.query_one(f"#{table_id}", DataTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


def _plain(widget) -> str:
    return str(widget.render())


def _app(tmp_path: Path, **kw):
    config = make_run(tmp_path, **kw)
    return create_app(load_config(config), config_path=config.name)


def _said(app, monkeypatch) -> list[str]:
    """The app's notifications, as they are made."""
    said: list[str] = []
    monkeypatch.setattr(app, "notify", lambda message, **kw: said.append(str(message)))
    return said


# ---------------------------------------------------------------------------------- numbers


def test_numbers_for_display():
    from loratui.tui.views import fmt, percent, size

    assert [fmt(v) for v in (62.69999999999999, 24.0, 3, 0.9943, -24.68, 12345.6, 1e-05, None)] == [
        "62.7",
        "24",
        "3",
        "0.9943",
        "-24.68",
        "12346",
        "1e-05",
        "-",
    ]
    assert [percent(v) for v in (1, 1.0, 0.9843, 0.97, None)] == ["100.0%", "100.0%", "98.4%", "97.0%", "-"]
    assert [size(v) for v in (512, 4096, 144_800_000, 2**30, None)] == [
        "512 B",
        "4.0 KiB",
        "138.1 MiB",
        "1024.0 MiB",
        "-",
    ]


@pytest.mark.anyio
async def test_the_lengths_table_shows_numbers_rounded(tmp_path):
    config = make_run(tmp_path)
    report_path = tmp_path / "runs" / "demo" / "data" / "report.json"
    report = json.loads(report_path.read_text())
    report["tokens"]["train"] = {
        "rows": 40,
        "min": 18,
        "median": 31.5,
        "p95": 62.69999999999999,
        "max": 70,
        "total": 1300,
    }
    write_json(report_path, report)
    app = create_app(load_config(config), config_path=config.name)
    async with app.run_test(size=(120, 40)):
        assert _cells(app, "data-lengths") == [["train", "40", "18", "31.5", "62.7", "70", "1300"]]


# ---------------------------------------------------------------------------------- markup


@pytest.mark.anyio
async def test_the_preview_keeps_its_markers_and_data_text_is_never_markup(tmp_path):
    app = _app(tmp_path, name="demo [v2]")
    async with app.run_test(size=(120, 40)) as pilot:
        preview = app.query_one("#data-preview", Static).render()
        text = str(preview)
        assert "Trained tokens are between ⟦ and ⟧; the rest is context only" in text
        reversed_text = [text[s.start : s.end] for s in preview.spans if "reverse" in str(s.style)]
        assert reversed_text == ["At 14 Tannery Row, Ostervale.<|im_end|>"]  # the example's, not the header's
        # a run name with brackets: shown as it is, not taken for a style
        await pilot.press("5")
        assert "runs/demo [v2]/exports" in _plain(app.query_one("#export-summary"))
        await pilot.press("4")
        assert "runs/demo [v2]/merged" in _plain(app.query_one("#merge-summary"))
        await pilot.press("o")
        await pilot.pause()
        assert isinstance(app.screen, OpenDialog)
        recent = app.screen.query_one("#open-recent")
        shown = [recent.render_line(y).text for y in range(recent.size.height)]
        assert any("demo [v2].yaml" in line for line in shown), shown


# ---------------------------------------------------------------------------------- layout


@pytest.mark.anyio
async def test_evaluate_setting_names_never_run_into_their_values(tmp_path):
    app = _app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        for key, form_id in (("3", "#eval-form"), ("2", "#train-form")):
            await pilot.press(key)
            await pilot.pause()
            for row in app.query_one(form_id).query(".field-row"):
                name = row.spec.key.split(".")[-1]
                label = next(w for w in row.query(".field-label") if _plain(w))
                editor = row.editor()
                assert _plain(label) == name and label.region.height == 1, f"{row.spec.key}: the name is cut or wrapped"
                if label.region.y == editor.region.y:  # on the editor's line: a space at least before the value
                    assert len(name) < label.region.width and label.region.right <= editor.region.x, row.spec.key
                else:  # a long name: on a line of its own, above the editor
                    assert label.region.y < editor.region.y, row.spec.key
        await pilot.press("3")
        summary = _plain(app.query_one("#eval-summary"))
        assert summary == "runs/demo/adapter on cpu; decoding: strategy greedy, max_new_tokens 64"


# ---------------------------------------------------------------------------------- sizes, shares, the export table


@pytest.mark.anyio
async def test_sizes_in_mib_and_agreement_as_percentages(tmp_path):
    app = _app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("5")
        rows = _cells(app, "export-table")
        assert [r[1:4] for r in rows] == [["138.1 MiB", "-0.0003", "99.4%"], ["100.6 MiB", "+0.021", "97.0%"]]
        assert f"{144_800_000 / 2**20:.1f} MiB" == "138.1 MiB"  # as exports/report.md gives it
        await pilot.press("4")
        merge = _plain(app.query_one("#merge-summary"))
        assert "4.0 KiB of safetensors" in merge and "top-1 agreement 100.0% over 497 positions" in merge


@pytest.mark.anyio
async def test_the_export_table_shows_every_column_at_120_columns(tmp_path):
    config = make_run(tmp_path, name="smollm2-135m-instruct-support")
    write_json(
        tmp_path / "runs" / "smollm2-135m-instruct-support" / "exports" / "gguf-lora" / "report.json",
        {
            "files": [
                {
                    "type": "base f16 + LoRA f16",
                    "file": "smollm2-135m-instruct-support-lora-f16.gguf",
                    "bytes": 9_000_000,
                    "delta_perplexity": 0.00012,
                    "top1_agreement": 1.0,
                    "decode_tokens_per_s": 1234.5,
                    "key_facts": 0.8,
                }
            ]
        },
    )
    app = create_app(load_config(config), config_path=config.name)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("5")
        await pilot.pause(0.2)
        t = app.query_one("#export-table", DataTable)
        pane = app.query_one("#export-results")
        assert [str(c.label) for c in t.ordered_columns] == ["file / type", "size", "Δ ppl", "top-1", "tok/s", "facts"]
        assert t.virtual_size.width <= t.scrollable_content_region.width, "the table scrolls sideways"
        assert t.region.right <= pane.region.right
        lora = next(r for r in _cells(app, "export-table") if "base f16 + LoRA f16" in r[0].replace("\n", " "))
        assert lora[0].replace("\n", "").startswith("smollm2-135m-instruct-support-lora-f16.gguf")
        assert lora[1:] == ["8.6 MiB", "+0.00012", "100.0%", "1234", "0.8"]


# ---------------------------------------------------------------------------------- the chat box


class _Stream:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __iter__(self):
        return iter(self.lines)


@pytest.mark.anyio
async def test_the_chat_box_sends_its_temperature_and_history_as_set(tmp_path, monkeypatch):
    import urllib.request

    sent: list[dict] = []

    def urlopen(req, timeout=None):
        sent.append(json.loads(req.data))
        chunk = {"choices": [{"delta": {"content": f"answer {len(sent)}"}}]}
        return _Stream([f"data: {json.dumps(chunk)}\n".encode(), b"\n", b"data: [DONE]\n"])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    app = _app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("6")
        await pilot.pause()
        view = app.query_one("#serve")
        app.server_url, view.model_id = "http://127.0.0.1:9", "demo"  # a ready server, as /health said

        async def ask(question: str) -> dict:
            before = len(sent)
            app.query_one("#chat-input", Input).focus()
            await pilot.press(*question, "enter")
            await _until(pilot, lambda: len(sent) > before and len(view.history) % 2 == 0)
            return sent[-1]

        # the default: temperature 0 (greedy: test what was trained), each question alone
        assert "each question alone, temperature 0 (greedy)" in _plain(app.query_one("#chat-mode"))
        first = await ask("where")
        assert first["temperature"] == 0 and first["messages"] == [{"role": "user", "content": "where"}]
        assert first["model"] == "demo" and first["stream"] is True
        second = await ask("when")
        assert second["messages"] == [{"role": "user", "content": "when"}]
        # a higher temperature and the conversation kept
        app.query_one("#chat-temperature", Input).value = "0.7"
        app.query_one("#chat-keep-history", Checkbox).value = True
        await pilot.pause()
        assert "the conversation so far, temperature 0.7" in _plain(app.query_one("#chat-mode"))
        third = await ask("who")
        assert third["temperature"] == 0.7
        assert [m["content"] for m in third["messages"]] == ["where", "answer 1", "when", "answer 2", "who"]
        # "New chat" forgets it
        await pilot.click("#chat-new")
        await pilot.pause()
        fourth = await ask("why")
        assert [m["content"] for m in fourth["messages"]] == ["why"]
        # a temperature the server would refuse is not sent
        app.query_one("#chat-temperature", Input).value = "5"
        app.query_one("#chat-input", Input).focus()
        await pilot.press(*"how", "enter")
        await pilot.pause(0.2)
        assert len(sent) == 4 and "0 to 2" in _plain(app.query_one("#chat-mode"))


# ---------------------------------------------------------------------------------- keys and focus


@pytest.mark.anyio
async def test_stray_typing_with_nothing_focused_fires_no_shortcut(tmp_path):
    app = _app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.focused is app.query_one("#stepbar")  # a sensible focus from the start
        app.screen.set_focus(None)
        await pilot.press(*"helloruncq2")  # o: open, r: run, c: cancel, q: quit, 2: show Train
        await pilot.pause()
        assert app.is_running and app.screen is app.main and app.job is None and app.current_step == "data"
        footer_open = app.screen.active_bindings["o"]
        assert footer_open.binding.description == "Open" and not footer_open.enabled  # shown, dimmed
        await pilot.press("escape", "o")  # Esc focuses the step bar: the keys work again
        await pilot.pause()
        assert isinstance(app.screen, OpenDialog)
        await pilot.press("escape")
        # showing another step never leaves the focus in a field of the hidden one
        source = app.query_one("#f-data--source", Input)
        source.focus()
        app.action_show_step("train")  # as the command palette does
        await _until(pilot, lambda: app.query_one("#steps", ContentSwitcher).current == "train")
        await pilot.pause()
        assert app.focused is app.query_one("#stepbar", Tabs)
        # ctrl+q quits whatever has the focus
        app.screen.set_focus(None)
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert not app.is_running and source.value == "train.jsonl"


@pytest.mark.anyio
async def test_typing_after_tab_into_a_setting_adds_to_its_value(tmp_path):
    app = _app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        app.query_one("#f-data--dedupe").focus()
        await pilot.press("tab")
        field = app.query_one("#f-data--val_ratio", Input)
        assert app.focused is field and field.value == "0.1"
        await pilot.press("5")
        await pilot.pause()
        assert field.value == "0.15" and app.edits == {"data.val_ratio": "0.15"}


# ---------------------------------------------------------------------------------- which file ctrl+s writes


@pytest.mark.anyio
async def test_ctrl_s_in_an_opened_run_writes_the_runs_config_and_says_so(tmp_path, monkeypatch):
    from loratui.tui.state import open_run

    make_run(tmp_path)
    user_file = (tmp_path / "demo.yaml").read_text()
    path, overrides, cfg = open_run("runs/demo")  # `loratui open runs/demo`
    app = create_app(cfg, config_path=path, overrides=overrides)
    said = _said(app, monkeypatch)
    async with app.run_test(size=(120, 40)) as pilot:
        assert app.sub_title == "demo: runs/demo/config.yaml (the run's own config)"
        save = app.screen.active_bindings["ctrl+s"].binding
        assert "config file named in the title bar" in save.tooltip
        app.query_one("#f-data--val_ratio", Input).value = "0.2"
        await pilot.pause()
        await pilot.press("escape", "ctrl+s")
        await pilot.pause()
        assert said[-1].startswith("saved the settings to runs/demo/config.yaml, the run's own config")
        assert load_config(tmp_path / "runs" / "demo" / "config.yaml").data.val_ratio == 0.2
        assert (tmp_path / "demo.yaml").read_text() == user_file, "the user's file is not touched"
        # Save as... writes another file, and ctrl+s writes that one from then on
        app.action_save_as()
        await pilot.pause()
        app.screen.query_one("#save-as-path", Input).value = "mine.yaml"
        await pilot.press("enter")
        await pilot.pause()
        assert said[-1] == "saved the settings to mine.yaml" and app.sub_title == "demo: mine.yaml"
        mine = load_config(tmp_path / "mine.yaml")
        assert mine.data.val_ratio == 0.2 and Path(mine.runs_dir) == (tmp_path / "runs").resolve()
        # another existing file is replaced only when the user says so
        app.action_save_as()
        await pilot.pause()
        app.screen.query_one("#save-as-path", Input).value = "demo.yaml"
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, Confirm)
        await pilot.press("n")
        await pilot.pause()
        assert (tmp_path / "demo.yaml").read_text() == user_file and app.config_path == "mine.yaml"


@pytest.mark.anyio
async def test_without_a_config_file_the_title_says_where_ctrl_s_writes(tmp_path):
    app = create_app()
    async with app.run_test(size=(100, 30)):
        assert app.sub_title == "quickstart: default config (ctrl+s writes loratui.yaml)"


@pytest.mark.anyio
async def test_a_refused_export_row_is_marked_and_not_counted_as_verified(tmp_path):
    config = make_run(tmp_path, name="r")
    write_json(
        tmp_path / "runs" / "r" / "exports" / "gguf" / "report.json",
        {
            "files": [
                {"type": "f16", "file": "r-f16.gguf", "bytes": 2**20, "top1_agreement": 1.0, "verdict": "accepted"},
                {
                    "type": "q8_0",
                    "file": "r-q8_0.gguf",
                    "bytes": 2**19,
                    "top1_agreement": 0.4,
                    "verdict": "refused: r-q8_0.gguf: picks another token than the merged model at 9 of 10 positions",
                },
            ]
        },
    )
    app = create_app(load_config(config), config_path=config.name)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("5")
        await pilot.pause(0.2)
        names = [r[0].replace("\n", "") for r in _cells(app, "export-table")]
        assert any(n.startswith("r-q8_0.gguf (refused)") for n in names)
        assert any(n.startswith("r-f16.gguf") and "refused" not in n for n in names)
        summary = _plain(app.query_one("#export-summary"))
        assert "1 verified file(s)" in summary and "1 refused (not written" in summary
