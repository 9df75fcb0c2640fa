"""The padding-free path computes the same loss and gradients as padded batches."""

from __future__ import annotations

import pytest
import torch

from loratui.pipeline.train.fast import (
    IGNORE,
    PaddingFreeCollator,
    packed_loss,
    register_attention,
    shared_prefix,
    supports_padding_free,
)


def _examples(prefix: list[int], n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        own = torch.randint(5, 200, (6 + 3 * i,), generator=g).tolist()
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
    examples = _examples(list(range(10, 10 + prefix_len)))
    padded_model = _model(tiny_llama, "sdpa")
    reference = _padded_loss(padded_model, examples)
    reference.backward()
    want = _grads(padded_model)

    fast_model = _model(tiny_llama, register_attention())
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


def test_examples_never_attend_to_each_other(tiny_llama):
    """Changing one example leaves the other examples' loss terms unchanged."""
    model = _model(tiny_llama, register_attention())
    examples = _examples([], 3)
    collate = PaddingFreeCollator(share_prefix=False)

    def per_token(exs):
        batch = collate(exs)
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    cu_seq_lens_q=batch["cu_seq_lens_q"], loratui_prefix=0)
        return out.logits[0], batch["cu_seq_lens_q"].tolist()

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
    from transformers import AutoModelForCausalLM

    assert supports_padding_free(AutoModelForCausalLM.from_pretrained(str(tiny_llama)))
