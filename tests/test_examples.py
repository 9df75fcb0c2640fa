"""examples/*.yaml: every config validates, and the data settings of those that read your own files work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.cli import main
from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.steps import EXIT_OK, load_step, run_step

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


def test_the_examples_are_the_documented_set():
    assert {p.stem for p in EXAMPLES} >= {"quickstart", "continual", "qlora-cuda", "summarize", "documents"}


# examples that name the user's own files (a placeholder path), the others run as they are
YOUR_DATA = {"documents", "summarize", "qlora-cuda"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_validates(path, capsys):
    if path.stem in YOUR_DATA:  # the schema holds; the files are yours to bring
        assert main(["config", "validate", str(path)]) == 2
        assert "no such file" in capsys.readouterr().err
        assert main(["config", "validate", "--no-files", str(path)]) == 0, capsys.readouterr().err
    else:
        assert main(["config", "validate", str(path)]) == 0, capsys.readouterr().err


def _data(path: Path, tmp_path: Path, model: Path, source: Path) -> MemoryWriter:
    cfg = load_config(str(path), [f"runs_dir={tmp_path / 'runs'}", f"model.base={model}", f"data.source={source}"])
    mem = MemoryWriter()
    code, _, _ = run_step("data", load_step("data"), cfg, writers=[mem])
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return mem


def test_summarize_maps_document_and_summary_columns_for_a_seq2seq_model(tmp_path, tiny_model_factory):
    rows = [
        {"document": f"The meeting on day {i} covered budgets, rooms and the fair.", "summary": f"Day {i}: budgets."}
        for i in range(40)
    ]
    source = tmp_path / "summaries.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mem = _data(Path("examples/summarize.yaml").resolve(), tmp_path, tiny_model_factory(family="t5"), source)
    (done,) = mem.of_type("done")
    assert sum(done.summary["splits"].values()) == 40 and done.summary["task"] == "seq2seq"
    assert done.summary["dropped"] == 0


def test_documents_reads_a_folder_of_markdown(tmp_path, tiny_llama):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    for i in range(12):
        (notes / ("sub" if i % 2 else ".") / f"n{i}.md").write_text(
            f"# Note {i}\n\n" + "The library opens at nine. " * 60
        )
    mem = _data(Path("examples/documents.yaml").resolve(), tmp_path, tiny_llama, notes)
    (done,) = mem.of_type("done")
    assert done.summary["splits"]["train"] > 0 and done.summary["dropped"] == 0
    assert any("text" in e.message for e in mem.of_type("log"))
