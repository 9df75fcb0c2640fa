"""The export acceptance rule (loratui/exporters/acceptance.py): the type's own rounding, simulated in PyTorch,
decides which positions a file must agree on; near-ties may flip, decided positions may not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loratui.exporters.acceptance import Measured, judge, measure, round_to, simulated


def test_q8_0_rounding_is_llama_cpps():
    """The same bytes as gguf-py's reference Q8_0 quantizer (llama.cpp's quantize_row_q8_0_ref), dequantized."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 128)) * rng.uniform(0.01, 3, size=(16, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block keeps its zeros
    theirs = dequantize(quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    ours = round_to(torch.from_numpy(w), "q8_0").numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert np.abs(ours - w).max() > 0  # it does round
    odd = torch.randn(4, 40)  # rows that are not whole blocks stay f16, as the converter keeps them
    assert torch.equal(round_to(odd, "q8_0"), odd.half().float())


@pytest.mark.parametrize("kind,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_16_bit_rounding_is_the_dtypes(kind, dtype):
    x = torch.randn(64, 64)
    assert torch.equal(round_to(x, kind), x.to(dtype).float())
    assert torch.equal(round_to(x, "f32"), x)


def test_simulation_changes_the_products_and_then_leaves_the_model_as_it_was(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.inference_mode():
        exact = model(ids).logits
        with simulated(model, "q8_0"):
            rounded = model(ids).logits
        again = model(ids).logits
    assert 0 < (rounded - exact).abs().max() < 0.5 * exact.abs().max()
    assert torch.equal(again, exact)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _measured(top1, margins, noise):
    return Measured(top1=top1, margins=margins, noise={"q8_0": noise})


def test_near_ties_may_flip_decided_positions_may_not():
    top1 = [[1] * 30, [2] * 30]
    margins = [[5.0] * 30, [0.01] * 30]  # 30 decided positions, 30 near-ties (threshold 4 x 0.1)
    m = _measured(top1, margins, noise=0.1)
    flipped_ties = [[1] * 30, [7] * 30]
    v = judge("q8_0", flipped_ties, m, "x.gguf")
    assert v.accepted and v.decided == 30 and v.flips == 0 and v.agreement == 1.0 and not v.reason
    one_decided = [[1] * 29 + [9], [2] * 30]  # 1 of 30 is over the 1% allowance (0 of 30)
    v = judge("q8_0", one_decided, m, "x.gguf")
    assert not v.accepted and v.flips == 1
    assert "x.gguf: picks another token than the merged model at 1 of the 30 positions" in v.reason
    assert "0.4 logits" in v.reason


def test_too_few_decided_positions_are_not_judged_and_unsimulated_types_are_measured_only():
    m = _measured([[1] * 10], [[5.0] * 10], noise=0.1)
    v = judge("q8_0", [[2] * 10], m, "x.gguf")
    assert v.accepted and v.reason.startswith("not judged: only 10 positions")
    v = judge("q4_k_m", [[2] * 10], m, "x.gguf")
    assert v.accepted and v.threshold is None and "measured, not judged" in v.reason


def test_measure_finds_each_types_noise(tiny_llama):
    """Wider types round less: f32 (only the f16 KV cache) < f16 < q8_0, bf16 the widest rounding."""
    from transformers import AutoModelForCausalLM

    from loratui.pipeline.eval.runtimes import IGNORE, Example, TorchModel

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    examples = [
        Example(input_ids=ids, labels=[IGNORE] * 3 + ids[3:])
        for ids in (rng.integers(3, 200, size=n).tolist() for n in (12, 20, 9))
    ]
    wrapped = TorchModel(model, name="m", task="causal", pad_id=0, stop_ids=set())
    m = measure(wrapped, examples, ["f32", "f16", "bf16", "q8_0", "q4_k_m"])
    assert [len(t) for t in m.top1] == [9, 17, 6] and [len(t) for t in m.margins] == [9, 17, 6]
    assert set(m.noise) == {"f32", "f16", "bf16", "q8_0"}  # q4_k_m is not simulated
    assert 0 < m.noise["f32"] < m.noise["f16"] < m.noise["bf16"]
    assert m.noise["f16"] < m.noise["q8_0"]
    assert m.count == 32 and m.nll > 0
    # the reference is the model's own teacher-forced top-1
    scored = wrapped.scored(examples, None, None)
    assert [s[2] for s in scored] == m.top1
