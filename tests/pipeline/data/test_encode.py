"""Loss masks: which token positions carry labels, for single and multi-turn chats, text and documents."""

from __future__ import annotations

import json

import pytest

from loratui.pipeline.data.encode import IGNORE, clean_backend, encode_batch, token_counts
from loratui.pipeline.data.render import render_chat
from loratui.pipeline.data.templates import NAMED_TEMPLATES, resolve_template
from loratui.pipeline.errors import LoratuiError

CHAT = [{"role": "user", "content": "When do you open?"}, {"role": "assistant", "content": "At 08:30 daily."}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Fee?"},
    {"role": "assistant", "content": "EUR 45 a year."},
    {"role": "user", "content": "E-mail?"},
    {"role": "assistant", "content": "members@example.org"},
]


@pytest.fixture(scope="module", params=["bpe", "smollm2"])
def tok(request, tiny_model_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_factory(tokenizer=request.param))


def _encode(tok, rows, template="auto", train_on_prompt=False, chunk_tokens=512, chunk_overlap=64, document=None):
    batch = {
        "messages": [json.dumps(r) if isinstance(r, list) else "" for r in rows],
        "text": [r if isinstance(r, str) else "" for r in rows],
        "document": document or [False] * len(rows),
        "source": [f"f:{i}" for i in range(len(rows))],
        "meta": [""] * len(rows),
    }
    table = encode_batch(
        batch,
        clean_backend(tok),
        tok.eos_token,
        resolve_template(template, tok),
        train_on_prompt,
        chunk_tokens,
        chunk_overlap,
    )
    return table.to_pydict()


def _trained_runs(tok, ids, labels) -> list[str]:
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_only_the_answer_and_its_end_of_turn_are_trained(tok):
    out = _encode(tok, [CHAT])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert len(ids) == len(labels)
    assert _trained_runs(tok, ids, labels) == ["At 08:30 daily.<|im_end|>"]
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels)), "labels are the ids or ignored"


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(tok):
    out = _encode(tok, [MULTI])
    runs = _trained_runs(tok, out["input_ids"][0], out["labels"][0])
    assert runs == ["EUR 45 a year.<|im_end|>", "members@example.org<|im_end|>"]


def test_train_on_prompt_trains_everything(tok):
    out = _encode(tok, [CHAT], train_on_prompt=True)
    assert IGNORE not in out["labels"][0]


def test_eos_is_appended_when_the_template_does_not_end_turns_with_it(tok):
    out = _encode(tok, [CHAT], template="phi")
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert _trained_runs(tok, ids, labels)[0].startswith("At 08:30 daily.<|end|>")


@pytest.mark.parametrize("name", list(NAMED_TEMPLATES))
def test_named_templates_train_the_answer_and_stop(tok, name):
    out = _encode(tok, [MULTI], template=name)
    ids, labels = out["input_ids"][0], out["labels"][0]
    runs = _trained_runs(tok, ids, labels)
    assert len(runs) == 2 and "EUR 45 a year." in runs[0] and "members@example.org" in runs[1]
    assert tok.eos_token_id in [i for i, label in zip(ids, labels) if label != IGNORE]
    assert "Fee?" not in "".join(runs) and "E-mail?" not in "".join(runs)


def test_text_rows_are_trained_in_full_with_eos(tok):
    out = _encode(tok, ["Plain text to learn."])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert labels == ids and ids[-1] == tok.eos_token_id


def test_documents_are_chunked_and_each_token_trained_once(tok):
    text = " ".join(f"Sentence number {i} of the handbook." for i in range(40))
    out = _encode(tok, [text], chunk_tokens=32, chunk_overlap=8, document=[True])
    full = tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert len(out["input_ids"]) > 3
    assert all(len(w) <= 32 for w in out["input_ids"])
    assert out["chunk"] == list(range(len(out["input_ids"])))
    trained = [i for w, lab in zip(out["input_ids"], out["labels"]) for i, label in zip(w, lab) if label != IGNORE]
    assert trained == full, "windows cover the document, overlaps are context only"
    assert out["input_ids"][1][:8] == out["input_ids"][0][-8:], "each window starts with the overlap"


def test_render_matches_transformers_apply_chat_template(tok):
    template = resolve_template("auto", tok)
    for messages in (CHAT, MULTI):
        assert template.render(messages) == tok.apply_chat_template(messages, tokenize=False)
        assert template.render(messages[:-1], add_generation_prompt=True) == tok.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True
        )


def test_template_that_is_not_prefix_consistent_is_a_clear_error(tok):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from loratui.pipeline.data.render import RewritesEarlierTurns, render_examples

    template = resolve_template("chatml", tok)
    # starts with the number of messages, so a shorter conversation is not a prefix of a longer one
    template.source = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    template._compiled = _compile_jinja_template(template.source)
    with pytest.raises(RewritesEarlierTurns, match="cannot be located"):
        render_chat(CHAT, template, tok.eos_token, False)
    # nor is the generation prompt the start of the reply, even per turn: no faithful split, the row is named
    with pytest.raises(LoratuiError, match="^data.jsonl, row 3: .*cannot be located") as e:
        render_examples(CHAT, template, tok.eos_token, False, "data.jsonl, row 3")
    assert "data.template" in e.value.hint


def test_unknown_template_name(tok):
    with pytest.raises(LoratuiError, match="unknown template"):
        resolve_template("vicuna", tok)


def test_batched_encoding_equals_the_tokenizer_on_each_row(tok):
    """The vectorized path gives the same ids as transformers' tokenizer call, row by row."""
    rows = [CHAT, MULTI, "Plain text.", [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]]
    out = _encode(tok, rows)
    template = resolve_template("auto", tok)
    for row, ids in zip(rows, out["input_ids"]):
        text = template.render(row) if isinstance(row, list) else row + tok.eos_token
        assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_truncation_stored_in_tokenizer_json_is_ignored(tok):
    import copy

    limited = copy.deepcopy(tok)
    limited.backend_tokenizer.enable_truncation(max_length=4)
    assert len(_encode(limited, [MULTI])["input_ids"][0]) == len(_encode(tok, [MULTI])["input_ids"][0]) > 4


def test_token_counts_from_arrow(tok):
    from datasets import Dataset

    out = _encode(tok, [CHAT, MULTI])
    ds = Dataset.from_dict({"input_ids": out["input_ids"], "labels": out["labels"]})
    lengths, trained = token_counts(ds)
    assert lengths.tolist() == [len(x) for x in out["input_ids"]]
    assert trained.tolist() == [sum(1 for v in lab if v != IGNORE) for lab in out["labels"]]
    lengths, trained = token_counts(ds.select([1]))
    assert lengths.tolist() == [len(out["input_ids"][1])]


def test_chat_template_survives_pickling_for_worker_processes(tok):
    import pickle

    template = resolve_template("auto", tok)
    clone = pickle.loads(pickle.dumps(template))
    assert clone.render(CHAT) == template.render(CHAT)


@pytest.mark.parametrize("name", ["auto", *NAMED_TEMPLATES])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_shape_renderer_equals_the_reference(tok, name, train_on_prompt):
    """The placeholder fast path renders exactly what Jinja renders, with the same spans."""
    import random

    from loratui.pipeline.data.render import ShapeRenderer
    from loratui.pipeline.data.templates import content_is_opaque

    template = resolve_template(name, tok)
    fast = ShapeRenderer(template, tok.eos_token, train_on_prompt)
    rng = random.Random(0)
    samples = [
        "",
        " ",
        "x",
        "  padded  ",
        "line\nbreak\n",
        "{{ not jinja }}",
        "<|im_start|>",
        tok.eos_token + " in text",
        "emoji 😀 and 1234",
        "trailing newline\n",
        "\x00nul",
    ]
    for _ in range(60):
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": rng.choice(samples[2:])}] if rng.random() < 0.4 else []
        for _ in range(turns):
            messages += [
                {"role": "user", "content": rng.choice(samples[2:])},
                {"role": "assistant", "content": rng.choice(samples[2:])},
            ]
        assert fast(messages) == [(*render_chat(messages, template, tok.eos_token, train_on_prompt), len(messages))], (
            messages
        )
    assert content_is_opaque(template.source) == (name != "llama2")


@pytest.mark.parametrize(
    "source,opaque",
    [
        ("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}", False),
        ("{% for m in messages %}{% if '<think>' in m['content'] %}x{% endif %}{{ m['content'] }}{% endfor %}", False),
        ("{{ messages | tojson }}", False),
        ("{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}", False),
        ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}", False),
        ("{% for m in messages %}{{ m.content.split('x')[0] }}{% endfor %}", False),
        ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}{{ messages|length }}", True),
    ],
)
def test_content_is_opaque_is_conservative(source, opaque):
    from loratui.pipeline.data.templates import content_is_opaque

    assert content_is_opaque(source) is opaque
