"""The converter's view of transformers-5 configs (Qwen3.5, Gemma 4): the keys llama.cpp's converter reads,
derived from what transformers 5 writes. These families' way through every step is
tests/pipeline/test_family_matrix.py."""

from __future__ import annotations

import json


def test_converter_config_keys_are_derived_from_transformers5_configs(tiny_model_factory):
    from loratui.exporters.convert_entry import has_mtp_tensors, legacy_hparams

    path = tiny_model_factory(family="qwen3_5", tokenizer="smollm2")
    config = json.loads((path / "config.json").read_text())
    assert "full_attention_interval" not in config and legacy_hparams(config)["full_attention_interval"] == 4
    assert not has_mtp_tensors(path)  # transformers drops Qwen3.5's MTP head: the converter is told --no-mtp
    # an irregular pattern is not summarized by an interval
    odd = legacy_hparams(
        {"layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]}
    )
    assert "full_attention_interval" not in odd
    # nested text configs (the ...ForConditionalGeneration checkpoints) too
    nested = legacy_hparams(
        {
            "text_config": {
                "layer_types": ["sliding_attention", "full_attention"],
                "per_layer_config": {"1": {"head_dim": 512, "num_key_value_heads": 1}},
            }
        }
    )
    assert nested["text_config"]["global_head_dim"] == 512 and nested["text_config"]["num_global_key_value_heads"] == 1
