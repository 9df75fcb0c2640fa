"""The estimate's arithmetic against what it models: parameter counts from real configs and tiny models,
the adapter size peft builds, and the memory model's parts and limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.estimate.memory import (
    TrainPlan,
    estimate_memory,
    largest_micro_tokens,
    max_micro_tokens,
)
from loratui.pipeline.estimate.shape import ModelShape

REPO = Path(__file__).resolve().parents[3]
MISTRAL = REPO / "examples" / "mistral-7b"


def _plan(**changes) -> TrainPlan:
    base = TrainPlan(
        device="cpu",
        precision="fp32",
        method="lora",
        r=16,
        target="all-linear",
        micro_batch=8,
        micro_tokens=1024,
        trained_tokens=300,
        padding_free=True,
        gradient_checkpointing=False,
        optimizer="adamw_torch",
    )
    return base.but(**changes)


def test_mistral_7b_config_counts_its_published_parameters():
    shape = ModelShape.read(MISTRAL)
    assert not shape.params_exact  # no weights beside the config
    assert shape.params == 7_241_732_096  # Mistral 7B v0.1's parameter count
    assert shape.disk_dtype_bytes == 2  # saved in bfloat16


def test_a_folder_without_a_config_is_a_clear_error(tmp_path):
    with pytest.raises(LoratuiError, match="config.json"):
        ModelShape.read(tmp_path)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_parameters_and_adapter_size_match_the_real_models(tiny_model_factory, family):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory(family=family, tokenizer="bpe")
    shape = ModelShape.read(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert shape.params_exact and shape.params == sum(p.numel() for p in model.parameters())
    assert shape.analytic_params() == pytest.approx(shape.params, rel=0.02)  # biases aside
    for target, modules in (("all-linear", "all-linear"), ("attention", ["q_proj", "v_proj"])):
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
            LoraConfig(r=8, target_modules=modules, task_type="CAUSAL_LM"),
        )
        trainable, _ = peft_model.get_nb_trainable_parameters()
        assert shape.lora_params(8, target) == trainable, target


def test_memory_parts_follow_the_settings():
    shape = ModelShape.read(MISTRAL)
    lora = estimate_memory(shape, _plan())
    assert lora.parts["weights"] == shape.params * 4  # fp32 on CPU
    assert lora.parts["optimizer"] == 2 * lora.parts["adapter"]  # AdamW: two moments per weight
    qlora = estimate_memory(shape, _plan(method="qlora"))
    assert qlora.parts["weights"] < lora.parts["weights"] / 3
    checkpointed = estimate_memory(shape, _plan(gradient_checkpointing=True))
    assert checkpointed.parts["activations"] < lora.parts["activations"] / 4
    bf16 = estimate_memory(shape, _plan(device="cuda", precision="bf16"))
    assert bf16.parts["weights"] == shape.params * 2
    eight_bit = estimate_memory(shape, _plan(device="cuda", precision="bf16", optimizer="adamw_bnb_8bit"))
    assert eight_bit.parts["optimizer"] == lora.parts["optimizer"] // 4
    padded = estimate_memory(shape, _plan(padding_free=False))
    assert padded.parts["logits"] > lora.parts["logits"] * 3  # every position, three copies


def test_the_token_budget_is_the_largest_that_fits():
    shape = ModelShape.read(MISTRAL)
    plan = _plan(device="cuda", precision="bf16")
    available = 40 << 30
    tokens = max_micro_tokens(shape, plan, available)
    assert tokens > 0
    share = plan.trained_tokens / plan.micro_tokens

    def total(n: int) -> int:
        return estimate_memory(shape, plan.but(micro_tokens=n, trained_tokens=int(n * share))).total

    assert total(tokens) <= available < total(tokens + 64)
    assert max_micro_tokens(shape, plan, 1 << 30) == 0  # the weights alone do not fit


def test_largest_micro_batch_is_the_longest_examples():
    lengths = [10, 50, 20, 40, 30]
    assert largest_micro_tokens(lengths, 2, padding_free=True) == 90
    assert largest_micro_tokens(lengths, 2, padding_free=False) == 100


def test_a_reference_forward_costs_one_more_pass_of_the_body():
    from loratui.pipeline.estimate.timing import train_flops_per_token

    shape = ModelShape.read(MISTRAL)
    plain = train_flops_per_token(shape, _plan(), trained_share=0.5)
    dpo = train_flops_per_token(shape, _plan(reference_forward=True), trained_share=0.5)
    # forward + input gradients = 2 passes; the reference adds a third forward, and its head on trained tokens
    assert 1.45 < dpo / plain < 1.55
    assert estimate_memory(shape, _plan(reference_forward=True)).total == estimate_memory(shape, _plan()).total
