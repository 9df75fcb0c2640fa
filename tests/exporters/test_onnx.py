"""ONNX export on tiny models: optimum's exporter, int8, verified in onnxruntime against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, EXIT_USER
from tests.exporters.test_gguf import _step


def _args(tmp_path: Path, model: Path, name: str = "o") -> list[str]:
    return [f"runs_dir={tmp_path / 'runs'}", f"name={name}", f"model.base={model}", "data.source=quickstart",
            "train.max_steps=3", "train.batch_size=8", "train.grad_accum=1", "train.lr=5e-2",
            "export.formats=[onnx]", "export.verify_samples=6", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    cfg = load_config(None, [*_args(tmp, tiny_model_factory()), "export.onnx_int8=true"])
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return cfg, result


def test_fp32_and_int8_are_written_and_verified(exported):
    cfg, result = exported
    run = RunDir.for_config(cfg)
    rows = {r["type"]: r for r in result.summary["formats"]["onnx"]["rows"]}
    assert list(rows) == ["fp32", "int8"]
    fp32, int8 = rows["fp32"], rows["int8"]
    assert fp32["max_abs_logit_diff"] < 1e-3 and fp32["top1_agreement"] >= 0.995
    assert abs(fp32["delta_perplexity"]) < 1e-3 * fp32["perplexity"]
    # dynamic int8 quantizes the MatMul weights; the embedding table stays fp32
    assert int8["bytes"] < 0.6 * fp32["bytes"] and int8["max_abs_logit_diff"] > fp32["max_abs_logit_diff"]
    assert int8["perplexity"] > 1 and int8["delta_perplexity"] is not None
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0 and row["scoring_rows_per_s"] > 0 and row["replies_stopped"].endswith("/6")
    for folder in ("onnx", "onnx-int8"):
        names = {p.name for p in (run.exports / folder).iterdir()}
        assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not list(run.exports.glob(".*"))  # no temporary folder left
    report = (run.exports / "report.md").read_text()
    assert "## ONNX (onnxruntime)" in report and "| fp32 | onnx/ |" in report and "| int8 | onnx-int8/ |" in report
    assert "int8 against fp32: perplexity" in report and "for this model" in report
    saved = json.loads((run.exports / "onnx" / "report.json").read_text())
    assert saved["task"] == "text-generation-with-past" and saved["opset"] == 18 and len(saved["files"]) == 2


def test_the_export_loads_with_optimum_alone_and_generates_like_pytorch(exported):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _ = exported
    run = RunDir.for_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(run.exports / "onnx"))
    ort_model = ORTModelForCausalLM.from_pretrained(str(run.exports / "onnx"))
    torch_model = AutoModelForCausalLM.from_pretrained(str(run.merged)).eval()
    for prompt in ["Where is the library?", "The opening hours are"]:
        ids = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode():
            want = torch_model.generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        got = ort_model.generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert got.tolist() == want.tolist()
    int8 = ORTModelForCausalLM.from_pretrained(str(run.exports / "onnx-int8"))
    assert int8.generate(**ids, max_new_tokens=4, do_sample=False, min_new_tokens=4).shape[1] == ids["input_ids"].shape[1] + 4


def test_a_refused_onnx_export_writes_nothing_and_the_step_goes_on(tmp_path, tiny_llama, monkeypatch):
    cfg = load_config(None, [*_args(tmp_path, tiny_llama), "export.formats=[onnx, safetensors]"])
    code, _, mem = _step("train", cfg)
    assert code == EXIT_OK, [(e.message, e.hint) for e in mem.of_type("error")]
    monkeypatch.setattr("loratui.exporters.onnx.FP32_MAX_DIFF", 0.0)  # no export can meet it
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK and not mem.of_type("error")
    (why,) = result.summary["refused"]["onnx"]
    assert "the fp32 ONNX export differs from the merged model" in why and "nothing was written" in why
    assert any("onnx refused" in e.message for e in mem.of_type("log") if e.level == "warning")
    exports = RunDir.for_config(cfg).exports
    assert not (exports / "onnx").exists() and not list(exports.glob(".*"))
    assert "| fp32 |" in (exports / "report.md").read_text()  # its figures stay in the report
    assert (RunDir.for_config(cfg).merged / "config.json").is_file()  # the other format was written


def test_cancelled_during_the_export_writes_nothing(tmp_path, tiny_llama):
    from loratui.exporters import onnx
    from loratui.pipeline.errors import StepCancelled
    from loratui.pipeline.events import EventSink

    cfg = load_config(None, [*_args(tmp_path, tiny_llama), "export.verify=false"])
    assert _step("train", cfg)[0] == EXIT_OK
    assert _step("merge", cfg)[0] == EXIT_OK
    run = RunDir.for_config(cfg)
    calls = {"n": 0}

    def should_stop() -> bool:  # false until the exporter's process has run a little
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(StepCancelled):
        onnx.export(cfg, run, EventSink("export", []), should_stop)
    assert (run.exports / "onnx.log").read_text().strip()  # the exporter had started
    assert not (run.exports / "onnx").exists() and not list(run.exports.glob(".*"))


def test_an_encoder_decoder_model_exports_as_seq2seq(tmp_path, tiny_model_factory):
    t5 = tiny_model_factory(family="t5")
    cfg = load_config(None, _args(tmp_path, t5, name="t"))
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    (row,) = result.summary["formats"]["onnx"]["rows"]
    assert row["max_abs_logit_diff"] < 1e-3 and row["top1_agreement"] >= 0.995
    names = {p.name for p in (RunDir.for_config(cfg).exports / "onnx").iterdir()}
    assert {"encoder_model.onnx", "decoder_model_merged.onnx"} <= names or {"encoder_model.onnx", "decoder_model.onnx"} <= names


def test_without_onnxruntime_the_export_names_the_extra_before_any_work(tmp_path, tiny_llama, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    cfg = load_config(None, _args(tmp_path, tiny_llama))
    code, _, mem = _step("export", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "onnxruntime is not installed" in err.message and "loratui[cpu]" in err.hint
    assert not RunDir.for_config(cfg).merged.exists()  # nothing was merged or written first
