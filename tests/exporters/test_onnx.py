"""ONNX export on tiny models: onnxruntime-genai's model builder, fp32 and int4, verified in onnxruntime
against PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, EXIT_USER
from tests.exporters.test_gguf import _step


def _args(tmp_path: Path, model: Path, name: str = "o") -> list[str]:
    return [
        f"runs_dir={tmp_path / 'runs'}",
        f"name={name}",
        f"model.base={model}",
        "data.source=quickstart",
        "train.max_steps=3",
        "train.batch_size=8",
        "train.grad_accum=1",
        "train.lr=5e-2",
        "export.formats=[onnx]",
        "export.verify_samples=6",
        "eval.max_new_tokens=8",
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    cfg = load_config(None, [*_args(tmp, tiny_model_factory(tokenizer="smollm2")), "export.onnx_quants=[int4, int8]"])
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return cfg, result


def test_fp32_is_written_and_verified_and_each_quantized_model_is_judged(exported):
    cfg, result = exported
    run = RunDir.for_config(cfg)
    rows = {r["type"]: r for r in result.summary["formats"]["onnx"]["rows"]}
    assert list(rows) == ["fp32", "int4", "int8"]
    fp32 = rows["fp32"]
    assert fp32["verdict"] == "passed" and fp32["max_abs_logit_diff"] < 1e-3 and fp32["top1_agreement"] >= 0.995
    assert abs(fp32["delta_perplexity"]) < 1e-3 * fp32["perplexity"]
    # int4 packs two weights a byte and reads the tied embedding from its lm_head. int8 keeps an fp32 embedding
    # beside its int8 lm_head: on this tiny model, mostly embedding, that is more than fp32's one shared table
    assert rows["int4"]["bytes"] < 0.3 * fp32["bytes"] and rows["int8"]["bytes"] > 0
    refused = []
    for kind in ("int4", "int8"):
        row = rows[kind]
        assert row["max_abs_logit_diff"] > fp32["max_abs_logit_diff"] and row["perplexity"] > 1
        # a random tiny model has near-ties everywhere: a quantized model may flip enough of them to be refused
        kept = row["top1_agreement"] >= 0.97
        assert row["verdict"] == (
            "passed"
            if kept
            else f"refused: top-1 agreement {row['top1_agreement']:.1%} (at least 97% for {kind} to be worth using)"
        )
        assert (run.exports / f"onnx-{kind}").is_dir() == kept
        refused += (
            []
            if kept
            else [f"{kind}: top-1 agreement {row['top1_agreement']:.1%} (at least 97% for {kind} to be worth using)"]
        )
    assert result.summary["formats"]["onnx"]["refused"] == refused
    for row in rows.values():
        assert (
            row["decode_tokens_per_s"] > 0 and row["scoring_rows_per_s"] > 0 and row["replies_stopped"].endswith("/6")
        )
    names = {p.name for p in (run.exports / "onnx").iterdir()}
    assert {
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    # the trained template, and onnxruntime-genai stops at its end-of-turn token
    assert (run.exports / "onnx" / "chat_template.jinja").read_text() == (
        run.merged / "chat_template.jinja"
    ).read_text()
    genai = json.loads((run.exports / "onnx" / "genai_config.json").read_text())
    im_end = json.loads((run.merged / "tokenizer.json").read_text())["added_tokens"]
    im_end = next(t["id"] for t in im_end if t["content"] == "<|im_end|>")
    assert im_end in (
        genai["model"]["eos_token_id"]
        if isinstance(genai["model"]["eos_token_id"], list)
        else [genai["model"]["eos_token_id"]]
    )
    assert not list(run.exports.glob(".*"))  # no temporary folder left
    report = (run.exports / "report.md").read_text()
    assert "## ONNX (onnxruntime)" in report and "| fp32 | onnx/ |" in report and "| int4 | onnx-int4/ |" in report
    assert "int4 against fp32: perplexity" in report and "int8 against fp32: perplexity" in report
    saved = json.loads((run.exports / "onnx" / "report.json").read_text())
    assert saved["builder"].startswith("onnxruntime-genai ") and len(saved["files"]) == 3


def test_the_export_runs_in_onnxruntime_genai_alone_and_generates_like_pytorch(exported, tmp_path):
    """The report's snippet, run in a fresh interpreter without loratui on the path, answers what PyTorch
    answers greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratui.pipeline.report import genai_snippet

    cfg, _ = exported
    run = RunDir.for_config(cfg)
    folder = run.exports / "onnx"
    script = (
        "\n".join(genai_snippet(folder))
        .replace('"Hello!"', '"Where is the library?"')
        .replace("max_length=512", "max_length=64")
    )
    (tmp_path / "snippet.py").write_text(script + "\n")
    got = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "snippet.py")], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert got.returncode == 0, got.stderr[-2000:]
    tokenizer = AutoTokenizer.from_pretrained(str(run.merged))
    model = AutoModelForCausalLM.from_pretrained(str(run.merged)).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where is the library?"}], add_generation_prompt=True, return_dict=False
    )
    ids = torch.tensor([prompt])
    with torch.inference_mode():  # greedy, to the same length limit, stopping where genai_config says
        stop = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_length=64,
            do_sample=False,
            eos_token_id=stop,
            repetition_penalty=1.0,
        )
    want = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert got.stdout.strip() == want.strip()


def test_a_folder_from_the_old_exporter_is_refused_with_the_command_to_export_again(tmp_path):
    from loratui.pipeline.errors import LoratuiError
    from loratui.pipeline.eval.runtimes import load_onnx

    old = tmp_path / "onnx"
    old.mkdir()
    (old / "model.onnx").write_bytes(b"\x08\x07")  # what optimum wrote: no genai_config.json
    (old / "config.json").write_text("{}")
    with pytest.raises(LoratuiError) as err:
        load_onnx(old)
    assert "older loratui" in err.value.message and "loratui export --format onnx" in err.value.hint


def test_a_refused_onnx_export_writes_nothing_and_the_step_goes_on(tmp_path, tiny_llama, monkeypatch):
    cfg = load_config(None, [*_args(tmp_path, tiny_llama), "export.formats=[onnx, safetensors]"])
    code, _, mem = _step("train", cfg)
    assert code == EXIT_OK, [(e.message, e.hint) for e in mem.of_type("error")]
    monkeypatch.setattr("loratui.exporters.onnx.FP32_MAX_DIFF", 0.0)  # no export can meet it
    monkeypatch.setattr("loratui.exporters.onnx.FP32_MAX_REL_DIFF", 0.0)
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


def test_an_encoder_decoder_model_is_refused_with_the_alternatives(tmp_path, tiny_model_factory):
    t5 = tiny_model_factory(family="t5")
    cfg = load_config(None, _args(tmp_path, t5, name="t"))
    assert _step("train", cfg)[0] == EXIT_OK
    code, _, mem = _step("export", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "decoder-only" in err.message and "T5" in err.message and "safetensors" in err.hint
    assert not (RunDir.for_config(cfg).exports / "onnx").exists()


def test_without_onnxruntime_the_export_names_the_extra_before_any_work(tmp_path, tiny_llama, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    cfg = load_config(None, _args(tmp_path, tiny_llama))
    code, _, mem = _step("export", cfg)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "onnxruntime is not installed" in err.message and "loratui[cpu]" in err.hint
    assert not RunDir.for_config(cfg).merged.exists()  # nothing was merged or written first


def test_the_fp32_tolerance_scales_with_the_logits():
    """1e-3, or 1e-4 of the merged model's largest logit: Gemma 3 270M's fp32 graph (logits up to 131)
    differs by 7.1e-3 and is right; the same difference on logits of 5 or 20 is refused, as is a top-1 loss."""
    from loratui.exporters.onnx import OnnxRow, judge

    def row(diff: float, scale: float, top1: float = 1.0) -> OnnxRow:
        return OnnxRow("fp32", "onnx", 0, max_abs_logit_diff=diff, reference_max_abs_logit=scale, top1_agreement=top1)

    assert judge(row(7.1e-3, 131.3)) == "passed"
    assert judge(row(9e-4, 5.0)) == "passed"
    assert judge(row(7.1e-3, 5.0)).startswith("refused: largest logit difference 7.10e-03 (at most 1.0e-03)")
    assert judge(row(7.1e-3, 20.0)).startswith("refused: largest logit difference 7.10e-03 (at most 2.0e-03)")
    assert "at most 1.3e-02" in judge(row(2e-2, 131.3))
    assert "top-1 agreement 99.00%" in judge(row(1e-4, 131.3, top1=0.99))
