"""onnx_entry.py: transformers-5 configs given the form onnxruntime-genai's builder reads."""

from __future__ import annotations

from types import SimpleNamespace

from loratui.exporters.onnx_entry import flatten_rope


def test_per_layer_type_rope_becomes_global_and_local_bases() -> None:
    config = SimpleNamespace(
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    )
    flatten_rope(config)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert config.rope_theta == 1e6 and config.rope_local_base_freq == 1e4


def test_nested_text_config_and_flat_configs() -> None:
    text = SimpleNamespace(
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    )
    outer = SimpleNamespace(text_config=text)
    flatten_rope(outer)
    assert text.rope_parameters["rope_type"] == "linear" and text.rope_local_base_freq == 1e4
    flat = SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5})
    assert flatten_rope(flat).rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}
    assert not hasattr(flat, "rope_local_base_freq")
