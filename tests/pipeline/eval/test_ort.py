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


def _scores_like_the_model(model: Path, folder: Path, window: int):
    """Two right-padded rows (14 and 9 tokens) scored by the export: every real position's logits equal the
    model's eager ones, padding positions stay empty. Returns the decoder, the reference model and the rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from loratui.pipeline.eval.ort import OnnxDecoder

    decoder = OnnxDecoder(folder)
    assert decoder.config["model"]["decoder"]["sliding_window"]["window_size"] == window
    ids = np.array(
        [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 0, 0, 0, 0]]
    )
    mask = np.array([[1] * 14, [1] * 9 + [0] * 5])
    got = decoder.logits(ids, mask)
    reference = AutoModelForCausalLM.from_pretrained(str(model), attn_implementation="eager").eval()
    with torch.no_grad():
        want = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1, :9], want[1, :9], atol=1e-4)
    assert not got[1, 9:].any()
    return decoder, reference, ids


def test_sliding_window_graphs_score_every_position_like_the_model(gemma2_onnx) -> None:
    """Rows longer than the window (8), right-padded: onnxruntime's GroupQueryAttention refuses an empty
    windowed cache, so such graphs are scored through onnxruntime-genai; the logits must be the model's."""
    _scores_like_the_model(*gemma2_onnx, window=8)


@pytest.fixture(scope="module")
def wide_window_onnx(tmp_path_factory, tiny_model_factory) -> tuple[Path, Path]:
    """The tiny Gemma 2 with a window (64) longer than every row and every generation here, as Gemma 3's
    512 is longer than most chat turns."""
    import json
    import shutil

    from loratui.exporters.onnx import build

    root = tmp_path_factory.mktemp("gemma2-wide")
    model = root / "model"
    shutil.copytree(tiny_model_factory(family="gemma2", tokenizer="bpe"), model)
    config = json.loads((model / "config.json").read_text())
    config["sliding_window"] = 64
    (model / "config.json").write_text(json.dumps(config))
    out = root / "onnx"
    build(model, out, "fp32", root / "build.log", lambda: False, False)
    return model, out


def test_a_window_longer_than_the_sequence_scores_and_generates(wide_window_onnx) -> None:
    """GroupQueryAttention needs a KV cache of at least the window: a prompt of 9 tokens and a generation
    of 4 must still get one (onnxruntime-genai's cache is as long as its max_length)."""
    import torch

    decoder, reference, ids = _scores_like_the_model(*wide_window_onnx, window=64)
    prompt = ids[1, :9].tolist()
    got = list(decoder.tokens(prompt, 4, min_new_tokens=4))
    assert len(got) == 4
    # each token is the reference model's greedy choice after the tokens before it, up to float noise
    # (a near-tie may go either way on another CPU's kernels)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1]
    chosen = logits[torch.arange(4), torch.tensor(got)]
    assert (chosen >= logits.max(-1).values - 1e-4).all(), (got, logits.argmax(-1).tolist())
