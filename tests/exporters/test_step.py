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
    return [f"runs_dir={tmp_path / 'runs'}", "name=x", f"model.base={model}", "data.source=quickstart",
            "train.max_steps=1", "train.batch_size=8", "train.grad_accum=1"]


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
