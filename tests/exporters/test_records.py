"""The exports report (exporters/records.py): written as the exporters wrote it before it had a model."""

from __future__ import annotations

import json
import math

from loratui.exporters.records import ExportReport


def test_a_report_is_written_with_the_given_keys_in_their_order(tmp_path):
    gguf_row = {"type": "q8_0", "file": "x-q8_0.gguf", "bytes": 10, "bits_per_weight": 8.5, "perplexity": 3.25}
    onnx_row = {"type": "fp32", "folder": "onnx", "bytes": 20, "max_abs_logit_diff": 1e-4, "top1_agreement": 1.0}
    for report in (
        {"merged_perplexity": 3.0, "samples": 4, "params": 100, "files": [{**gguf_row, "replies": []}]},
        {
            "builder": "onnxruntime-genai 0.9",
            "merged_perplexity": None,
            "merged_decode_tokens_per_s": 12.5,
            "params": 100,
            "stop_token_ids": [2, 7],
            "files": [{**onnx_row, "replies": [{"reply": "hi", "contains": 1.0}]}],
        },
    ):
        ExportReport(**report).save(tmp_path / "report.json")
        assert (tmp_path / "report.json").read_text() == json.dumps(report, indent=2) + "\n"


def test_keys_it_does_not_name_pass_through_and_figures_read_typed(tmp_path):
    path = tmp_path / "report.json"
    written = {
        "params": 7,
        "future_key": {"a": 1},
        "files": [{"type": "f16", "file": "x.gguf", "bytes": 3, "verdict": "refused: lost", "new": "kept"}],
    }
    path.write_text(json.dumps(written))
    report = ExportReport.load(path)
    assert report.params == 7 and report.files[0].refused and report.files[0].decode_tokens_per_s is None
    report.save(path)
    assert json.loads(path.read_text()) == written


def test_figures_that_are_not_finite_stay_as_json_writes_them(tmp_path):
    path = tmp_path / "report.json"
    row = {"type": "fp32", "folder": "onnx", "bytes": 1, "max_abs_logit_diff": float("nan")}
    ExportReport(params=1, files=[row]).save(path)
    assert "NaN" in path.read_text()
    assert math.isnan(ExportReport.load(path).files[0].max_abs_logit_diff or 0.0)


def test_a_report_with_only_files_reads_as_the_export_view_reads_it(tmp_path):
    """The TUI's test runs write reports with rows only: they read with every other figure unknown."""
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"files": [{"type": "q8_0", "file": "r-q8_0.gguf", "bytes": 2**19}]}))
    report = ExportReport.load(path)
    assert report.params is None and report.files[0].bytes == 2**19 and not report.files[0].refused
