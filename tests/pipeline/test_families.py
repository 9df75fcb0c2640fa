"""The family registry: presets per family, the attention that honours each family, up-front refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.pipeline import families
from loratui.pipeline.errors import LoratuiError


def _model_dir(tmp_path: Path, **config: object) -> Path:
    out = tmp_path / "model"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_every_model_type_belongs_to_one_family() -> None:
    seen: dict[str, str] = {}
    for family in families.FAMILIES:
        for model_type in family.model_types:
            assert model_type not in seen, f"{model_type} in {seen.get(model_type)} and {family.key}"
            seen[model_type] = family.key
        assert set(family.unsupported) <= set(families.CHECKED)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "llama"}, ["q_proj", "v_proj"]),
        ({"model_type": "phi3"}, ["qkv_proj"]),  # fused projections: q_proj does not exist there
        ({"model_type": "t5"}, ["q", "v"]),
        ({"model_type": "never-heard-of"}, ["q_proj", "v_proj"]),
    ],
)
def test_attention_preset_names_the_family_projections(config: dict, expected: list[str]) -> None:
    assert families.lora_targets("attention", config) == {"target_modules": expected}


def test_all_linear_reaches_moe_experts_stored_as_parameters() -> None:
    out = families.lora_targets("all-linear", {"model_type": "qwen3_moe"})
    assert out["target_modules"] == "all-linear"
    assert out["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert families.lora_targets("mlp", {"model_type": "gpt_oss"}) == {
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    }


def test_all_linear_keeps_to_the_language_model_of_a_multimodal_checkpoint() -> None:
    import re

    out = families.lora_targets("all-linear", {"model_type": "gemma3", "vision_config": {}, "text_config": {}})
    pattern = re.compile(out["target_modules"])
    assert pattern.fullmatch("model.language_model.layers.0.self_attn.q_proj")
    assert pattern.fullmatch("model.language_model.layers.3.mlp.down_proj")
    assert not pattern.fullmatch("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("model.multi_modal_projector.mm_input_projection")
    # the text-only checkpoint has no tower: plain all-linear
    assert families.lora_targets("all-linear", {"model_type": "gemma3_text"}) == {"target_modules": "all-linear"}


def test_a_list_of_names_is_used_as_given() -> None:
    assert families.lora_targets(["q_proj"], {"model_type": "phi3"}) == {"target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "gemma2", "attn_logit_softcapping": 50.0}, "eager"),  # SDPA drops the soft-cap
        ({"model_type": "gemma2", "attn_logit_softcapping": None}, "sdpa"),
        ({"model_type": "gpt_oss"}, "eager"),  # attention sinks
        ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, "sdpa"),
        ({"model_type": "llama"}, "sdpa"),
    ],
)
def test_attention_implementation_honours_the_family(config: dict, expected: str) -> None:
    assert families.attention_implementation(config) == expected


def test_attention_implementation_of_a_class_without_sdpa() -> None:
    class NoSdpa:
        _supports_sdpa = False

    assert families.attention_implementation({"model_type": "whatever"}, NoSdpa) == "eager"


def test_check_refuses_up_front_with_reason_and_alternative(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, model_type="olmo2")
    with pytest.raises(LoratuiError) as e:
        families.check(model, ["train", "gguf", "onnx"])
    assert "onnx" in e.value.message and "OLMo 2" in e.value.message
    assert "export.formats" in (e.value.hint or "")
    assert families.check(model, ["train", "gguf"]).key == "olmo2"


def test_unknown_family_warns_once_and_runs(tmp_path: Path) -> None:
    model = _model_dir(tmp_path, model_type="brand_new_arch")
    warnings: list[str] = []
    assert families.check(model, ["train", "gguf", "onnx"], warn=warnings.append) is None
    assert len(warnings) == 1 and "brand_new_arch" in warnings[0] and "generic" in warnings[0]


def test_family_of_reads_the_text_config_of_a_multimodal_model() -> None:
    assert families.family_of({"model_type": "unknown_vlm", "text_config": {"model_type": "qwen3"}}).key == "qwen3"


def test_run_refuses_an_impossible_export_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`loratui run` with an ONNX export of an OLMo 2 model stops before the data step, not after training."""
    from loratui.pipeline import run_all as run_all_module
    from loratui.pipeline.config import RunConfig

    model = _model_dir(tmp_path, model_type="olmo2")
    cfg = RunConfig.model_validate(
        {
            "name": "olmo",
            "model": {"base": str(model)},
            "data": {"source": "quickstart"},
            "export": {"formats": ["gguf", "onnx"]},
        }
    )
    ran: list[str] = []
    monkeypatch.setattr(run_all_module, "run_step", lambda name, *a, **k: ran.append(name))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoratuiError, match="onnx"):
        run_all_module.run_all(cfg)
    assert ran == []


def test_the_alternatives_offered_are_formats_the_family_can_take(tmp_path: Path) -> None:
    ministral = families.refusal(_model_dir(tmp_path, model_type="ministral"), "onnx")
    assert "gguf" not in ministral.hint and "safetensors" in ministral.hint
    olmo = families.refusal(_model_dir(tmp_path, model_type="olmo2"), "onnx")
    assert "gguf or safetensors" in olmo.hint


@pytest.mark.parametrize(("family", "expected"), [("gemma2", "eager"), ("gpt_oss", "eager"), ("llama", "sdpa")])
def test_inference_loads_each_family_with_the_attention_that_computes_it(
    tiny_model_factory, family: str, expected: str
) -> None:
    """Evaluation, merge parity, export references and serving all load through load_torch."""
    from loratui.pipeline.eval.runtimes import load_torch

    model = load_torch(tiny_model_factory(family=family, tokenizer="bpe"), "causal", "cpu", "fp32")
    assert model.config._attn_implementation == expected
