"""The embedded default model: import fidelity against llama.cpp on the original GGUF.

These load the real SmolLM2-135M (about 30 s in all on 2 cores). They run in `make test` and CI;
skip them locally with `-m "not real_model"`.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

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

pytestmark = pytest.mark.real_model

NAME = models.DEFAULT_MODEL


def tokenizer_corpus() -> list[str]:
    """At least 200 varied strings: digits, whitespace runs, emoji, accents, CJK, code, URLs ..."""
    groups = {
        "digits": [
            "0",
            "7",
            "42",
            "1234567890",
            "3.14159",
            "-17",
            "1,000,000",
            "2026-11-22",
            "v1.2.3",
            "0x1F",
            "1e-4",
            "10:30",
            "٣٤٥",
            "½ and ²",
            "999999999999",
        ],
        "space": [
            " ",
            "  ",
            "\t",
            "\n",
            "\n\n\n",
            " \n ",
            "a  b",
            "a\tb",
            "trailing  ",
            "  leading",
            "\r\n",
            "mixed \t\n spaces",
            "    indented",
            "a\u00a0b",
        ],
        "emoji": ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "I ❤️ NY", "🎉🎉🎉", "ok 👌"],
        "accents": [
            "café",
            "naïve",
            "Zürich",
            "São Paulo",
            "Ångström",
            "façade",
            "jalapeño",
            "Dvořák",
            "e\u0301",
            "ÆØÅ æøå",
            "Ελληνικά",
            "Русский текст",
            "عربى",
            "עברית",
        ],
        "cjk": ["日本語", "中文字符测试", "한국어 문장", "漢字とひらがなとカタカナ", "東京タワー 333m"],
        "code": [
            "def f(x):\n    return x ** 2  # square",
            '{"a": [1, 2, {"b": null}]}',
            '<div class="x">Hi</div>',
            "for (int i = 0; i < n; ++i) { sum += a[i]; }",
            "SELECT * FROM t WHERE id = 42;",
            "$ pip install -e '.[dev]'",
            r"^\d{3}-\w+$",
            "x != y && y >= z || !w",
        ],
        "urls": [
            "https://example.org/path?q=1&r=two#frag",
            "http://localhost:8000/v1/chat/completions",
            "info@example.org",
            "first.last+tag@sub.example.co.uk",
            "ftp://files.example.net/a_b-c.tar.gz",
            "www.example.com/Über",
        ],
        "prose": [
            "Don't stop; it's fine, we'll see.",
            "I'M SHOUTING!!!",
            "The fee is €25 (or $27).",
            "«Quoted» — “curly” ‘single’…",
            "Hello, World.",
            "end.",
        ],
        "special": ["<|im_start|>user\nhi<|im_end|>", "text<|endoftext|>more", "<|im_end|>\n"],
    }
    corpus = [s for items in groups.values() for s in items]
    names = list(groups)
    for a, b in itertools.combinations(names, 2):  # mixtures across groups, deterministic
        for x, y in zip(groups[a][:3], groups[b][:3]):
            corpus.append(f"{x} {y}")
            corpus.append(f"{y}{x}")
    return corpus


def test_models_list_json_shows_the_prepared_default(prepared):
    out = subprocess.run(
        [sys.executable, "-m", "loratui", "models", "list", "--json"], capture_output=True, text=True, check=True
    )
    rows = json.loads(out.stdout)
    row = next(r for r in rows if r["name"] == NAME)
    assert row["source"].startswith("builtin")
    assert row["path"] == str(prepared.path)
    assert row["prepared"] and row["default"]


def test_prepare_is_cached(prepared):
    again = models.resolve_model(NAME)
    assert again.path == prepared.path and again.source == "builtin"
    assert (prepared.path / "model.safetensors").is_file()


def test_imported_config_is_smollm2(prepared):
    cfg = json.loads((prepared.path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        30,
        576,
        9,
        3,
    )
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)


def test_tokenizer_matches_llama_cpp_ids(hf, llama):
    assert_same_ids_as_llama_cpp(hf[1], llama, tokenizer_corpus(), add_bos=False, label="SmolLM2")


def test_tokenizer_conventions(hf):
    _, tok = hf
    text = "Call 555-0123 or write to help@example.org 😀"
    ids = tok.encode(text)
    assert ids[0] != tok.bos_token_id, "the GGUF says add_bos_token = false"
    assert tok.decode(ids) == text, "byte-level decoding must be lossless"
    assert [tok.decode([i]) for i in tok.encode("2026")] == ["2", "0", "2", "6"], "smollm splits digits"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


AGREEMENT_TEXTS = [
    "The library opens at nine in the morning and closes at five in the afternoon. Members can borrow up to "
    "ten books at a time, and late returns cost fifty cents per day. The reading room on the second floor is "
    "quiet, and laptops are welcome there.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
    "Germany, and what river runs through it?<|im_end|>\n<|im_start|>assistant\nThe capital of Germany is "
    "Berlin. The Spree river runs through the city.<|im_end|>\n",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide and water and, "
    "using sunlight, produce glucose and oxygen. Chlorophyll, the green pigment in leaves, absorbs mostly "
    "blue and red light.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the surface while "
    "Michael Collins orbited above. The mission returned safely to Earth on July 24.",
    "To install the package, run pip install example, then import it in Python. Visit "
    "https://example.org/docs for the full guide, or e-mail support@example.org with questions.",
    "Recipe for pancakes: mix 200 g of flour, 2 eggs, 300 ml of milk and a pinch of salt. Let the batter rest "
    "for 30 minutes, then cook each pancake for about 1 minute per side in a hot, lightly oiled pan.",
    "| city | population | country |\n|---|---|---|\n| Tokyo | 37,400,000 | Japan |\n| Delhi | 31,000,000 | "
    "India |\n| Shanghai | 27,100,000 | China |\n",
    "Dear team, thank you for your help last week. The migration finished on time, the dashboards are green "
    "again, and the customers noticed nothing. Let's meet on Thursday at 14:00 to plan the next release.",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes the boiling point drops because "
    "the air pressure is lower. On the summit of Mount Everest, water boils at about 70 degrees.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id "
    "GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Once upon a time, a small robot lived in a lighthouse. Every night it polished the great lamp and "
    "counted the ships passing by. One stormy evening, a fishing boat lost its way, and the robot had an idea.",
]


def test_top1_agreement_with_llama_cpp(hf, llama):
    model, _ = hf
    agree = total = 0
    for text in AGREEMENT_TEXTS:
        ours, theirs = next_token_choices(
            model, llama, llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        )
        agree += int((ours == theirs).sum())
        total += len(ours)
    rate = agree / total
    print(
        f"\nteacher-forced top-1 agreement, imported fp32 (transformers) vs Q4_1 GGUF (llama.cpp): "
        f"{rate:.1%} over {total} positions"
    )
    assert total >= 500
    assert rate >= 0.90


# (question, a word a sensible answer contains)
CHAT_QUESTIONS = [
    ("Which city is the capital of France?", "Paris"),
    ("What is 2 + 2?", "4"),
    ("How many days are in a week?", "7"),
]


@pytest.mark.parametrize("question,expected", CHAT_QUESTIONS)
def test_chat_answer_from_both_runtimes(hf, llama, question, expected):
    """transformers answers; llama.cpp is held to what does not depend on the CPU's kernels.

    A quantized model's exact greedy words do: llama.cpp rounds each product's input to 8 bits for Q4_1
    weights (differently per SIMD path) and keeps keys and values in f16, so where two tokens nearly tie
    (the answer's first token here leads by 0.03 logits) either may win. So llama.cpp is checked on the
    transformers answer, teacher-forced: its log-likelihood per token, and its choice at every position
    the transformers model decides by more than that rounding can move (measured by simulating it in
    PyTorch, loratui/exporters/acceptance.py). Its own greedy words are not asserted: on this model every
    answer holds positions that lead by less than that (measured: 1 of 8, 0 of 12 and 0 of 9 positions lead
    by more), so they could differ on another CPU without anything being wrong."""
    import torch

    model, tok = hf
    messages = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    answer = out[0, prompt.shape[1] :].tolist()
    ours = tok.decode(answer, skip_special_tokens=True).strip()
    assert expected in ours

    held = held_to_answer(model, llama, prompt[0].tolist(), answer)
    print(
        f"\n{question}\n  transformers (imported): {ours!r}\n  per-token log-likelihood of it: transformers "
        f"{held['ll_ours']:.3f}, llama.cpp (Q4_1) {held['ll_theirs']:.3f}; {held['decided']}/{len(answer)} positions "
        f"lead by more than {held['margin']:.2f} logits"
    )
    assert abs(held["ll_ours"] - held["ll_theirs"]) < 0.15  # nats per token (a broken model: several)
    assert held["same_where_decided"]
