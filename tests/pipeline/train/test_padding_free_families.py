"""Padding-free training is exact for every model family it accepts, and refuses the others with a reason.

For each decoder family of tests/tiny_models.py, the same examples (of different lengths, all longer
than the families' 8-token sliding windows, with and without a shared prompt prefix) are trained two
ways, in float32 with a LoRA adapter on every linear layer:

* the reference: a right-padded batch with labels through the model loaded with transformers' own
  ``eager`` attention (SDPA would not do: in transformers 5.19 it silently drops Gemma 2's logit
  soft-capping, and gpt-oss has no SDPA path for its attention sinks);
* padding-free: :class:`PaddingFreeCollator` + :func:`packed_loss` through the model loaded with
  :func:`register_attention`.

Loss and every trainable gradient (gpt-oss: its sinks too) must agree to float precision.
"""

from __future__ import annotations

import pytest
import torch

from loratui.pipeline.train import head_loss
from loratui.pipeline.train.fast import (
    IGNORE,
    PaddingFreeCollator,
    accepts_logits_to_keep,
    packed_loss,
    padding_free_possible,
    padding_free_refusal,
    register_attention,
    supports_padding_free,
)
from tests.tiny_models import CAUSAL_FAMILIES, SLIDING_WINDOW

STATEFUL = ("qwen3_5",)  # Gated DeltaNet layers: padding-free stays off
PACKABLE = [f for f in CAUSAL_FAMILIES if f not in STATEFUL]
EXPLICIT = ("gemma2", "gpt_oss")
MOE = ("qwen3_moe", "gpt_oss")  # soft-capping / attention sinks: varlen_attention's explicit path


def _examples(prefix_len: int, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    prefix = list(range(10, 10 + prefix_len))
    out = []
    for i in range(n):
        own = torch.randint(5, 200, (6 + 3 * i,), generator=g).tolist()
        answer = torch.randint(5, 200, (4 + i,), generator=g).tolist()
        out.append({"input_ids": prefix + own + answer, "labels": [IGNORE] * (prefix_len + len(own)) + answer})
    return out


def _model(path, attn: str, family: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32)
    # MoE experts are 3-D Parameters in transformers 5, which all-linear does not reach
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if family in MOE else None
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", target_parameters=experts, init_lora_weights=False
    )
    torch.manual_seed(1)
    model = get_peft_model(model, config)
    if family == "gpt_oss":  # train the sinks too, so their gradient through the explicit path is checked
        for name, param in model.named_parameters():
            if name.endswith("self_attn.sinks"):
                param.requires_grad_(True)
    return model


def _padded(examples):
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (longest - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE] * (longest - len(e["labels"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"])) for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def compare(path, family: str, prefix_len: int) -> tuple[float, float]:
    """Padded eager loss and gradients vs padding-free; returns |loss difference| and the largest gradient
    difference relative to its tensor's largest gradient."""
    examples = _examples(prefix_len)
    assert min(len(e["input_ids"]) for e in examples) > SLIDING_WINDOW

    reference_model = _model(path, "eager", family)
    reference = reference_model(**_padded(examples)).loss
    reference.backward()
    want = _grads(reference_model)

    fast_model = _model(path, register_attention(), family)
    assert supports_padding_free(fast_model)
    batch = PaddingFreeCollator(share_prefix=True)(examples)
    assert int(batch["loratui_prefix"]) == prefix_len
    trained = sum(sum(1 for x in e["labels"] if x != IGNORE) for e in examples)
    # twice: the first batch runs the model's own head and checks the blocked one against its logits,
    # the second runs the head and the loss in vocabulary blocks (made small here, so there are several)
    losses, grads = [], []
    for _ in range(2):
        fast_model.zero_grad()
        loss, outputs = packed_loss(fast_model, batch, torch.tensor(trained), accepts_logits_to_keep(fast_model))
        loss.backward()
        losses.append(loss.item())
        grads.append(_grads(fast_model))
    assert outputs.logits.shape[1] == 0, "the second batch should run the LM head and the loss in blocks"

    assert losses == pytest.approx([reference.item()] * 2, rel=1e-5, abs=1e-6)
    assert want and all(want.keys() == got.keys() for got in grads)
    if family in MOE:
        assert any("experts" in name for name in want)
    grad_diff = 0.0  # relative to the tensor's largest gradient: Granite's multipliers make them ~1e-5
    for got in grads:
        for name in want:
            scale = want[name].abs().max().item()
            assert scale > 0, name
            torch.testing.assert_close(got[name], want[name], atol=1e-4 * scale, rtol=1e-4, msg=name)
            grad_diff = max(grad_diff, (got[name] - want[name]).abs().max().item() / scale)

    # the registered attention on an ordinary padded batch (evaluation, no segment bounds) is exact too
    with torch.no_grad():
        padded = fast_model(**_padded(examples)).loss
    assert padded.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    return max(abs(x - reference.item()) for x in losses), grad_diff


@pytest.mark.parametrize("prefix_len", [0, 7])
@pytest.mark.parametrize("family", PACKABLE)
def test_padding_free_equals_eager_padded(tiny_model_factory, family, prefix_len, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setattr(
        head_loss, "head_block_rows", lambda weight: 97
    )  # several vocabulary blocks, the last one shorter

    path = tiny_model_factory(family=family, tokenizer="bpe")
    config = AutoConfig.from_pretrained(str(path))
    assert padding_free_refusal(config, AutoModelForCausalLM._model_mapping[type(config)]) is None
    compare(path, family, prefix_len)


def test_gemma2_softcap_matters(tiny_model_factory):
    """Gemma 2's soft-capping (1.0 in the tiny model) changes the loss: SDPA, which drops it in
    transformers 5.19, is off, so the padding-free match above really checks the capped attention."""
    examples = _examples(0)
    path = tiny_model_factory(family="gemma2", tokenizer="bpe")
    with torch.no_grad():
        eager = _model(path, "eager", "gemma2")(**_padded(examples)).loss
        sdpa = _model(path, "sdpa", "gemma2")(**_padded(examples)).loss
    assert abs(eager.item() - sdpa.item()) > 1e-4


@pytest.mark.parametrize("family", EXPLICIT)
def test_generation_with_softcap_and_sinks(tiny_model_factory, family):
    """Without segment bounds (generation with a cache) the registered attention computes soft-capping
    and sinks as eager does: same greedy tokens, same logits."""
    path = tiny_model_factory(family=family, tokenizer="bpe")
    ids = torch.tensor([[5, 17, 42, 99, 7, 123, 64, 8, 9, 250, 31, 77]])
    outs = []
    for attn in ("eager", register_attention()):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        outs.append(out)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_stateful_family_refuses_with_reason(tiny_model_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(tiny_model_factory(family="qwen3_5", tokenizer="bpe")))
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    reason = padding_free_refusal(config, cls)
    assert not padding_free_possible(config, cls)
    assert reason and "linear_attention" in reason and "state" in reason and cls.__name__ in reason


def test_other_refusals():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, T5Config, T5ForConditionalGeneration

    reason = padding_free_refusal(T5Config(), T5ForConditionalGeneration)
    assert reason and "encoder-decoder" in reason
    bidirectional = Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True)
    reason = padding_free_refusal(bidirectional, Gemma3ForCausalLM)
    assert reason and "bidirectional" in reason

    class NoInterface:  # a model whose attention does not go through transformers' interface
        _supports_attention_backend = False

    reason = padding_free_refusal(Gemma3TextConfig(num_hidden_layers=2), NoInterface)
    assert reason and "attention interface" in reason
