"""runs/<name>/report.md and report.html: built from what the steps left, sections only for what ran."""

from __future__ import annotations

import json

from loratui.pipeline.config import load_config
from loratui.pipeline.report import render_markdown, write_report
from loratui.pipeline.runs import RunDir

# a 1x1 PNG
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def _run(tmp_path):
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r"])
    run = RunDir.for_config(cfg).create(cfg)
    return cfg, run


def test_an_empty_run_has_only_its_header(tmp_path):
    cfg, run = _run(tmp_path)
    text = render_markdown(cfg, run)
    assert text.startswith("# Run `r`") and "## " not in text


def test_sections_follow_the_artifacts_and_plots_are_embedded_in_the_html(tmp_path):
    cfg, run = _run(tmp_path)
    (run.data).mkdir()
    (run.data / "report.json").write_text(json.dumps({
        "rows": {"read": 10, "kept": 9, "dropped": 1, "truncated": 0}, "splits": {"train": 7, "validation": 1, "test": 1},
        "template": "chatml", "max_length": 64, "tokens": {"per_epoch": 700},
        "files": [{"path": "a.jsonl", "split": "train", "format": "qa"}]}))
    (run.eval / "plots").mkdir(parents=True)
    (run.eval / "plots" / "metrics.png").write_bytes(PNG)
    (run.eval / "metrics.json").write_text(json.dumps({"datasets": [{
        "name": "main", "source": "a.jsonl", "split": "test", "rows": 1,
        "models": {"base": {"metrics": {"contains": 0.1, "loss": 2.0}}, "tuned": {"metrics": {"contains": 0.8, "loss": 1.5}}},
        "delta": {"contains": 0.7, "loss": -0.5}}]}))
    write_report(cfg, run)
    text = run.report.read_text()
    assert "10 rows read, 9 kept, 1 dropped" in text and "## Training" not in text and "## Exports" not in text
    assert "| contains | 0.1 | 0.8 | 0.7 (better) |" in text and "| loss | 2 | 1.5 | -0.5 (better) |" in text
    page = (run.path / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "metrics.png" not in page
    assert "<td>contains</td>" in page
