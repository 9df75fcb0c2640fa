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
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Opening hours?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    assert tok.decode(ids[0]).startswith("<|im_start|>")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 or tok.eos_token_id in out[0, ids.shape[1] :].tolist()
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


def test_tiny_t5_loads_trains_and_generates(tiny_model_factory):
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    path = tiny_model_factory(family="t5", tokenizer="bpe")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "t5" and config.is_encoder_decoder
    model = AutoModelForSeq2SeqLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>") and tok.chat_template is None
    assert config.decoder_start_token_id == tok.pad_token_id == model.generation_config.decoder_start_token_id
    assert config.vocab_size == len(tok)
    inputs = tok("Opening hours?", return_tensors="pt")
    labels = tok("9:00 to 17:00</s>", return_tensors="pt").input_ids
    assert torch.isfinite(model(**inputs, labels=labels).loss)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out[0, 0] == tok.pad_token_id and out.shape[1] <= 5


@pytest.mark.parametrize(
    "family,model_type,layer_kinds",
    [
        ("qwen3_5", "qwen3_5_text", {"linear_attention", "full_attention"}),
        ("gemma4", "gemma4_text", {"sliding_attention", "full_attention"}),
    ],
)
def test_transformers5_families_load_and_generate(tiny_model_factory, family, model_type, layer_kinds):
    """Families that exist only in transformers 5: both layer kinds present, small, and they generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_factory(family=family, tokenizer="smollm2")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == model_type and set(cfg["layer_types"]) == layer_kinds
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000 and cfg["vocab_size"] == len(tok)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Opening hours?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 or tok.eos_token_id in out[0, ids.shape[1] :].tolist()
    # cached generation (recurrent state / sliding-window cache) agrees with a full forward pass
    with torch.no_grad():
        full = model(out).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
    assert full.tolist() == out[0, ids.shape[1] :].tolist()
