"""`loratui export`: the safetensors format is the merge; formats not built yet are a clear error."""

from __future__ import annotations

import json

from loratui import cli
from loratui.pipeline.config import load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, EXIT_USER, load_step, run_step


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


def test_formats_not_built_yet_are_skipped_with_a_warning_or_a_clear_error(tmp_path, tiny_llama):
    cfg = load_config(None, [*_args(tmp_path, tiny_llama), "export.formats=[safetensors, onnx]"])
    assert run_step("train", load_step("train"), cfg, writers=[MemoryWriter()])[0] == EXIT_OK
    mem = MemoryWriter()
    code, result, _ = run_step("export", load_step("export"), cfg, writers=[mem])
    assert code == EXIT_OK and list(result.summary["formats"]) == ["safetensors"]
    assert any("skipping onnx" in e.message and e.level == "warning" for e in mem.of_type("log"))
    only = load_config(None, [*_args(tmp_path, tiny_llama), "export.formats=[onnx]"])
    mem = MemoryWriter()
    code, _, _ = run_step("export", load_step("export"), only, writers=[mem])
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "onnx cannot be exported by this version" in err.message and "--format safetensors" in (err.hint or "")
