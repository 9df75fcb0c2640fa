"""The tiny-model factory that every later step is tested on first."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tokenizer", ["bpe", "smollm2"])
def test_tiny_model_loads_and_generates(tiny_model_factory, family, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory(family=family, tokenizer=tokenizer)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["num_hidden_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    ids = tok.apply_chat_template([{"role": "user", "content": "Opening hours?"}], add_generation_prompt=True,
                                  return_tensors="pt")
    assert tok.decode(ids[0]).startswith("<|im_start|>")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 or tok.eos_token_id in out[0, ids.shape[1]:].tolist()
    text = "Visit https://example.org/help or mail info@example.org"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_models_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    from tests.tiny_models import make_tiny_model

    a = load_file(make_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=4) / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)
