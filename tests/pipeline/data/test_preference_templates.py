"""Preference pairs on the models' own chat templates: each side is the prompt's tokens followed by the reply
exactly as transformers' ``apply_chat_template`` adds it, only the final reply is trained, both sides share
the prompt tokens; pairs the template renders with different prompts are ``prompt_boundary`` problems.

The templates and tokenizers are those of tests/pipeline/data/test_rewriting_templates.py (the real
templates on the tiny BPE with each family's special tokens).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from loratui.pipeline.data.encode import IGNORE, clean_backend
from loratui.pipeline.data.pairs import encode_pair_batch, encode_unpaired_batch
from loratui.pipeline.data.templates import resolve_template
from tests.pipeline.data.test_rewriting_templates import DAY, _chat, _think, _tokenizer, _transformers_turns

PLAIN = ["qwen3", "phi3.5", "gpt-oss", "llama3.2", "smollm3", "devstral", "mistral-small-3.2"]
# their generation prompt is not the start of the rendered reply (see test_rewriting_templates.py): no
# transformers difference to compare with, but the invariant holds
OTHER = ["mistral-nemo", "gemma4", "gemma4-interleaved", "ministral3-reasoning"]
CHOSEN = "The fee is 25 EUR per year."
REJECTED = "Fees? No idea, sorry."


def encode_pairs(tok: Any, prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, list[Any]]:
    batch = {
        "messages": [json.dumps([*prompt, {"role": "assistant", "content": chosen}], ensure_ascii=False)],
        "rejected": [json.dumps([{"role": "assistant", "content": rejected}], ensure_ascii=False)],
        "text": [""],
        "document": [False],
        "source": ["pairs.jsonl:1"],
        "meta": [""],
    }
    template = resolve_template("auto", tok, DAY)
    return encode_pair_batch(batch, clean_backend(tok), tok.eos_token, template).to_pydict()


def last_turn(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], ...]:
    """(prompt ids, trained ids, tail ids) of the conversation's last reply, by transformers itself."""
    return _transformers_turns(tok, messages)[-1]


@pytest.mark.parametrize("family", PLAIN)
@pytest.mark.parametrize("multi_turn", [False, True], ids=["one-question", "multi-turn"])
def test_each_side_is_the_prompt_then_the_reply_as_transformers_renders_it(family, multi_turn):
    tok = _tokenizer(family)
    system = "You answer for the city library."
    prompt = _chat(system, reasoning=False)[:-1] if multi_turn else [{"role": "user", "content": "What is the fee?"}]
    out = encode_pairs(tok, prompt, CHOSEN, REJECTED)
    assert out["problem"] == [""], out["problem"]
    for prefix, reply in (("", CHOSEN), ("rejected_", REJECTED)):
        head, trained, tail = last_turn(tok, [*prompt, {"role": "assistant", "content": reply}])
        ids, labels = out[f"{prefix}input_ids"][0], out[f"{prefix}labels"][0]
        assert ids == head + trained + tail, f"{prefix or 'chosen'}: not the tokens the model sees"
        assert labels == [IGNORE] * len(head) + trained + [IGNORE] * len(tail), "only the final reply is trained"
    p = next(k for k, label in enumerate(out["labels"][0]) if label != IGNORE)
    assert out["input_ids"][0][:p] == out["rejected_input_ids"][0][:p]
    assert out["rejected"] == [REJECTED]


@pytest.mark.parametrize("family", OTHER)
@pytest.mark.parametrize("multi_turn", [False, True], ids=["one-question", "multi-turn"])
def test_the_invariant_holds_on_templates_that_write_the_reply_after_a_different_generation_prompt(family, multi_turn):
    tok = _tokenizer(family)
    prompt = _chat("Be brief.", reasoning=False)[:-1] if multi_turn else [{"role": "user", "content": "Fee?"}]
    out = encode_pairs(tok, prompt, CHOSEN, REJECTED)
    assert out["problem"] == [""], out["problem"]
    p = next(k for k, label in enumerate(out["labels"][0]) if label != IGNORE)
    assert p == next(k for k, label in enumerate(out["rejected_labels"][0]) if label != IGNORE)
    assert out["input_ids"][0][:p] == out["rejected_input_ids"][0][:p]
    for prefix, reply in (("", CHOSEN), ("rejected_", REJECTED)):
        trained = tok.decode([i for i in out[f"{prefix}labels"][0] if i != IGNORE])
        assert trained.startswith(reply) and trained.endswith(tok.eos_token), trained


@pytest.mark.parametrize("family", ["qwen3", "r1-qwen", "r1-llama", "smollm3"])
def test_pairs_with_reasoning_on_both_sides_share_the_prompt(family):
    tok = _tokenizer(family)
    prompt = [{"role": "user", "content": "What is the fee?"}]
    out = encode_pairs(tok, prompt, _think("The fee list.", CHOSEN), _think("Guessing.", REJECTED))
    assert out["problem"] == [""], out["problem"]
    p = next(k for k, label in enumerate(out["labels"][0]) if label != IGNORE)
    assert p == next(k for k, label in enumerate(out["rejected_labels"][0]) if label != IGNORE)
    assert out["input_ids"][0][:p] == out["rejected_input_ids"][0][:p]
    trained = tok.decode([i for i in out["labels"][0] if i != IGNORE])
    assert "The fee list." in trained and CHOSEN in trained


@pytest.mark.parametrize("family", ["r1-qwen", "gemma4"])
def test_a_template_that_writes_a_different_prompt_per_reply_is_a_prompt_boundary_problem(family):
    """One reply reasons and the other does not: these templates switch the thinking mode in the prompt."""
    tok = _tokenizer(family)
    out = encode_pairs(
        tok, [{"role": "user", "content": "What is the fee?"}], _think("The fee list.", CHOSEN), REJECTED
    )
    assert "writes the prompt differently before the chosen and the rejected reply" in out["problem"][0]


def test_unpaired_rows_train_only_the_final_reply_on_a_rewriting_template():
    tok = _tokenizer("qwen3")
    messages = _chat(None, reasoning=True)
    batch = {
        "messages": [json.dumps(messages)],
        "label": [0],
        "text": [""],
        "document": [False],
        "source": ["kto.jsonl:1"],
        "meta": [""],
    }
    template = resolve_template("auto", tok, DAY)
    out = encode_unpaired_batch(batch, clean_backend(tok), tok.eos_token, template).to_pydict()
    head, trained, tail = last_turn(tok, messages)
    assert out["input_ids"] == [head + trained + tail]
    assert out["labels"] == [[IGNORE] * len(head) + trained + [IGNORE] * len(tail)]
    assert out["preference_label"] == [0] and out["chunk"] == [0]
