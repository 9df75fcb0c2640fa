"""The PyTorch EvalModel: batched left-padded greedy generation and per-example loss match unbatched runs."""

from __future__ import annotations

import pytest
import torch

from loratui.pipeline.eval.runtimes import IGNORE, Example, TorchModel, _batches, cut_at_stop, load_torch


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
    candidates = [[a, b, c] for a in range(5, 40, 7) for b in (3, 11) for c in (17, 23)]
    replies = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids=set()).generate(candidates, 8)
    # a prompt whose greedy reply is not one token repeated (a random tiny model often repeats)
    prompt, free = next((p, r) for p, r in zip(candidates, replies) if len(set(r)) > 1)
    stop = next(t for t in free if t != free[0])  # a token that first appears after the reply started
    cut = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids={stop}).generate([prompt], 8)[0]
    assert 0 < len(cut) < len(free) and cut == free[: free.index(stop)]


def test_the_models_generation_config_is_not_applied(model):
    plain = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids=set()).generate([[5, 9, 12]], 8)[0]
    model.generation_config.repetition_penalty = 50.0  # would change greedy replies if it were applied
    model.generation_config.min_new_tokens = 8
    try:
        again = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids={plain[0]}).generate([[5, 9, 12]], 8)[0]
    finally:
        model.generation_config.repetition_penalty = 1.0
        model.generation_config.min_new_tokens = None
    assert again == []  # stopped at once: min_new_tokens was not applied either


def test_seq2seq_generation_and_loss(tiny_model_factory):
    t5 = load_torch(tiny_model_factory(family="t5"), "seq2seq", "cpu", "fp32")
    prompts = [[5, 9, 12, 1], [7, 8, 9, 10, 11, 1], [20, 1]]
    batched = TorchModel(t5, name="t", task="seq2seq", pad_id=0, stop_ids={1}, batch_size=3).generate(prompts, 5)
    assert batched == TorchModel(t5, name="t", task="seq2seq", pad_id=0, stop_ids={1}, batch_size=1).generate(
        prompts, 5
    )
    with torch.no_grad():  # the slice after the decoder start token is the model's own greedy decode
        ids = torch.tensor([[t5.config.decoder_start_token_id]])
        for _ in range(5):
            nxt = t5(input_ids=torch.tensor([prompts[0]]), decoder_input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert batched[0] == cut_at_stop(ids[0, 1:].tolist(), {0, 1})
    examples = [Example(input_ids=[5, 9, 12, 1], labels=[30, 31, 1]), Example(input_ids=[7, 8, 1], labels=[40, 1])]
    got = TorchModel(t5, name="t", task="seq2seq", pad_id=0, stop_ids={1}, batch_size=2).nll(examples)
    for e, (total, count) in zip(examples, got):
        with torch.no_grad():
            want = t5(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
        assert count == len(e.labels) and total / count == pytest.approx(want, rel=1e-5)


def test_nll_equals_the_models_own_loss(model):
    examples = [
        Example(input_ids=[5, 6, 7, 8, 9], labels=[IGNORE, IGNORE, 7, 8, 9]),
        Example(input_ids=[4, 3, 2, 11, 12, 13, 14, 15], labels=[IGNORE] * 5 + [13, 14, 15]),
    ]
    got = TorchModel(model, name="t", task="causal", pad_id=0, stop_ids=set(), batch_size=2).nll(examples)
    for e, (total, count) in zip(examples, got):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
        assert count == 3  # labels shift by one: positions 2.. predict 3 tokens
        assert total / count == pytest.approx(out.loss.item(), rel=1e-5)


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_load_torch_puts_the_model_on_the_chosen_device(monkeypatch, device):
    """The model class is replaced: where load_torch would move the model, without a GPU here."""
    from loratui.pipeline import models

    moves: list[str] = []

    class Fake:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            return cls()

        def to(self, where):
            moves.append(where)
            return self

        def eval(self):
            return self

    monkeypatch.setattr(models, "model_class", lambda task: Fake)
    load_torch("unused", "seq2seq", device, "fp32")
    assert moves == ([] if device == "cpu" else [device])
