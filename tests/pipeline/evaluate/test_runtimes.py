"""The PyTorch EvalModel: batched left-padded greedy generation and per-example loss match unbatched runs."""

from __future__ import annotations

import pytest
import torch

from loratui.pipeline.evaluate.runtimes import IGNORE, Example, TorchModel, _batches, cut_at_stop, load_torch


@pytest.fixture
def model(tiny_llama):
    torch.manual_seed(0)
    return load_torch(tiny_llama, "causal", "cpu", "fp32")


def test_batches_respect_rows_and_tokens():
    lengths = [3, 3, 10, 10, 10]
    assert _batches(list(range(5)), lengths, rows=4, tokens=20) == [[0, 1], [2, 3], [4]]
    assert _batches([0, 1], [3, 3], rows=1, tokens=100) == [[0], [1]]


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7], {2}) == [5, 6]
    assert cut_at_stop([5, 6], {2}) == [5, 6]


def test_batched_generation_equals_one_prompt_at_a_time(model):
    prompts = [[5, 9, 12], [7, 8, 9, 10, 11, 12, 13], [20], [3, 4, 5, 6]]
    batched = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids=set(), batch_size=4)
    single = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids=set(), batch_size=1)
    seen: list[int] = []
    got = batched.generate(prompts, 6, progress=seen.append)
    assert got == single.generate(prompts, 6)
    assert all(len(g) == 6 for g in got) and sum(seen) == len(prompts)
    # and equal to a plain forward-pass greedy decode of the first prompt
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got[0] == ids[0, 3:].tolist()


def test_generation_stops_at_a_stop_token(model):
    free = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids=set()).generate([[5, 9, 12]], 6)[0]
    stop = free[2]
    cut = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids={stop}).generate([[5, 9, 12]], 6)[0]
    assert cut == free[:free.index(stop)]


def test_nll_equals_the_models_own_loss(model):
    examples = [Example(input_ids=[5, 6, 7, 8, 9], labels=[IGNORE, IGNORE, 7, 8, 9]),
                Example(input_ids=[4, 3, 2, 11, 12, 13, 14, 15], labels=[IGNORE] * 5 + [13, 14, 15])]
    got = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids=set(), batch_size=2).nll(examples)
    for e, (total, count) in zip(examples, got):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
        assert count == 3  # labels shift by one: positions 2.. predict 3 tokens
        assert total / count == pytest.approx(out.loss.item(), rel=1e-5)
