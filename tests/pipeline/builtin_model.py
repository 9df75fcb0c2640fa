"""Module-scoped fixtures for the real built-in models' fidelity tests (test_smollm2.py, test_gemma3_builtin.py).

Each test module names its built-in in a module-level ``NAME``; the fixtures prepare it once (imported from
its GGUF into the cache), open the original GGUF in llama.cpp with every position's logits, and load the
imported model in float32 with its tokenizer. Import the three names into the test module to use them.
"""

from __future__ import annotations

import pytest

from loratui.pipeline import models


@pytest.fixture(scope="module")
def prepared(request):
    return models.resolve_model(request.module.NAME)


@pytest.fixture(scope="module")
def llama(request):
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(models.builtin_gguf(request.module.NAME)),
        n_ctx=1024,
        logits_all=True,
        n_threads=2,
        seed=0,
        verbose=False,
    )
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def hf(prepared):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(prepared.path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(prepared.path))


def assert_same_ids_as_llama_cpp(tok, llama, corpus: list[str], add_bos: bool, label: str) -> None:
    """Every string of ``corpus`` gets the same ids from the imported tokenizer as from llama.cpp's."""
    assert len(corpus) >= 200
    mismatches = []
    for text in corpus:
        ours = tok.encode(text, add_special_tokens=True)
        theirs = llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        if ours != theirs:
            mismatches.append((text, ours, theirs))
    print(f"\ntokenizer parity ({label}): {len(corpus) - len(mismatches)}/{len(corpus)} strings give identical ids")
    assert not mismatches, mismatches[:5]


def next_token_choices(model, llama, ids: list[int]):
    """Teacher-forced next-token choices at every position of ``ids``: (transformers, llama.cpp)."""
    import numpy as np
    import torch

    llama.reset()
    llama.eval(ids)
    theirs = np.asarray(llama.scores[: len(ids)]).argmax(-1)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    return ours, theirs


def held_to_answer(model, llama, prompt: list[int], answer: list[int]) -> dict:
    """llama.cpp held to the transformers model's greedy ``answer`` after ``prompt``, teacher-forced, on what
    does not depend on the CPU's kernels: the mean per-token log-likelihood of the answer in each runtime,
    and whether llama.cpp makes the same choice at every position that transformers decides by more than
    llama.cpp's 8-bit rounding of the products' inputs can move (simulated in PyTorch,
    loratui/exporters/acceptance.py)."""
    import numpy as np
    import torch

    from loratui.exporters.acceptance import SAFETY, simulated

    full, start = torch.tensor([prompt + answer]), len(prompt) - 1
    with torch.no_grad():
        exact = model(full).logits[0, start:-1]
        with simulated(model, "q8_0"):  # the imported weights are quantized already: only the products' rounding
            rounded = model(full).logits[0, start:-1]
    margin = 2 * SAFETY * float((rounded - exact).abs().max())
    top2 = exact.topk(2, dim=-1).values
    decided = ((top2[:, 0] - top2[:, 1]) > margin).numpy()

    llama.reset()
    llama.eval(full[0].tolist())
    # a copy: llama.scores is llama.cpp's own buffer, which a later generation writes over
    theirs = np.array(llama.scores[: full.shape[1]], dtype=np.float32)[start:-1]

    def logp(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return (x - np.log(np.exp(x).sum(-1, keepdims=True)))[np.arange(len(answer)), answer]

    return {
        "ll_ours": float(logp(exact.numpy()).mean()),
        "ll_theirs": float(logp(theirs).mean()),
        "decided": int(decided.sum()),
        "margin": margin,
        "same_where_decided": bool((theirs.argmax(-1) == exact.numpy().argmax(-1))[decided].all()),
    }
