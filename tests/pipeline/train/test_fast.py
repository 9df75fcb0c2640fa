"""The padding-free path computes the same loss and gradients as padded batches."""

from __future__ import annotations

import functools

import pytest
import torch

from loratui.pipeline.train.fast import (
    IGNORE,
    PaddingFreeCollator,
    carries_state,
    packed_loss,
    padding_free_possible,
    register_attention,
    shared_prefix,
    supports_padding_free,
)


def _examples(prefix: list[int], n: int = 4, extra: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        own = torch.randint(5, 200, (6 + 3 * i + extra,), generator=g).tolist()
        answer = torch.randint(5, 200, (4 + i,), generator=g).tolist()
        ids = prefix + own + answer
        labels = [IGNORE] * (len(prefix) + len(own)) + answer
        out.append({"input_ids": ids, "labels": labels})
    return out


def _model(path, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, config)


def _padded_loss(model, examples):
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (longest - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE] * (longest - len(e["labels"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"])) for e in examples])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("prefix_len", [0, 7])
@pytest.mark.parametrize("keep_logits", [True, False])
def test_padding_free_equals_padded(tiny_llama, prefix_len, keep_logits):
    _check_padding_free_equals_padded(tiny_llama, _examples(list(range(10, 10 + prefix_len))), prefix_len, keep_logits)


@pytest.mark.parametrize("prefix_len", [0, 7])
def test_padding_free_equals_padded_with_sliding_window_layers(tiny_model_factory, prefix_len):
    """Gemma 4 (transformers 5 only): sliding-window layers (a 32-token window, tests/tiny_models.py) and
    full layers with other head sizes. The examples are longer than the window, so it must cut inside
    each packed example, counting the shared prefix, as transformers' own masks do."""
    from tests.tiny_models import GEMMA4_WINDOW

    model = tiny_model_factory(family="gemma4", tokenizer="bpe")
    examples = _examples(list(range(10, 10 + prefix_len)), extra=30)
    assert min(len(e["input_ids"]) for e in examples) > GEMMA4_WINDOW
    _check_padding_free_equals_padded(model, examples, prefix_len, keep_logits=True)


def _check_padding_free_equals_padded(path, examples, prefix_len, keep_logits):
    padded_model = _model(path, "sdpa")
    assert supports_padding_free(padded_model)
    reference = _padded_loss(padded_model, examples)
    reference.backward()
    want = _grads(padded_model)

    fast_model = _model(path, register_attention())
    batch = PaddingFreeCollator(share_prefix=True)(examples)
    assert int(batch["loratui_prefix"]) == (prefix_len if prefix_len >= 4 else 0)
    assert int(batch["num_tokens"]) == sum(len(e["input_ids"]) for e in examples)
    # computed tokens: the shared prefix once, not once per example
    assert batch["input_ids"].shape[1] == int(batch["num_tokens"]) - prefix_len * (len(examples) - 1)
    trained = sum(sum(1 for x in e["labels"] if x != IGNORE) for e in examples)
    loss, _ = packed_loss(fast_model, batch, torch.tensor(trained), keep_logits)
    loss.backward()
    got = _grads(fast_model)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def _packed_logits(model, exs):
    """Logits of the examples packed into one row (no shared prefix), and the segment bounds."""
    batch = PaddingFreeCollator(share_prefix=False)(exs)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                cu_seq_lens_q=batch["cu_seq_lens_q"], loratui_prefix=0)
    return out.logits[0], batch["cu_seq_lens_q"].tolist()


def test_examples_never_attend_to_each_other(tiny_llama):
    """Changing one example leaves the other examples' loss terms unchanged."""
    model = _model(tiny_llama, register_attention())
    examples = _examples([], 3)
    per_token = functools.partial(_packed_logits, model)

    with torch.no_grad():
        before, bounds = per_token(examples)
        changed = [examples[0], {"input_ids": [7] * len(examples[1]["input_ids"]), "labels": examples[1]["labels"]},
                   examples[2]]
        after, _ = per_token(changed)
    for i in (0, 2):
        s, e = bounds[i], bounds[i + 1]
        torch.testing.assert_close(after[s:e], before[s:e])
    assert not torch.allclose(after[bounds[1]:bounds[2]], before[bounds[1]:bounds[2]])


def test_shared_prefix_stops_at_trained_tokens():
    a = {"input_ids": [1, 2, 3, 4, 5, 6, 9], "labels": [IGNORE] * 4 + [5, 6, 9]}
    b = {"input_ids": [1, 2, 3, 4, 5, 6, 8], "labels": [IGNORE] * 7}
    # tokens 1-6 are shared, but a's label 5 at position 4 is predicted from position 3: prefix is 3 long
    assert shared_prefix([a, b]) == 0  # 3 < the minimum worth sharing
    c = {"input_ids": list(range(20)) + [1], "labels": [IGNORE] * 12 + list(range(12, 20)) + [1]}
    d = {"input_ids": list(range(20)) + [2], "labels": [IGNORE] * 21}
    assert shared_prefix([c, d]) == 11
    assert shared_prefix([c]) == 0  # one example: nothing to share


def test_padding_free_support(tiny_llama, tiny_model_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert supports_padding_free(AutoModelForCausalLM.from_pretrained(str(tiny_llama)))
    for family in ("llama", "gemma4"):
        config = AutoConfig.from_pretrained(str(tiny_model_factory(family=family, tokenizer="bpe")))
        assert not carries_state(config) and padding_free_possible(config, AutoModelForCausalLM._model_mapping[type(config)])


def test_a_linear_attention_model_is_not_packed(tiny_model_factory):
    """Qwen3.5 (transformers 5 only): Gated-DeltaNet layers run a state (and a short convolution) along
    the row. Packed, one example's tokens change the next example's outputs (in transformers 5.19 the
    layers do not honour the segment bounds), so such a model trains on padded batches."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_model_factory(family="qwen3_5", tokenizer="bpe")
    config = AutoConfig.from_pretrained(str(path))
    assert "linear_attention" in config.layer_types and "full_attention" in config.layer_types
    assert carries_state(config)
    assert not padding_free_possible(config, AutoModelForCausalLM._model_mapping[type(config)])
    model = _model(path, register_attention())
    assert not supports_padding_free(model)

    # why: packed anyway, changing example 1 changes example 2's logits
    examples = _examples([], 3)
    logits = functools.partial(_packed_logits, model)

    with torch.no_grad():
        before, bounds = logits(examples)
        after, _ = logits([examples[0], {**examples[1], "input_ids": [7] * len(examples[1]["input_ids"])}, examples[2]])
    torch.testing.assert_close(after[:bounds[1]], before[:bounds[1]])  # causal: the first example is untouched
    assert not torch.allclose(after[bounds[2]:], before[bounds[2]:], atol=1e-4)  # the state leaked into the third
