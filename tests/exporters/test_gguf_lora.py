"""`--format gguf-lora`: the adapter as a llama.cpp LoRA GGUF on its base GGUF, checked in llama-cpp-python."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, EXIT_USER
from tests.exporters.test_gguf import _args, _step, smol  # noqa: F401  (smol: a fixture)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smol):
    """The merged model and the adapter, both in f32: the two must then give the same tokens."""
    tmp = tmp_path_factory.mktemp("gguf-lora")
    cfg = load_config(
        None,
        [
            *_args(tmp, smol),
            "export.formats=[gguf, gguf-lora]",
            "export.gguf_quants=[f32]",
            "export.gguf_lora_type=f32",
        ],
    )
    assert _step("train", cfg)[0] == EXIT_OK
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    return cfg, result


def _greedy(path: Path, prompts: list[str], lora: Path | None = None, n: int = 16) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, verbose=False)
    out = []
    try:
        for prompt in prompts:
            tokens = llm.generate(
                llm.tokenize(prompt.encode()), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True
            )
            got: list[int] = []
            try:
                for t in tokens:
                    got.append(int(t))
                    if len(got) >= n:
                        break
            finally:
                tokens.close()
            out.append(got)
    finally:
        llm.close()
    return out


def test_the_adapter_on_the_base_gives_the_merged_models_tokens(exported):
    cfg, _ = exported
    out = RunDir.for_config(cfg).exports / "gguf"
    prompts = [
        "Where is the support page?",
        "<|im_start|>user\nWhat is the e-mail?<|im_end|>\n<|im_start|>assistant\n",
        "The capital of France is",
    ]
    merged = _greedy(out / "g-f32.gguf", prompts)
    with_lora = _greedy(out / "g-base-f32.gguf", prompts, lora=out / "g-lora-f32.gguf")
    base = _greedy(out / "g-base-f32.gguf", prompts)
    assert with_lora == merged
    assert base != merged  # the adapter changes the model: the equality above is not the base's


def test_the_adapter_gguf_is_a_llama_cpp_lora(exported):
    from loratui.exporters.gguf_info import summary

    cfg, result = exported
    out = RunDir.for_config(cfg).exports / "gguf"
    info = summary(out / "g-lora-f32.gguf")
    alpha = json.loads((RunDir.for_config(cfg).adapter / "adapter_config.json").read_text())["lora_alpha"]
    assert info["type"] == "adapter" and info["architecture"] == "llama" and info["lora_alpha"] == alpha
    assert info["lora_rank"] == 16 and info["chat_template"] is None
    # every projection of every layer, A and B: 2 layers x 7 modules x 2
    assert info["tensors"] == 28 and info["lora_targets"] == [
        "attn_k",
        "attn_output",
        "attn_q",
        "attn_v",
        "ffn_down",
        "ffn_gate",
        "ffn_up",
    ]
    from gguf import GGUFReader

    fields = GGUFReader(str(out / "g-lora-f32.gguf")).fields
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    base = summary(out / "g-base-f32.gguf")
    assert base["type"] == "model" and "<|im_start|>" in base["chat_template"]
    rows = {r["type"]: r for r in result.summary["formats"]["gguf-lora"]["rows"]}
    assert rows["base f32 + LoRA f32"]["top1_agreement"] >= 0.99
    assert rows["base f32"]["top1_agreement"] < rows["base f32 + LoRA f32"]["top1_agreement"]
    report = (RunDir.for_config(cfg).exports / "report.md").read_text()
    assert "## GGUF (llama.cpp)\n" in report and "## GGUF LoRA adapter (llama.cpp --lora)\n" in report
    assert "llama-cli -m g-base-f32.gguf --lora g-lora-f32.gguf" in report
    assert not list(out.glob(".*"))  # no staging folder or temporary file left


def test_the_lora_modelfile_names_the_base_and_the_adapter(exported):
    cfg, _ = exported
    out = RunDir.for_config(cfg).exports / "gguf"
    lines = (out / "g-lora.Modelfile").read_text().splitlines()
    assert "-f g-lora.Modelfile" in lines[0]
    assert lines[1:3] == ["FROM ./g-base-f32.gguf", "ADAPTER ./g-lora-f32.gguf"]
    assert any(line.startswith('TEMPLATE """') for line in lines) and 'PARAMETER stop "<|im_end|>"' in lines


def _adapter_copy(cfg, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(RunDir.for_config(cfg).adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"use_dora": True}, "DoRA adapters cannot be written"),
        ({"modules_to_save": ["lm_head"]}, "(modules_to_save)"),
        ({"peft_type": "IA3"}, "a IA3 adapter cannot"),
    ],
)
def test_adapters_llama_cpp_cannot_apply_are_refused(exported, tmp_path, changes, expected):
    cfg, _ = exported
    adapter = _adapter_copy(cfg, tmp_path, **changes)
    other = load_config(
        None,
        [*_args(Path(cfg.runs_dir), Path(cfg.model.base)), "export.formats=[gguf-lora]", f"merge.adapter={adapter}"],
    )
    code, _, mem = _step("export", other)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert expected in err.message and "--format gguf" in err.hint


def test_a_tensor_that_is_not_a_lora_pair_fails_in_the_converter_and_leaves_nothing(exported, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    cfg, _ = exported
    adapter = _adapter_copy(cfg, tmp_path)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(4, 4)  # a trained embedding slipped in
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    other = load_config(
        None,
        [
            *_args(tmp_path, Path(cfg.model.base), name="x"),
            "export.formats=[gguf-lora]",
            f"merge.adapter={adapter}",
            "export.verify=false",
        ],
    )
    out = RunDir.for_config(other).exports / "gguf"
    (out / ".x-base-stage.tmp").mkdir(parents=True)  # as a killed export leaves it: cleared first
    (out / ".x-base-stage.tmp" / "config.json").write_text("{}")
    code, _, mem = _step("export", other)
    assert code == EXIT_USER
    (err,) = mem.of_type("error")
    assert "embed_tokens.weight' is not a LoRA A/B matrix" in err.message and "convert-lora.log" in err.hint
    assert sorted(p.name for p in out.iterdir()) == ["convert-lora.log"]


def test_rslora_and_rank_or_alpha_patterns_keep_peft_scale(tmp_path):
    """llama.cpp scales by adapter.lora.alpha / rank; peft's other scales are folded into lora_B."""
    import torch
    from safetensors.torch import save_file

    from loratui.exporters.convert_lora_entry import load_pairs

    a4, a2, b = torch.ones(4, 8), torch.ones(2, 8), torch.ones(6, 4)
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a4,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": a2,
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.ones(6, 2),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )

    def factors(**config):
        pairs = load_pairs(tmp_path, {"r": 4, "lora_alpha": 8, **config})
        return {k.split(".")[-2]: round(float(v[1][0, 0]), 4) for k, v in pairs.items()}

    assert factors()["q_proj"] == 1.0  # plain LoRA: llama.cpp's own scale, nothing folded
    # rsLoRA: alpha / sqrt(r) = 8 / 2 = 4 against llama.cpp's 8 / 4 = 2
    assert factors(use_rslora=True)["q_proj"] == 2.0
    # up_proj has rank 2 (rank_pattern) and alpha 16 (alpha_pattern): 16 / 2 against llama.cpp's 8 / 2
    assert factors(rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 16}) == {"q_proj": 1.0, "up_proj": 2.0}


def _convert_patched(cfg, out: Path, patch: str):
    """convert_lora_entry.py on the run's adapter, with ``patch`` (Python) run first in its process."""
    import os
    import subprocess
    import sys

    from loratui.exporters.gguf import converter_dir

    entry = (Path(__file__).parents[2] / "loratui" / "exporters" / "convert_lora_entry.py").read_text()
    entry = entry.replace("from __future__ import annotations", "")  # must come first; the patch goes first
    return subprocess.run(
        [
            sys.executable,
            "-c",
            patch + entry,
            str(RunDir.for_config(cfg).adapter),
            str(cfg.model.base),
            str(out),
            "f32",
            "x",
        ],
        capture_output=True,
        text=True,
        cwd=converter_dir(),
        env={**os.environ, "PYTHONPATH": str(converter_dir())},
    )


def _flip_columns_of(module: str) -> str:
    """A patch: llama's conversion also reverses the columns (the inputs) of ``module``."""
    return (
        "import conversion.llama as L\n"
        "original = L.LlamaModel.modify_tensors\n"
        "def moved(self, data, name, bid):\n"
        f"    yield from original(self, data.flip(-1) if {module!r} in name else data, name, bid)\n"
        "L.LlamaModel.modify_tensors = moved\n"
    )


def test_an_architecture_whose_conversion_moves_rows_and_columns_of_one_weight_is_refused(exported, tmp_path):
    """Rows follow lora_B and columns lora_A, but not both at once: q_proj's rows are permuted by llama's
    conversion (RoPE layout), and here it is patched to also reverse its columns."""
    cfg, _ = exported
    out = tmp_path / "x.gguf"
    proc = _convert_patched(cfg, out, _flip_columns_of("q_proj"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "rearranges both the outputs and the inputs of model.layers.0.self_attn.q_proj.weight" in proc.stderr
    assert not out.exists()


def test_a_conversion_that_moves_only_columns_is_followed_by_lora_a(exported, tmp_path):
    """A weight whose inputs the converter reorders (as Qwen3.5's out_proj, by value head): lora_A's columns
    are reordered with them and lora_B is written as is, so B @ A is the converted weight's delta."""
    import numpy as np
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    cfg, _ = exported
    out = tmp_path / "x.gguf"
    proc = _convert_patched(cfg, out, _flip_columns_of("v_proj"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    tensors = {t.name: np.asarray(t.data) for t in GGUFReader(str(out)).tensors}
    peft = load_file(str(RunDir.for_config(cfg).adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.v_proj"
    a, b = peft[f"{prefix}.lora_A.weight"], peft[f"{prefix}.lora_B.weight"]
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_a"], a[:, ::-1], rtol=1e-6)
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"], b, rtol=1e-6)
    # the other modules keep the row side: A as peft wrote it
    np.testing.assert_allclose(
        tensors["blk.0.attn_output.weight.lora_a"],
        peft["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"],
        rtol=1e-6,
    )


def test_a_refused_lora_gguf_keeps_its_figures_in_the_report_and_writes_nothing(tmp_path, smol, monkeypatch):
    """The rule made impossible to meet: the step still succeeds, nothing of gguf-lora is written, and its
    rows (base alone, base + adapter with the verdict) stay in exports/report.md."""
    cfg = load_config(None, [*_args(tmp_path, smol), "export.formats=[gguf-lora, safetensors]"])
    assert _step("train", cfg)[0] == EXIT_OK
    monkeypatch.setattr("loratui.exporters.acceptance.MAX_FLIP_SHARE", -1.0)  # no file can pass
    monkeypatch.setattr("loratui.exporters.acceptance.MIN_DECIDED", 0)
    code, result, mem = _step("export", cfg)
    assert code == EXIT_OK, [e.message for e in mem.of_type("error")]
    (why,) = result.summary["refused"]["gguf-lora"]
    assert "picks another token than the merged model at 0 of the" in why
    run = RunDir.for_config(cfg)
    assert not list((run.exports / "gguf").glob("*.gguf")) and not list((run.exports / "gguf").glob(".*"))
    report = (run.exports / "report.md").read_text()
    assert "## GGUF LoRA adapter" in report and "**refused: g-lora-f16.gguf: picks another token" in report
    assert (run.merged / "config.json").is_file()


def test_a_qwen3_5_adapter_on_its_gated_deltanet_projections_computes_the_merged_model(tmp_path, tiny_model_factory):
    """Qwen3.5: the converter reorders the linear-attention value heads, on the rows of in_proj_qkv / in_proj_z /
    in_proj_a / in_proj_b (lora_B follows) and on the columns of out_proj (lora_A follows), and its class
    expects multi-token-prediction layers unless told there are none. The LoRA GGUF on the base GGUF gives
    the merged GGUF's logits in llama.cpp."""
    import llama_cpp
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratui.exporters.gguf import run_converter

    base = tiny_model_factory(family="qwen3_5", tokenizer="smollm2")
    torch.manual_seed(0)
    modules = ["in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj", "q_proj", "o_proj", "down_proj"]
    net = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False),
    )
    with torch.no_grad():  # a delta of the weights' own size, so a wrong layout shows in the logits
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    net.save_pretrained(str(tmp_path / "adapter"))
    merged = tmp_path / "merged"
    net.merge_and_unload().save_pretrained(str(merged))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(merged))
    log = tmp_path / "convert.log"
    files = {k: tmp_path / f"{k}.gguf" for k in ("base", "merged", "lora")}
    for kind, source in (("base", base), ("merged", merged)):
        run_converter(
            "convert_entry.py",
            [str(source), "--outfile", str(files[kind]), "--outtype", "f32"],
            log,
            lambda: False,
            kind,
        )
    run_converter(
        "convert_lora_entry.py",
        [str(tmp_path / "adapter"), str(base), str(files["lora"]), "f32", "x"],
        log,
        lambda: False,
        "the adapter",
    )

    def logits(path: Path, lora: Path | None = None) -> np.ndarray:
        llm = llama_cpp.Llama(
            model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True, verbose=False
        )
        try:
            tokens = llm.tokenize(b"The library opens at nine on weekdays and at ten on Saturday.")
            llm.eval(tokens)
            return np.array(llm.scores[: len(tokens)])
        finally:
            llm.close()

    want, got, without = logits(files["merged"]), logits(files["base"], files["lora"]), logits(files["base"])
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max()
    assert np.abs(without - want).max() > 0.05 * np.abs(want).max()  # the adapter matters
