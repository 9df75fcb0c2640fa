"""`loratui export`: the safetensors format is the merge; every configured format has an exporter."""

from __future__ import annotations

import json

import pytest

from loratui import cli
from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step


def _args(tmp_path, model):
    return [
        f"runs_dir={tmp_path / 'runs'}",
        "name=x",
        f"model.base={model}",
        "data.source=quickstart",
        "train.max_steps=1",
        "train.batch_size=8",
        "train.grad_accum=1",
    ]


def test_export_format_safetensors_writes_the_merged_model(tmp_path, tiny_llama, capsys):
    cfg = load_config(None, _args(tmp_path, tiny_llama))
    assert run_step("train", load_step("train"), cfg, writers=[MemoryWriter()])[0] == EXIT_OK
    code = cli.main(["export", "--format", "safetensors", "--events", "jsonl", *_args(tmp_path, tiny_llama)])
    assert code == EXIT_OK
    merged = RunDir.for_config(cfg).merged
    assert (merged / "model.safetensors").is_file()
    assert json.loads((merged / "loratui-merge.json").read_text())["parity"]["passed"] is True
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    done = [e for e in events if e["type"] == "done" and e["step"] == "export"]
    assert done and done[0]["summary"]["formats"]["safetensors"]["dtype"] == "float32"


def test_every_format_the_config_accepts_has_an_exporter():
    import typing

    from loratui.exporters.registry import EXPORTERS
    from loratui.pipeline.config import ExportSection

    (literal,) = typing.get_args(ExportSection.model_fields["formats"].annotation)
    assert set(typing.get_args(literal)) == set(EXPORTERS)
    with pytest.raises(Exception, match="export.formats"):
        load_config(None, ["export.formats=[tflite]"])


def test_the_safetensors_export_reuses_a_current_merge_and_merges_again_after_the_adapter_changes(tmp_path, tiny_llama):
    from loratui.pipeline.train import history as hist

    cfg = load_config(None, [*_args(tmp_path, tiny_llama), "export.formats=[safetensors]"])
    run = RunDir.for_config(cfg)
    assert run_step("train", load_step("train"), cfg, writers=[MemoryWriter()])[0] == EXIT_OK
    assert run_step("merge", load_step("merge"), cfg, writers=[MemoryWriter()])[0] == EXIT_OK

    def files():
        return {p.name: p.stat().st_mtime_ns for p in run.merged.iterdir()}

    def export():
        mem = MemoryWriter()
        code, result, _ = run_step("export", load_step("export"), cfg, writers=[mem])
        assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
        merged_again = [e for e in mem if e.step == "merge" or getattr(e, "message", None) == "merging"]
        return result.summary["formats"]["safetensors"], bool(merged_again), mem

    before = files()
    summary, merged_again, mem = export()
    assert not merged_again and files() == before  # right after the merge step: nothing is merged or written
    assert summary["reused"] is True and summary["dtype"] == "float32" and summary["parity"]["passed"] is True
    assert any("is current (adapter v1); not merging again" in e.message for e in mem.of_type("log"))

    # a new adapter version: merged again, once
    assert run_step("train", load_step("train"), cfg.model_copy(deep=True), writers=[MemoryWriter()])[0] == EXIT_OK
    summary, merged_again, mem = export()
    assert merged_again and "reused" not in summary
    assert any("v1 -> v2" in e.message for e in mem.of_type("log"))
    assert json.loads((run.merged / "loratui-merge.json").read_text())["version"] == 2
    assert not export()[1]

    # a rollback is a change of adapter too, and so is a merged/ that lost a file
    hist.rollback(run, 1)
    assert export()[1] and json.loads((run.merged / "loratui-merge.json").read_text())["version"] == 1
    (run.merged / "model.safetensors").unlink()
    summary, merged_again, mem = export()
    assert merged_again and (run.merged / "model.safetensors").is_file()
    assert any("has no model.safetensors" in e.message for e in mem.of_type("log"))
