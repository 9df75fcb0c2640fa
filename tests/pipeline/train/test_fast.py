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
from loratui.pipeline.train.head_loss import HeadTransform, frozen_head, linear_cross_entropy


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
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
        cu_seq_lens_q=batch["cu_seq_lens_q"],
        loratui_prefix=0,
    )
    return out.logits[0], batch["cu_seq_lens_q"].tolist()


def test_examples_never_attend_to_each_other(tiny_llama):
    """Changing one example leaves the other examples' loss terms unchanged."""
    model = _model(tiny_llama, register_attention())
    examples = _examples([], 3)
    per_token = functools.partial(_packed_logits, model)

    with torch.no_grad():
        before, bounds = per_token(examples)
        changed = [
            examples[0],
            {"input_ids": [7] * len(examples[1]["input_ids"]), "labels": examples[1]["labels"]},
            examples[2],
        ]
        after, _ = per_token(changed)
    for i in (0, 2):
        s, e = bounds[i], bounds[i + 1]
        torch.testing.assert_close(after[s:e], before[s:e])
    assert not torch.allclose(after[bounds[1] : bounds[2]], before[bounds[1] : bounds[2]])


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
        assert not carries_state(config) and padding_free_possible(
            config, AutoModelForCausalLM._model_mapping[type(config)]
        )


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
    torch.testing.assert_close(after[: bounds[1]], before[: bounds[1]])  # causal: the first example is untouched
    assert not torch.allclose(after[bounds[2] :], before[bounds[2] :], atol=1e-4)  # the state leaked into the third


def _plain_loss(hidden, weight, bias, targets, transform):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if transform.divide is not None:
        logits = logits / transform.divide
    if transform.multiply is not None:
        logits = logits * transform.multiply
    if transform.softcap:
        logits = torch.tanh(logits / transform.softcap) * transform.softcap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize(
    "transform",
    [
        HeadTransform(),
        HeadTransform(divide=8.0),
        HeadTransform(multiply=0.0625),
        HeadTransform(softcap=2.0),
        HeadTransform(divide=0.5, softcap=2.0),
    ],
    ids=["plain", "granite", "cohere", "softcap", "scaled-then-capped"],
)
@pytest.mark.parametrize("rows", [7, 50, 1000])  # blocks with a short last one, even blocks, one block
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_the_head_then_the_loss(transform, rows, with_bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 16, generator=g)
    bias = torch.randn(200, generator=g) if with_bias else None
    hidden = torch.randn(9, 16, generator=g)
    targets = torch.tensor([0, 6, 7, 49, 50, 51, 150, 198, 199])  # at block edges
    if transform.softcap:  # logits well past the cap, where tanh bends them
        assert _plain_loss(hidden, weight, bias, targets, HeadTransform()).item() > 0
        assert torch.nn.functional.linear(hidden, weight).abs().max() > 3 * transform.softcap

    want_hidden = hidden.clone().requires_grad_(True)
    want = _plain_loss(want_hidden, weight, bias, targets, transform)
    want.backward()
    got_hidden = hidden.clone().requires_grad_(True)
    got = linear_cross_entropy(got_hidden, weight, bias, targets, transform, rows)
    (got * 3.0).backward()  # the backward scales by the incoming gradient
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # float rounding: the vocabulary is summed in another order (each gradient sums 200 rows)
    scale = want_hidden.grad.abs().max().item()
    torch.testing.assert_close(got_hidden.grad, 3.0 * want_hidden.grad, rtol=1e-4, atol=1e-5 * scale)


def test_linear_cross_entropy_in_bf16_and_without_gradients():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 32, generator=g).bfloat16()
    hidden = torch.randn(5, 32, generator=g).bfloat16().requires_grad_(True)
    targets = torch.tensor([1, 99, 100, 250, 299])
    want = _plain_loss(hidden, weight, None, targets, HeadTransform())
    want.backward()
    want_grad, hidden.grad = hidden.grad, None
    got = linear_cross_entropy(hidden, weight, None, targets, rows=64)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    assert hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), want_grad.float(), rtol=2e-2, atol=2e-3)
    with torch.no_grad():  # evaluation: the loss only
        assert linear_cross_entropy(hidden, weight, None, targets, rows=64).item() == pytest.approx(got.item())


def test_linear_cross_entropy_refuses_what_it_cannot_compute():
    weight = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"\[0, 10\).*got 3 to 10"):
        linear_cross_entropy(torch.randn(2, 4), weight, None, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(torch.randn(2, 4), weight.requires_grad_(True), None, torch.tensor([3, 4]))


def _two_batches(model, batch, trained):
    """packed_loss twice on the same batch: (loss, logits' shape, LoRA gradients) of each."""
    out = []
    for _ in range(2):
        model.zero_grad()
        loss, outputs = packed_loss(model, batch, torch.tensor(trained), keep_logits=True)
        loss.backward()
        out.append((loss.item(), tuple(outputs.logits.shape), _grads(model)))
    return out


def _scaled_llama_class():
    """A Llama that multiplies its logits by 4, which nothing in its config tells."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 4
            return out

    return ScaledLlama


def test_a_model_that_does_more_to_its_logits_than_its_config_says_keeps_its_own_loss(tiny_llama):
    """The first batch's comparison fails (with a warning), and every batch takes the loss from the model's
    own logits: the same loss and gradients as the padded computation of the model's logits."""
    from peft import LoraConfig, get_peft_model

    examples = _examples([], 3)
    batch = PaddingFreeCollator(share_prefix=False)(examples)
    trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples)

    plain = _model(tiny_llama, register_attention())
    (_, _, _), (plain_loss, plain_shape, _) = _two_batches(plain, batch, trained)
    assert plain_shape[1] == 0  # in blocks: the model computed no logits

    torch.manual_seed(0)
    base = _scaled_llama_class().from_pretrained(
        str(tiny_llama), attn_implementation=register_attention(), dtype=torch.float32
    )
    torch.manual_seed(1)
    scaled = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with pytest.warns(UserWarning, match="differ from its head's output"):
        (first, _, first_grads), (second, shape, second_grads) = _two_batches(scaled, batch, trained)
    assert shape[1] == trained  # the model's own logits, every time
    # the reference: the padded batch through the model, cross-entropy of its (scaled) logits
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (longest - len(e["input_ids"])) for e in examples])
    mask = (torch.arange(longest)[None, :] < torch.tensor([len(e["input_ids"]) for e in examples])[:, None]).long()
    labels = torch.tensor([e["labels"] + [IGNORE] * (longest - len(e["labels"])) for e in examples])
    with torch.no_grad():
        logits = scaled(input_ids=ids, attention_mask=mask).logits
    reference = (
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        / trained
    )
    assert first == pytest.approx(reference, abs=1e-5) and second == pytest.approx(reference, abs=1e-5)
    assert abs(second - plain_loss) > 1e-2  # the scaling matters (a thousand times the tolerance)
    for name in first_grads:
        torch.testing.assert_close(second_grads[name], first_grads[name])


def test_a_config_that_says_more_than_the_model_does_keeps_its_own_loss(tiny_llama):
    """A soft-cap in the config that the model class never applies (Llama ignores the field): the
    comparison fails and the model's own loss stands."""
    model = _model(tiny_llama, register_attention())
    model.get_base_model().config.final_logit_softcapping = 0.5
    examples = _examples([], 3)
    batch = PaddingFreeCollator(share_prefix=False)(examples)
    trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples)
    reference = _padded_loss(model, examples).item()
    with pytest.warns(UserWarning, match="final_logit|softcap"):
        (first, _, _), (second, shape, _) = _two_batches(model, batch, trained)
    assert shape[1] == trained and second == pytest.approx(reference, abs=1e-5)


def test_a_head_with_hooks_of_its_own_is_not_replaced(tiny_llama):
    """Someone watching the head's output (a forward hook) would see empty logits: the model's path."""
    model = _model(tiny_llama, register_attention())
    head = frozen_head(model)[0]
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert frozen_head(model) is None
    examples = _examples([], 3)
    trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples)
    _two_batches(model, PaddingFreeCollator(share_prefix=False)(examples), trained)
    assert [s[1] for s in seen] == [trained, trained]


def test_the_blocked_head_without_gradients_and_without_trained_tokens(tiny_llama):
    """Evaluation (no_grad) gives the same loss on the blocked path; a batch with nothing to train gives
    0 and still a gradient graph (every process of a DDP run must take part in the backward)."""
    model = _model(tiny_llama, register_attention())
    examples = _examples([], 3)
    trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples)
    batch = PaddingFreeCollator(share_prefix=False)(examples)
    (_, _, _), (loss, shape, _) = _two_batches(model, batch, trained)
    assert shape[1] == 0
    with torch.no_grad():
        again, outputs = packed_loss(model, batch, torch.tensor(trained), keep_logits=True)
    assert outputs.logits.shape[1] == 0 and again.item() == pytest.approx(loss, rel=1e-6)
    nothing = PaddingFreeCollator(share_prefix=False)([{**e, "labels": [IGNORE] * len(e["labels"])} for e in examples])
    zero, outputs = packed_loss(model, nothing, None, keep_logits=True)
    assert outputs.logits.shape[1] == 0 and zero.item() == 0.0 and zero.requires_grad
    zero.backward()


def test_a_block_of_masked_tokens_is_no_nan():
    """A bias of -inf over a whole block of vocabulary rows (tokens masked out) leaves the loss and the
    gradient finite and equal to the plain computation."""
    g = torch.Generator().manual_seed(0)
    weight, hidden = torch.randn(60, 8, generator=g), torch.randn(4, 8, generator=g)
    bias = torch.zeros(60)
    bias[20:40] = float("-inf")
    targets = torch.tensor([0, 19, 40, 59])
    want_hidden = hidden.clone().requires_grad_(True)
    want = _plain_loss(want_hidden, weight, bias, targets, HeadTransform())
    want.backward()
    got_hidden = hidden.clone().requires_grad_(True)
    got = linear_cross_entropy(got_hidden, weight, bias, targets, rows=20)
    got.backward()
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_hidden.grad, want_hidden.grad, rtol=1e-5, atol=1e-6)


def test_a_trained_head_is_not_computed_in_blocks(tiny_llama):
    """LoRA on the LM head (or a trained head) needs the head's own gradient: the model's path, exact."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_llama), attn_implementation=register_attention(), dtype=torch.float32
    )
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    assert frozen_head(model) is None
    examples = _examples([], 3)
    trained = sum(sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples)
    batch = PaddingFreeCollator(share_prefix=False)(examples)
    (first, _, _), (second, shape, grads) = _two_batches(model, batch, trained)
    assert shape[1] == trained and second == pytest.approx(first)
    assert any("lm_head" in name for name in grads)


def test_head_blocks_are_cache_sized():
    """About 4 MiB of head weights per block: more rows for a narrow or a bf16 head, never thin slices."""
    from loratui.pipeline.train.head_loss import head_block_rows

    assert head_block_rows(torch.empty(262_144, 640)) == 1638  # Gemma 3 270M, fp32
    assert head_block_rows(torch.empty(262_144, 640, dtype=torch.bfloat16)) == 3276
    assert head_block_rows(torch.empty(151_936, 4096)) == 256  # Qwen3-8B: the minimum
