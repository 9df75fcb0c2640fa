"""runs/<name>/report.md and report.html: built from what the steps left, sections only for what ran."""

from __future__ import annotations

import json

from loratui.pipeline.config import load_config
from loratui.pipeline.report import render_markdown, write_report
from loratui.pipeline.runs import RunDir

# a 1x1 PNG
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


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
    (run.data / "report.json").write_text(
        json.dumps(
            {
                "rows": {"read": 10, "kept": 9, "dropped": 1, "truncated": 0},
                "splits": {"train": 7, "validation": 1, "test": 1},
                "problems": {},
                "policy": {},
                "dropped": [],
                "truncated": [],
                "template": "chatml",
                "max_length": 64,
                "tokens": {
                    **{split: {"rows": 0} for split in ("train", "validation", "test")},
                    "over_max_length": 0,
                    "per_epoch": 700,
                    "trained_per_epoch": 0,
                },
                "files": [{"path": "a.jsonl", "split": "train", "format": "qa"}],
            }
        )
    )
    (run.eval / "plots").mkdir(parents=True)
    (run.eval / "plots" / "metrics.png").write_bytes(PNG)
    (run.eval / "metrics.json").write_text(
        json.dumps(
            {
                "datasets": [
                    {
                        "name": "main",
                        "source": "a.jsonl",
                        "split": "test",
                        "rows": 1,
                        "models": {
                            "base": {"metrics": {"contains": 0.1, "loss": 2.0}},
                            "tuned": {"metrics": {"contains": 0.8, "loss": 1.5}},
                        },
                        "delta": {"contains": 0.7, "loss": -0.5},
                    }
                ]
            }
        )
    )
    write_report(cfg, run)
    text = run.report.read_text()
    assert "10 rows read, 9 kept, 1 dropped" in text and "## Training" not in text and "## Exports" not in text
    assert "| contains | 0.1 | 0.8 | 0.7 (better) |" in text and "| loss | 2 | 1.5 | -0.5 (better) |" in text
    page = (run.path / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and "metrics.png" not in page
    assert "<td>contains</td>" in page


def test_the_header_names_separate_validation_and_test_files(tmp_path):
    cfg = load_config(
        None,
        [
            f"runs_dir={tmp_path}",
            "name=r",
            "data.source=train.jsonl",
            "data.val_source=val.jsonl",
            "data.test_source=test.jsonl",
        ],
    )
    run = RunDir.for_config(cfg).create(cfg)
    assert "data `train.jsonl`, validation `val.jsonl`, test `test.jsonl`." in render_markdown(cfg, run)


def test_the_training_section_shows_the_loss_plot_only_of_the_current_version(tmp_path):
    cfg, run = _run(tmp_path)
    (run.path / "adapters").mkdir()
    versions = [
        {
            "version": v,
            "mode": "fresh",
            "method": "lora",
            "r": 8,
            "alpha": 16,
            "steps": 10,
            "lr": 1e-3,
            "effective_batch": 16,
            "metrics": {"train_loss_first": 3.0 + v, "train_loss_last": 1.0},
        }
        for v in (1, 2)
    ]

    def current(version):
        (run.path / "adapters" / "history.json").write_text(json.dumps({"current": version, "versions": versions}))

    (run.eval / "plots").mkdir(parents=True)
    (run.eval / "plots" / "loss.png").write_bytes(PNG)
    (run.eval / "metrics.json").write_text(json.dumps({"target": {"kind": "adapter", "version": 2}, "datasets": []}))
    current(2)
    text = render_markdown(cfg, run)
    assert "Adapter version 2" in text and "Training loss 5 -> 1" in text and "eval/plots/loss.png" in text
    current(1)  # rolled back: the plot (of v2's training) is not v1's curve
    text = render_markdown(cfg, run)
    assert "Adapter version 1" in text and "Training loss 4 -> 1" in text and "eval/plots/loss.png" not in text


def test_the_onnx_snippet_names_the_smallest_folder_that_passed(tmp_path):
    cfg, run = _run(tmp_path)
    (run.exports / "onnx").mkdir(parents=True)
    (run.exports / "onnx" / "report.json").write_text("{}")
    (run.exports / "onnx" / "genai_config.json").write_text("{}")
    assert f'og.Model("{run.exports / "onnx"}")' in render_markdown(cfg, run)
    (run.exports / "onnx-int8").mkdir()
    (run.exports / "onnx-int8" / "genai_config.json").write_text("{}")  # int4 was refused: not there
    text = render_markdown(cfg, run)
    assert f'og.Model("{run.exports / "onnx-int8"}")' in text and "import onnxruntime_genai as og" in text
    assert f"loratui score --model {run.exports / 'onnx'}" in text
