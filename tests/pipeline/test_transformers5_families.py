"""Model families that exist only in transformers 5, through every step: data -> train -> merge -> GGUF
export (llama.cpp's converter, verified in llama.cpp against the merged model) -> llama.cpp loads it.

* ``qwen3_5``: Qwen3_5ForCausalLM, Gated-DeltaNet linear-attention layers and gated full attention.
  LoRA wraps the linear-attention projections too (``all-linear``); training uses padded batches,
  because packing would carry the recurrent state from one example into the next.
* ``gemma4``: Gemma4ForCausalLM (text), sliding-window and full layers with different head sizes.

Built from tiny random configs (tests/tiny_models.py) with the SmolLM2 tokenizer, offline.
"""

from __future__ import annotations

import json
import math

import pytest

from loratui.pipeline.config import RunConfig, load_config
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.runs import RunDir
from loratui.pipeline.steps import EXIT_OK, load_step, run_step

# the modules `all-linear` must wrap in each family (the output head never)
EXPECTED_TARGETS = {
    "qwen3_5": {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",  # linear attention
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma4": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


def _step(name: str, cfg: RunConfig):
    mem = MemoryWriter()
    code, result, _ = run_step(name, load_step(name), cfg, writers=[mem])
    assert code == EXIT_OK, (name, [e.message for e in mem.of_type("error")])
    return result, mem


@pytest.mark.parametrize("family", ["qwen3_5"])
def test_family_trains_merges_and_exports_to_llama_cpp(tmp_path, tiny_model_factory, family):
    import llama_cpp
    from safetensors import safe_open

    model = tiny_model_factory(family=family, tokenizer="smollm2")
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", "name=t5", f"model.base={model}",
                             "data.source=quickstart", "train.max_steps=3", "train.batch_size=4",
                             "train.grad_accum=1", "train.lr=2e-2", "train.warmup_ratio=0",
                             "export.formats=[gguf]", "export.gguf_quants=[f32]", "export.verify_samples=6",
                             "eval.max_new_tokens=8"])
    run = RunDir.for_config(cfg)

    # data -> train: finite losses, an adapter on every linear layer kind of the family
    _step("data", cfg)
    result, mem = _step("train", cfg)
    losses = [e.values["loss"] for e in mem.of_type("metric") if e.split == "train" and "loss" in e.values]
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert result.summary["steps"] == 3
    adapter = json.loads((run.adapter / "adapter_config.json").read_text())
    targets = adapter["target_modules"]
    assert {m.rsplit(".", 1)[-1] for m in (targets if isinstance(targets, list) else [targets])} == EXPECTED_TARGETS[family]
    with safe_open(str(run.adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and not any("lm_head" in n or "embed" in n for n in names)
    if family == "qwen3_5":  # the recurrent layers are adapted, and training did not pack examples
        assert any(".linear_attn.in_proj_qkv." in n for n in names) and any(".self_attn.q_proj." in n for n in names)
        assert any("padded batches" in e.message for e in mem.of_type("log")), [e.message for e in mem.of_type("log")]

    # merge: a plain transformers checkpoint of the same family
    result, _ = _step("merge", cfg)
    merged = json.loads((run.merged / "config.json").read_text())
    assert merged["model_type"] == json.loads((model / "config.json").read_text())["model_type"]
    assert list(run.merged.glob("*.safetensors")) and not list(run.merged.glob("adapter_*"))
    assert result.summary["parity"]["passed"]

    # GGUF: converted by llama.cpp's converter and accepted against the merged model in llama.cpp
    result, mem = _step("export", cfg)
    gguf = result.summary["formats"]["gguf"]
    assert gguf["refused"] == []
    (row,) = gguf["rows"]
    path = run.exports / "gguf" / row["file"]
    assert row["type"] == "f32" and path.is_file() and row["bytes"] == path.stat().st_size
    assert row["verdict"] == "accepted", row
    assert row["decided"] >= 20 and row["decided_agreement"] >= 0.99, row
    assert row["top1_agreement"] >= 0.95, row
    assert row["perplexity"] > 1 and abs(row["delta_perplexity"]) < 0.01 * row["perplexity"], row
    assert row["replies_stopped"].endswith("/6")

    # llama.cpp (llama-cpp-python) loads the file on its own: vocabulary, architecture, a few tokens evaluated
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    try:
        arch = {"qwen3_5": "qwen35", "gemma4": "gemma4"}[family]
        assert llm.metadata["general.architecture"] == arch
        assert llm.n_vocab() == json.loads((model / "config.json").read_text())["vocab_size"]
        tokens = llm.tokenize(b"Opening hours are 9:00 to 17:00.", add_bos=False)
        assert 4 <= len(tokens) < 20
        llm.eval(tokens)
        assert llm.n_tokens == len(tokens)
        assert all(math.isfinite(float(x)) for x in llm.scores[len(tokens) - 1][:100])
    finally:
        llm.close()


def test_gemma4_trains_packed_with_its_sliding_window_and_merges(tmp_path, tiny_model_factory):
    """Gemma 4 text: padding-free batches (its sliding-window layers are honoured inside each example,
    see tests/pipeline/train/test_fast.py), LoRA on every projection, a merged checkpoint whose config
    the converter can read. (Its GGUF needs a SentencePiece-style tokenizer: the converter's Gemma 4
    vocabulary is read with LlamaHfVocab, which the byte-level SmolLM2 tokenizer is not.)"""
    from loratui.exporters.convert_entry import legacy_hparams

    model = tiny_model_factory(family="gemma4", tokenizer="smollm2")
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", "name=g4", f"model.base={model}",
                             "data.source=quickstart", "train.max_steps=3", "train.batch_size=4",
                             "train.grad_accum=1", "train.lr=2e-2", "train.warmup_ratio=0"])
    run = RunDir.for_config(cfg)
    result, mem = _step("train", cfg)
    losses = [e.values["loss"] for e in mem.of_type("metric") if e.split == "train" and "loss" in e.values]
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert any("padding-free batches" in e.message for e in mem.of_type("log"))
    targets = json.loads((run.adapter / "adapter_config.json").read_text())["target_modules"]
    assert EXPECTED_TARGETS["gemma4"] <= {m.rsplit(".", 1)[-1] for m in targets}
    result, _ = _step("merge", cfg)
    assert result.summary["parity"]["passed"]
    merged = json.loads((run.merged / "config.json").read_text())
    assert merged["model_type"] == "gemma4_text" and "global_head_dim" not in merged  # transformers 5's form
    legacy = legacy_hparams(merged)
    assert legacy["global_head_dim"] == 32 and legacy["head_dim"] == 16


def test_converter_config_keys_are_derived_from_transformers5_configs(tiny_model_factory):
    from loratui.exporters.convert_entry import has_mtp_tensors, legacy_hparams

    path = tiny_model_factory(family="qwen3_5", tokenizer="smollm2")
    config = json.loads((path / "config.json").read_text())
    assert "full_attention_interval" not in config and legacy_hparams(config)["full_attention_interval"] == 4
    assert not has_mtp_tensors(path)  # transformers drops Qwen3.5's MTP head: the converter is told --no-mtp
    # an irregular pattern is not summarized by an interval
    odd = legacy_hparams({"layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]})
    assert "full_attention_interval" not in odd
    # nested text configs (the ...ForConditionalGeneration checkpoints) too
    nested = legacy_hparams({"text_config": {"layer_types": ["sliding_attention", "full_attention"],
                                             "per_layer_config": {"1": {"head_dim": 512, "num_key_value_heads": 1}}}})
    assert nested["text_config"]["global_head_dim"] == 512 and nested["text_config"]["num_global_key_value_heads"] == 1
