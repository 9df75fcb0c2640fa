"""The ONNX decoder's teacher-forced logits for graphs with sliding-window layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def gemma2_onnx(tmp_path_factory, tiny_model_factory) -> tuple[Path, Path]:
    from loratui.exporters.onnx import build

    model = tiny_model_factory(family="gemma2", tokenizer="bpe")
    out = tmp_path_factory.mktemp("gemma2-onnx") / "onnx"
    build(model, out, "fp32", out.with_name("build.log"), lambda: False, False)
    return model, out


def test_sliding_window_graphs_score_every_position_like_the_model(gemma2_onnx) -> None:
    """Rows longer than the window (8), right-padded: onnxruntime's GroupQueryAttention refuses an empty
    windowed cache, so such graphs are scored through onnxruntime-genai; the logits must be the model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from loratui.pipeline.evaluate.ort import OnnxDecoder

    model, folder = gemma2_onnx
    decoder = OnnxDecoder(folder)
    assert decoder.config["model"]["decoder"]["sliding_window"]["window_size"] == 8
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 0, 0, 0, 0]])
    mask = np.array([[1] * 14, [1] * 9 + [0] * 5])
    got = decoder.logits(ids, mask)
    reference = AutoModelForCausalLM.from_pretrained(str(model), attn_implementation="eager").eval()
    with torch.no_grad():
        want = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1, :9], want[1, :9], atol=1e-4)
    assert not got[1, 9:].any()  # padding positions stay empty
