"""Later steps reuse the prepared data quietly: `loratui run` does not repeat the data summary per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.data import step as data_step
from loratui.pipeline.data.prepare import prepare
from loratui.pipeline.events import EventSink, MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import run_step

ROWS = [{"instruction": f"Question {i}?", "output": f"Answer number {i}."} for i in range(20)]


@pytest.fixture
def cfg_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Path):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    source = tmp_path / "data.jsonl"
    # one row without an output: the data step warns about it
    source.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, {"instruction": "q"}]))

    def make():
        return load_config(
            None, [f"runs_dir={tmp_path / 'runs'}", "name=r", f"model.base={tiny}", f"data.source={source}"]
        )

    return make, source


def _data_step(cfg) -> MemoryWriter:
    mem = MemoryWriter()
    code, _, _ = run_step("data", data_step.run, cfg, writers=[mem])
    assert code == 0, [e.message for e in mem.of_type("error")]
    return mem


def _shown(mem: MemoryWriter) -> list[str]:
    """What a person sees of the data step: its log lines above debug, metrics and artifacts."""
    return [
        f"{e.type}: {getattr(e, 'message', None) or getattr(e, 'path', None) or e.values}"
        for e in mem
        if e.step == "data" and e.type in ("log", "metric", "artifact") and getattr(e, "level", "info") != "debug"
    ]


def test_a_later_step_does_not_log_the_data_summary_again(cfg_of) -> None:
    make, source = cfg_of
    first = _shown(_data_step(make()))
    assert any(str(source) in line and "alpaca" in line for line in first), first  # `loratui data` says it all
    assert any("missing_field" in line for line in first), first

    cfg = make()  # as the train step gets it
    mem = MemoryWriter()
    manifest = prepare(cfg, RunDir.for_config(cfg), EventSink("train", [mem]), lambda: False)
    assert manifest["counts"]["train"] > 0
    shown = _shown(mem)
    assert shown == [
        f"log: data: up to date ({manifest['counts']['train']} train rows, 1 dropped: see "
        f"{RunDir.for_config(cfg).data / 'report.json'})"
    ], shown
    assert not mem.of_type("progress")


def test_loratui_data_itself_still_logs_everything_on_a_cache_hit(cfg_of) -> None:
    make, source = cfg_of
    first = _shown(_data_step(make()))
    again = _shown(_data_step(make()))
    assert any("cache hit" in line for line in again)
    assert [line for line in again if "cache hit" not in line] == [line for line in first if "cache hit" not in line]


def test_a_later_step_logs_the_summary_when_the_data_changed(cfg_of) -> None:
    make, source = cfg_of
    _data_step(make())
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:12]))
    cfg = make()
    mem = MemoryWriter()
    manifest = prepare(cfg, RunDir.for_config(cfg), EventSink("train", [mem]), lambda: False)
    assert sum(manifest["counts"].values()) == 12
    shown = _shown(mem)
    assert any(str(source) in line and "alpaca" in line for line in shown), shown
    assert not any("up to date" in line for line in shown), shown
