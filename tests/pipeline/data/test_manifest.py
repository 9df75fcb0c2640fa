"""dataset.json and report.json as typed records: what today's code writes loads, unknown keys survive a save."""

from __future__ import annotations

import json

import pytest

from loratui.pipeline.data.manifest import DataReport, DatasetManifest, LengthStats, RowCounts, run_render_date
from loratui.pipeline.runs import RunDir

MANIFEST = {
    "task": "causal",
    "splits": {"train": "processed/train"},
    "counts": {"train": 3, "validation": 0, "test": 0},
    "template": "chatml",
    "chat_template": "{{ messages }}",
    "render_date": "2026-01-02",
    "max_length": 64,
    "model_dir": "/models/tiny",
    "cache_key": "abc",
    "data_version": 1,
}


def test_manifest_round_trip_keeps_bytes_and_unknown_keys(tmp_path):
    text = json.dumps(MANIFEST | {"added_later": {"x": 1}}, indent=2) + "\n"
    (tmp_path / "dataset.json").write_text(text)
    manifest = DatasetManifest.load(tmp_path)
    assert manifest.splits == {"train": "processed/train"} and manifest.max_length == 64
    manifest.save(tmp_path)
    assert (tmp_path / "dataset.json").read_text() == text


def test_older_manifest_loads_with_defaults_and_saves_only_its_own_keys(tmp_path):
    old = {k: v for k, v in MANIFEST.items() if k not in ("task", "render_date")}
    (tmp_path / "dataset.json").write_text(json.dumps(old, indent=2) + "\n")
    manifest = DatasetManifest.load(tmp_path)
    assert manifest.task == "causal" and manifest.render_date is None
    manifest.model_dir = "/moved"
    manifest.save(tmp_path)
    assert json.loads((tmp_path / "dataset.json").read_text()) == old | {"model_dir": "/moved"}


def test_a_file_that_is_not_a_manifest_is_a_value_error(tmp_path):
    (tmp_path / "dataset.json").write_text("[1, 2]")
    with pytest.raises(ValueError):
        DatasetManifest.load(tmp_path)
    with pytest.raises(OSError):
        DatasetManifest.load(tmp_path / "missing")


def test_failure_report_writes_only_its_keys(tmp_path):
    report = DataReport(
        files=[],
        rows=RowCounts(read=2, kept=0, dropped=2, truncated=0),
        splits={"train": 0, "validation": 0, "test": 0},
        problems={"empty_field": 2},
        policy={"empty_field": "drop"},
        dropped=[{"kind": "empty_field", "file": "d.jsonl", "row": 1, "message": "é", "action": "dropped"}],
        truncated=[],
    )
    report.save(tmp_path)
    text = (tmp_path / "report.json").read_text(encoding="utf-8")
    assert "é" in text, "written without ASCII escapes, as before"
    assert list(json.loads(text)) == ["files", "rows", "splits", "problems", "policy", "dropped", "truncated"]
    assert DataReport.load(tmp_path) == report
    assert LengthStats(rows=0).model_dump(exclude_unset=True) == {"rows": 0}


def test_run_render_date_reads_the_manifest_else_today(tmp_path, monkeypatch):
    import datetime as dt

    from loratui.pipeline.data import templates

    monkeypatch.setattr(templates, "today", lambda: dt.date(2030, 5, 6))
    run = RunDir(tmp_path)
    assert run_render_date(run) == dt.date(2030, 5, 6)
    run.data.mkdir(parents=True)
    (run.data / "dataset.json").write_text(json.dumps(MANIFEST))
    assert run_render_date(run) == dt.date(2026, 1, 2)
