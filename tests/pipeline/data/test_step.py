"""The data step end to end on small fixtures: every file type, splits, report, preview, cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loratui.pipeline import models
from loratui.pipeline.config import load_config
from loratui.pipeline.data import build as data_build
from loratui.pipeline.data import step as data_step
from loratui.pipeline.data import tokens
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.steps import run_step

ALPACA = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i}."} for i in range(40)]


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    return {"tmp": tmp_path, "model": tiny_model_factory(tokenizer="bpe")}


def _run(env, name="r", **overrides):
    args = [f"runs_dir={env['tmp'] / 'runs'}", f"name={name}", f"model.base={env['model']}"]
    args += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    cfg = load_config(None, args)
    mem = MemoryWriter()
    code, result, _ = run_step("data", data_step.run, cfg, writers=[mem])
    errors = mem.of_type("error")
    assert code == 0, errors[0].message if errors else code
    data = env["tmp"] / "runs" / name / "data"
    return result, json.loads((data / "report.json").read_text()), data, mem


def _load(data: Path, split: str):
    from datasets import load_from_disk

    return load_from_disk(str(data / "processed" / split))


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write(path: Path, kind: str, rows) -> Path:
    if kind == "jsonl":
        return _write_jsonl(path, rows)
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind in ("csv", "tsv"):
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_every_file_type(env, kind):
    src = _write(env["tmp"] / f"data.{kind}", kind, ALPACA)
    result, report, data, _ = _run(env, data__source=src)
    assert report["files"][0]["format"] == "alpaca" and report["files"][0]["kind"] == kind
    assert report["splits"] == {"train": 32, "validation": 4, "test": 4}
    assert result.summary["splits"]["train"] == 32
    train = _load(data, "train")
    assert set(train.column_names) >= {"input_ids", "labels", "source", "messages", "meta"}
    assert train[0]["source"].startswith(str(src))


def test_glob_and_list_of_files(env):
    a = _write_jsonl(env["tmp"] / "a.jsonl", ALPACA[:20])
    _write_jsonl(env["tmp"] / "b.jsonl", ALPACA[20:])
    _, report, _, _ = _run(env, data__source=str(env["tmp"] / "*.jsonl"))
    assert [Path(f["path"]).name for f in report["files"]] == ["a.jsonl", "b.jsonl"]
    _, report2, _, _ = _run(env, name="r2", data__source=f"[{a}]")
    assert report2["rows"]["read"] == 20


def test_mixed_formats_are_detected_per_file(env):
    _write_jsonl(env["tmp"] / "a.jsonl", ALPACA[:20])
    _write_jsonl(env["tmp"] / "b.jsonl", [{"question": f"Q{i}", "answer": f"A{i}"} for i in range(20)])
    _, report, _, _ = _run(env, data__source=str(env["tmp"] / "*.jsonl"))
    assert [f["format"] for f in report["files"]] == ["alpaca", "qa"]


def test_folder_of_documents_is_chunked(env):
    docs = env["tmp"] / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"page{i}.md").write_text(f"# Page {i}\n\n" + " ".join(f"Line {j} of page {i}." for j in range(60)))
    (docs / "notes.txt").write_text("A short note.")
    _, report, data, _ = _run(
        env, data__source=docs, data__chunk_tokens=64, data__chunk_overlap=8, data__val_ratio=0, data__test_ratio=0
    )
    assert {f["kind"] for f in report["files"]} == {"document"}
    train = _load(data, "train")
    assert len(train) > 7, "long pages become several chunks"
    assert max(len(x) for x in train["input_ids"]) <= 64


def test_splits_are_deterministic_and_do_not_leak(env):
    rows = ALPACA + ALPACA[:5]  # five exact duplicates
    src = _write_jsonl(env["tmp"] / "d.jsonl", rows)
    _, report, data, _ = _run(env, data__source=src, data__seed=7)
    _, _, data2, _ = _run(env, name="again", data__source=src, data__seed=7)
    assert report["problems"] == {"duplicate": 5}
    splits = {s: set(_load(data, s)["messages"]) for s in ("train", "validation", "test")}
    assert not splits["train"] & splits["test"] and not splits["train"] & splits["validation"]
    assert not splits["validation"] & splits["test"]
    assert _load(data, "test")["source"] == _load(data2, "test")["source"]
    _, _, data3, _ = _run(env, name="other-seed", data__source=src, data__seed=8)
    assert _load(data, "test")["source"] != _load(data3, "test")["source"]


def test_separate_split_files_and_cross_split_dedupe(env):
    train = _write_jsonl(env["tmp"] / "train.jsonl", ALPACA[:30])
    test = _write_jsonl(env["tmp"] / "test.jsonl", ALPACA[28:35])  # two rows also in train
    _, report, data, _ = _run(env, data__source=train, data__test_source=test, data__val_ratio=0)
    assert report["splits"] == {"train": 30, "validation": 0, "test": 5}
    leaked = [d for d in report["dropped"] if d["kind"] == "duplicate_across_splits"]
    assert [(Path(d["file"]).name, d["row"]) for d in leaked] == [("test.jsonl", 1), ("test.jsonl", 2)]
    assert not (data / "processed" / "validation").exists()


def test_bundled_quickstart_uses_its_own_splits(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    env = {"tmp": tmp_path, "model": tiny_model_factory(tokenizer="smollm2")}
    _, report, data, _ = _run(env, data__source="quickstart")
    assert [(Path(f["path"]).name, f["split"]) for f in report["files"]] == [
        ("train.jsonl", "train"),
        ("validation.jsonl", "validation"),
        ("test.jsonl", "test"),
    ]
    assert report["rows"]["dropped"] == 0
    meta = json.loads(_load(data, "test")[0]["meta"])
    assert meta["fact"], "the reference fact travels with each test row for evaluation"


def test_report_preview_manifest_and_resolved_config(env):
    src = _write_jsonl(env["tmp"] / "d.jsonl", ALPACA)
    result, report, data, mem = _run(env, data__source=src)
    assert report["max_length"] == 64 and report["max_length_source"].startswith("auto")
    config = (env["tmp"] / "runs" / "r" / "config.yaml").read_text()
    assert "max_length: 64" in config, "auto values are written back into the run's config"
    preview = (data / "preview.txt").read_text()
    assert preview.count("── example") == 3 and "⟦Answer number" in preview
    assert "tokens per epoch" in preview and "median" in preview and "p95" in preview
    manifest = json.loads((data / "dataset.json").read_text())
    assert manifest["splits"]["train"] == "processed/train" and manifest["chat_template"]
    assert (
        "| problem |" not in (data / "report.md").read_text()
        and "No problems found" in (data / "report.md").read_text()
    )
    kinds = [e.kind for e in mem.of_type("artifact")]
    assert kinds == ["data-report", "data-preview", "dataset"]
    assert mem.of_type("done")[0].summary["cache_hit"] is False


def test_second_run_with_same_inputs_is_a_cache_hit_and_does_no_work(env, monkeypatch):
    src = _write_jsonl(env["tmp"] / "d.jsonl", ALPACA)
    first, report1, data1, _ = _run(env, data__source=src)

    def no_work(*args, **kwargs):
        raise AssertionError("the cache hit must not re-read or re-tokenize")

    monkeypatch.setattr(data_build, "build", no_work)
    second, report2, data2, mem = _run(env, name="second", data__source=src)
    assert second.summary["cache_hit"] is True
    assert report1 == report2
    assert _load(data1, "train")["input_ids"] == _load(data2, "train")["input_ids"]
    assert any("cache hit" in e.message for e in mem.of_type("log"))
    # a changed input file is a miss
    monkeypatch.undo()
    monkeypatch.setenv("LORATUI_HOME", str(env["tmp"] / "home"))
    _write_jsonl(src, ALPACA[:-1])
    third, _, _, _ = _run(env, name="third", data__source=src)
    assert third.summary["cache_hit"] is False


def test_cli_preview_shows_trained_tokens(env, capsys):
    from loratui.cli import main

    src = _write_jsonl(env["tmp"] / "d.jsonl", ALPACA)
    code = main(
        [
            "data",
            "preview",
            "-n",
            "2",
            f"runs_dir={env['tmp'] / 'runs'}",
            f"model.base={env['model']}",
            f"data.source={src}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("── example") == 2 and "Answer number" in out and "tokens per epoch" in out


def test_worker_processes_give_the_same_tokens(env):
    """The multi-process path (used from 20k rows) encodes exactly like the in-process one."""
    from loratui.pipeline.data.formats import to_example
    from loratui.pipeline.events import null_sink

    cfg = load_config(None, [f"model.base={env['model']}"])
    tokenizer, template, _ = models.load_tokenizer_and_template(cfg, null_sink("data"))
    examples = [to_example(r, "alpaca", "f", i, None) for i, r in enumerate(ALPACA)]
    one = tokens.encode_examples(
        examples, tokenizer, template, cfg, null_sink("data"), lambda: False, "train", num_proc=1
    )
    two = tokens.encode_examples(
        examples, tokenizer, template, cfg, null_sink("data"), lambda: False, "train", num_proc=2
    )
    assert one["input_ids"][:] == two["input_ids"][:] and one["labels"][:] == two["labels"][:]
    assert one["source"][:] == two["source"][:]


def test_cancel_leaves_no_half_written_cache_or_run_data(env):
    from loratui.pipeline.steps import StopFlag

    src = _write_jsonl(env["tmp"] / "d.jsonl", ALPACA)
    cfg = load_config(
        None, [f"runs_dir={env['tmp'] / 'runs'}", "name=c", f"model.base={env['model']}", f"data.source={src}"]
    )
    stop = StopFlag()
    stop.set()  # as if SIGTERM arrived before the first stage finished
    mem = MemoryWriter()
    code, _, _ = run_step("data", data_step.run, cfg, writers=[mem], stop=stop)
    assert code == 130 and mem[-1].type == "cancelled"
    cache = env["tmp"] / "home" / "datasets"
    assert not cache.exists() or not any(cache.iterdir()), "no partial cache entry"
    assert not (env["tmp"] / "runs" / "c" / "data").exists()


def test_a_local_folder_named_like_a_bundled_dataset_wins(env, monkeypatch):
    folder = env["tmp"] / "quickstart"
    folder.mkdir()
    _write_jsonl(folder / "mine.jsonl", ALPACA)
    monkeypatch.chdir(env["tmp"])
    _, report, _, _ = _run(env, data__source="quickstart")
    assert [Path(f["path"]).name for f in report["files"]] == ["mine.jsonl"]
