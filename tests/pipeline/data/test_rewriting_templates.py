"""Real chat templates that rewrite earlier turns, write today's date or handle reasoning.

The templates are the models' own (tests/family_assets.py reads them from the llama-cpp-python sdist),
set on the tiny 400-token BPE of tests/tiny_models.py with each family's special tokens. The contract:
every trained reply is exactly what transformers' ``apply_chat_template`` adds to the conversation
before it (rendered with the generation prompt), tokenized as the model sees it at inference (the
prompt's tokens, then the reply's), and nothing else is trained; renders do not change with the day.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loratui.pipeline import models
from loratui.pipeline.config import load_config
from loratui.pipeline.data import step as data_step
from loratui.pipeline.data import templates as templates_module
from loratui.pipeline.data import tokens
from loratui.pipeline.data.encode import IGNORE, clean_backend, encode_batch
from loratui.pipeline.data.render import ShapeRenderer, render_examples
from loratui.pipeline.data.templates import resolve_template
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import MemoryWriter, null_sink
from loratui.pipeline.steps import run_step
from tests.family_assets import template as family_template

DAY = dt.date(2025, 3, 14)


@dataclass(frozen=True)
class Family:
    template: str  # file name (without .jinja) in llama.cpp's models/templates
    eos: str
    specials: tuple[str, ...]
    bos: str | None = None


_MISTRAL_V7 = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
_GEMMA4 = ("<|turn>", "<turn|>", "<|channel>", "<channel|>")

FAMILIES = {
    "qwen3": Family("Qwen-Qwen3-0.6B", "<|im_end|>", ("<think>", "</think>")),
    "phi3.5": Family(
        "microsoft-Phi-3.5-mini-instruct",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>",
    ),
    "gpt-oss": Family("openai-gpt-oss-120b", "<|return|>", ("<|start|>", "<|message|>", "<|channel|>", "<|end|>")),
    "r1-qwen": Family(
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        "<｜end▁of▁sentence｜>",
        ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"),
        "<｜begin▁of▁sentence｜>",
    ),
    "r1-llama": Family(
        "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
        "<｜end▁of▁sentence｜>",
        ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"),
        "<｜begin▁of▁sentence｜>",
    ),
    "llama3.2": Family(
        "meta-llama-Llama-3.2-3B-Instruct",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>"),
        "<|begin_of_text|>",
    ),
    "smollm3": Family("HuggingFaceTB-SmolLM3-3B", "<|im_end|>", ("<think>", "</think>")),
    "mistral-nemo": Family("mistralai-Mistral-Nemo-Instruct-2407", "</s>", ("[INST]", "[/INST]"), "<s>"),
    "devstral": Family("unsloth-mistral-Devstral-Small-2507", "</s>", _MISTRAL_V7, "<s>"),
    "ministral3-reasoning": Family("mistralai-Ministral-3-14B-Reasoning-2512", "</s>", _MISTRAL_V7, "<s>"),
    "mistral-small-3.2": Family("Mistral-Small-3.2-24B-Instruct-2506", "</s>", _MISTRAL_V7, "<s>"),
    "gemma4": Family("google-gemma-4-31B-it", "<turn|>", _GEMMA4, "<bos>"),
    "gemma4-interleaved": Family("google-gemma-4-31B-it-interleaved", "<turn|>", _GEMMA4, "<bos>"),
}


def _think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


def _chat(system: str | None, reasoning: bool) -> list[dict[str, str]]:
    """Three questions and answers (with reasoning on the first and last answer when ``reasoning``)."""
    turns = [
        ("When does the library open?", "Opening hours.", "It opens at 9:00 from Monday to Friday."),
        ("And on Saturday?", "", "On Saturday it opens at 10:00."),
        ("What is the fee?", "The fee list.", "The fee is 25 EUR per year."),
    ]
    messages = [{"role": "system", "content": system}] if system else []
    for question, why, answer in turns:
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": _think(why, answer) if reasoning and why else answer},
        ]
    return messages


def _clock(day: dt.date) -> Any:
    return lambda fmt: dt.datetime(day.year, day.month, day.day).strftime(fmt)


@functools.cache
def _tokenizer(family: str) -> Any:
    """The tiny BPE with ``family``'s special tokens, EOS (and BOS) and real chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import _small_bpe_tokenizer

    spec = FAMILIES[family]
    base = _small_bpe_tokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    tokens = {"eos_token": spec.eos, "pad_token": spec.eos, **({"bos_token": spec.bos} if spec.bos else {})}
    tok.add_special_tokens({**tokens, "additional_special_tokens": list(spec.specials)})
    tok.chat_template = family_template(spec.template)
    return tok


def _encode(
    tok: Any,
    rows: list[list[dict[str, str]]],
    template: Any = None,
    train_on_prompt: bool = False,
    sources: list[str] | None = None,
) -> dict[str, list[Any]]:
    template = template or resolve_template("auto", tok, DAY)
    batch = {
        "messages": [json.dumps(r, ensure_ascii=False) for r in rows],
        "text": [""] * len(rows),
        "document": [False] * len(rows),
        "source": sources or [f"chats.jsonl:{i + 1}" for i in range(len(rows))],
        "meta": [""] * len(rows),
    }
    return encode_batch(batch, clean_backend(tok), tok.eos_token, template, train_on_prompt, 512, 64).to_pydict()


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _expected_reply(tok: Any, prompt: str, full: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, trained ids, untrained tail ids): the reply through its last EOS (EOS appended when none)."""
    assert full.startswith(prompt), "the generation prompt must be the start of the rendered reply"
    reply, eos = full[len(prompt) :], tok.eos_token
    cut = reply.rfind(eos)
    if cut < 0:
        reply, cut = reply + eos, len(reply)
    return _ids(tok, prompt), _ids(tok, reply[: cut + len(eos)]), _ids(tok, reply[cut + len(eos) :])


def _transformers_turns(tok: Any, shown: list[dict[str, Any]], **kwargs: Any) -> list[tuple[list[int], ...]]:
    """Per assistant turn k, by transformers itself: apply_chat_template(shown[:k+1]) minus
    apply_chat_template(shown[:k], add_generation_prompt=True), as (prompt, trained, tail) token ids."""
    out = []
    for k, m in enumerate(shown):
        if m["role"] == "assistant":
            prompt = tok.apply_chat_template(
                shown[:k], tokenize=False, add_generation_prompt=True, strftime_now=_clock(DAY), **kwargs
            )
            full = tok.apply_chat_template(shown[: k + 1], tokenize=False, strftime_now=_clock(DAY), **kwargs)
            out.append(_expected_reply(tok, prompt, full))
    return out


def _assert_per_turn(out: dict[str, list[Any]], messages: list[dict[str, str]], turns: list[tuple[list[int], ...]]):
    """One example per turn: the conversation up to it, only its reply trained, chunk counting down to 0."""
    assert len(out["input_ids"]) == len(turns)
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for i, (prompt, trained, tail) in enumerate(turns):
        assert out["input_ids"][i] == prompt + trained + tail, f"turn {i}: not the tokens the model sees"
        assert out["labels"][i] == [IGNORE] * len(prompt) + trained + [IGNORE] * len(tail), f"turn {i}"
        assert json.loads(out["messages"][i]) == messages[: assistant[i] + 1]
        assert out["chunk"][i] == len(turns) - 1 - i


def _assert_one_render(
    tok: Any, out: dict[str, list[Any]], shown: list[dict[str, Any]], turns: list[tuple[list[int], ...]], **kwargs: Any
):
    """A prefix-consistent template: one example holding every turn, each reply trained as transformers adds it."""
    full = tok.apply_chat_template(shown, tokenize=False, strftime_now=_clock(DAY), **kwargs)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert len(ids) == len(labels) and ids[: len(_ids(tok, full))] == _ids(tok, full)
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert runs == [trained for _, trained, _ in turns]


# --------------------------------------------------------------------------------------------
# Each family, against transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,reasoning", [("qwen3", True), ("qwen3", False), ("phi3.5", False), ("gpt-oss", False)])
def test_rewriting_templates_train_each_reply_as_the_model_sees_it(family, reasoning):
    tok = _tokenizer(family)
    messages = _chat("You answer for the city library.", reasoning)
    out = _encode(tok, [messages])
    _assert_per_turn(out, messages, _transformers_turns(tok, messages))


def test_qwen3_keeps_the_trained_reasoning_and_hides_earlier_reasoning_as_its_template_does():
    tok = _tokenizer("qwen3")
    messages = _chat(None, reasoning=True)
    out = _encode(tok, [messages])
    last = tok.decode(out["input_ids"][-1])
    trained = tok.decode([i for i in out["labels"][-1] if i != IGNORE])
    assert trained == "<think>\nThe fee list.\n</think>\n\nThe fee is 25 EUR per year.<|im_end|>"
    assert "Opening hours." not in last, "an earlier reply shows without its reasoning"
    first = tok.decode([i for i in out["labels"][0] if i != IGNORE])
    assert first.startswith("<think>\nOpening hours.\n</think>"), "every reply is trained with its reasoning once"


def test_gpt_oss_reasoning_goes_to_the_analysis_channel_of_the_trained_reply_only():
    tok = _tokenizer("gpt-oss")
    messages = _chat(None, reasoning=True)
    shown = []  # what GPT-OSS's template expects: the reasoning in the `thinking` field
    for m in messages:
        if m["role"] == "assistant" and m["content"].startswith("<think>"):
            reasoning, answer = m["content"][len("<think>") :].split("</think>")
            m = {"role": "assistant", "thinking": reasoning.strip(), "content": answer.strip()}
        shown.append(m)
    out = _encode(tok, [messages])
    _assert_per_turn(out, messages, _transformers_turns(tok, shown))
    trained = tok.decode([i for i in out["labels"][-1] if i != IGNORE])
    assert trained.startswith("<|channel|>analysis<|message|>The fee list.<|end|>") and trained.endswith("<|return|>")
    assert "Opening hours." not in tok.decode(out["input_ids"][-1]), "earlier analysis is dropped, as at inference"


@pytest.mark.parametrize(
    "family,system",
    [
        ("llama3.2", None),
        ("llama3.2", "Be brief."),
        ("smollm3", None),
        ("smollm3", "Be brief. /no_think"),
        ("smollm3", "Be brief. /think"),
    ],
)
def test_prefix_consistent_templates_keep_one_render_per_row(family, system):
    tok = _tokenizer(family)
    messages = _chat(system, reasoning=family == "smollm3" and system != "Be brief. /no_think")
    out = _encode(tok, [messages])
    _assert_one_render(tok, out, messages, _transformers_turns(tok, messages))
    if family == "smollm3" and system:
        mode = system.split()[-1]
        assert f"Reasoning Mode: {mode}" in tok.decode(out["input_ids"][0]), "the /think flag is the template's"


@pytest.mark.parametrize("family", ["r1-qwen", "r1-llama"])
def test_r1_reasoning_reply_is_what_the_model_writes_after_its_think_prompt(family):
    """R1 strips the reasoning from every rendered answer and its generation prompt opens ``<think>\\n``:
    the reply trained is the message's reasoning and answer after that prompt, then the end of turn."""
    tok = _tokenizer(family)
    messages = [
        {"role": "user", "content": "When does the library open?"},
        {"role": "assistant", "content": _think("Opening hours.", "At 9:00.")},
        {"role": "user", "content": "And on Saturday?"},
        {"role": "assistant", "content": _think("Weekend hours.", "At 10:00.")},
    ]
    out = _encode(tok, [messages])
    assert len(out["input_ids"]) == 2
    for i, k in enumerate((1, 3)):
        # the prompt in thinking mode, exactly as transformers renders it (earlier answers stripped)
        prompt = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True, enable_thinking=True)
        assert prompt.endswith("<｜Assistant｜><think>\n")
        reply = messages[k]["content"][len("<think>\n") :] + tok.eos_token
        assert out["input_ids"][i] == _ids(tok, prompt) + _ids(tok, reply)
        assert out["labels"][i] == [IGNORE] * len(_ids(tok, prompt)) + _ids(tok, reply)
    assert "Opening hours." not in tok.decode(out["input_ids"][1])


def test_r1_plain_replies_follow_the_closed_think_prompt():
    """Without reasoning the R1-Qwen template's default prompt closes an empty think block; the reply
    is the answer as the template writes it."""
    tok = _tokenizer("r1-qwen")
    messages = _chat("You answer for the city library.", reasoning=False)
    out = _encode(tok, [messages])
    turns = []
    for k in (2, 4, 6):
        prompt = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<｜Assistant｜><think>\n</think>")
        turns.append((_ids(tok, prompt), _ids(tok, messages[k]["content"] + tok.eos_token), []))
    _assert_per_turn(out, messages, turns)


def test_r1_that_always_thinks_names_a_row_without_reasoning():
    tok = _tokenizer("r1-llama")
    with pytest.raises(LoratuiError, match=r"^chats.jsonl, row 7: .*opens a think block.*no reasoning") as e:
        _encode(tok, [_chat(None, reasoning=False)], sources=["chats.jsonl:7"])
    assert "<think>" in e.value.hint


# --------------------------------------------------------------------------------------------
# Generation prompts that are not the start of the rendered reply (Mistral Nemo, Gemma 4)
# --------------------------------------------------------------------------------------------


def _two_turns(system: str | None) -> list[dict[str, str]]:
    """Two questions and answers, as the family matrix feeds them."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [
        {"role": "user", "content": "When does the library open?"},
        {"role": "assistant", "content": "It opens at 9:00 from Monday to Friday."},
        {"role": "user", "content": "And on Saturday?"},
        {"role": "assistant", "content": "On Saturday it opens at 10:00."},
    ]


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """The (start, end) positions of each run of trained labels."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


# What these templates write after the end of a reply (untrained): Gemma 4 ends a turn with "<turn|>\n".
_AFTER_REPLY = {"gemma4": "\n", "gemma4-interleaved": "\n"}


@pytest.mark.parametrize("system", [None, "You answer for the city library."])
@pytest.mark.parametrize(
    "family", ["mistral-nemo", "gemma4", "gemma4-interleaved", "devstral", "ministral3-reasoning", "mistral-small-3.2"]
)
def test_each_reply_is_trained_after_the_prompt_the_model_sees_at_inference(family, system):
    """At inference the conversation so far is rendered with the generation prompt and the model writes the
    reply (content and end of turn) after it. Mistral Nemo writes the system prompt into the last question
    only, so a finished turn renders without it; Gemma 4's prompt closes an empty thought channel that a
    finished turn does not hold. Whatever the longer render looks like, every trained reply is exactly
    those tokens after exactly that prompt, and the per-turn example holds nothing else before it."""
    tok = _tokenizer(family)
    messages = _two_turns(system)
    out = _encode(tok, [messages])
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    per_turn = family.startswith("gemma4") or (family == "mistral-nemo" and system is not None)
    assert len(out["input_ids"]) == (len(turns) if per_turn else 1)
    for j, k in enumerate(turns):
        prompt = tok.apply_chat_template(
            messages[:k], tokenize=False, add_generation_prompt=True, strftime_now=_clock(DAY)
        )
        prompt_ids, reply_ids = _ids(tok, prompt), _ids(tok, messages[k]["content"] + tok.eos_token)
        if per_turn:
            ids, labels = out["input_ids"][j], out["labels"][j]
            tail = _ids(tok, _AFTER_REPLY.get(family, ""))
            assert ids == prompt_ids + reply_ids + tail, f"turn {j}: not the prompt the model sees, then its reply"
            assert labels == [IGNORE] * len(prompt_ids) + reply_ids + [IGNORE] * len(tail), f"turn {j}"
            assert json.loads(out["messages"][j]) == messages[: k + 1] and out["chunk"][j] == len(turns) - 1 - j
        else:  # a prefix-consistent render: each reply's prompt is the render before it
            ids, labels = out["input_ids"][0], out["labels"][0]
            start, end = _trained_runs(labels)[j]
            assert ids[:start] == prompt_ids and ids[start:end] == reply_ids, f"turn {j}"
    if family == "mistral-nemo" and system:
        first, second = (tok.decode(ids) for ids in out["input_ids"])
        assert first.startswith(f"<s>[INST]{system}\n\nWhen does the library open?[/INST]")
        assert f"[INST]{system}\n\nAnd on Saturday?[/INST]" in second and second.count(system) == 1, (
            "the system prompt shows only in the last question, as at inference"
        )


_CHATML_WITH_PROMPT = (  # ChatML with another generation prompt (PROMPT)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'PROMPT' }}{% endif %}"
)


@pytest.mark.parametrize("generation_prompt", ["<|im_start|>assistant\nSure: ", "<|im_start|>bot\n"])
def test_a_generation_prompt_that_does_not_end_where_the_reply_starts_names_the_row(generation_prompt):
    """A prompt that writes text the rendered reply lacks, or opens another turn than the render: the reply
    cannot be placed after it faithfully."""
    tok = _tokenizer("qwen3")
    template = resolve_template("chatml", tok, DAY)
    template.source = _CHATML_WITH_PROMPT.replace("PROMPT", generation_prompt.replace("\n", "\\n"))
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template._compiled = _compile_jinja_template(template.source)
    messages = _two_turns("Be brief.")
    with pytest.raises(LoratuiError, match=r"^chats.jsonl, row 3: .*not how it renders that message"):
        _encode(tok, [messages], template, sources=["chats.jsonl:3"])


def test_train_on_prompt_trains_the_whole_conversation_once():
    tok = _tokenizer("qwen3")
    messages = _chat(None, reasoning=True)
    out = _encode(tok, [messages], train_on_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert out["input_ids"] == [_ids(tok, full)] and out["labels"] == out["input_ids"] and out["chunk"] == [0]


def test_shape_renderer_takes_the_per_turn_path_for_an_opaque_template_that_rewrites():
    """A template that copies contents verbatim but ends only the last turn with EOS (Phi-3.5's rule)."""
    tok = _tokenizer("phi3.5")
    template = resolve_template("auto", tok, DAY)
    template.source = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    )
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template._compiled = _compile_jinja_template(template.source)
    messages = _chat(None, reasoning=False)
    fast = ShapeRenderer(template, tok.eos_token, False)(messages, "chats.jsonl, row 1")
    assert fast == render_examples(messages, template, tok.eos_token, False) and len(fast) == 3


# --------------------------------------------------------------------------------------------
# The date
# --------------------------------------------------------------------------------------------


def _today_is(monkeypatch: pytest.MonkeyPatch, day: dt.date) -> None:
    """The machine's date for loratui and for transformers' own ``strftime_now``."""
    from transformers.utils import chat_template_utils

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return dt.datetime(day.year, day.month, day.day, 15, 30)

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)
    monkeypatch.setattr(templates_module, "today", lambda: day)


@pytest.mark.parametrize(
    "family,written", [("llama3.2", "Today Date: 14 Mar 2025"), ("gpt-oss", "Current date: 2025-03-14")]
)
def test_renders_keep_the_recorded_date_whatever_the_day(monkeypatch, family, written):
    tok = _tokenizer(family)
    messages = _chat("You answer for the city library.", reasoning=False)
    _today_is(monkeypatch, DAY)
    template = resolve_template("auto", tok)  # the date is taken once: the run's recorded date
    first = _encode(tok, [messages], template)
    _today_is(monkeypatch, dt.date(2031, 1, 2))
    assert tok.apply_chat_template(messages, tokenize=False).count("2031") == 1, "the template does write today"
    assert _encode(tok, [messages], template) == first
    assert _encode(tok, [messages], pickle.loads(pickle.dumps(template))) == first, "worker processes agree"
    assert written in tok.decode(first["input_ids"][0])
    turns = _transformers_turns(tok, messages)  # transformers with strftime_now pinned to the recorded date
    if family == "gpt-oss":
        _assert_per_turn(first, messages, turns)
    else:
        _assert_one_render(tok, first, messages, turns)


# --------------------------------------------------------------------------------------------
# Through the data step
# --------------------------------------------------------------------------------------------


def _model_with(tiny: Path, out: Path, family: str) -> Path:
    """A copy of the tiny model whose tokenizer is ``family``'s (template, special tokens, EOS)."""
    shutil.copytree(tiny, out)
    for f in out.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    _tokenizer(family).save_pretrained(str(out))
    return out


def _data_step(tmp: Path, model: Path, source: Path, name: str = "r") -> tuple[Any, dict[str, Any], Path, MemoryWriter]:
    cfg = load_config(
        None, [f"runs_dir={tmp / 'runs'}", f"name={name}", f"model.base={model}", f"data.source={source}"]
    )
    mem = MemoryWriter()
    code, result, _ = run_step("data", data_step.run, cfg, writers=[mem])
    errors = mem.of_type("error")
    assert code == 0, errors[0].message if errors else code
    data = tmp / "runs" / name / "data"
    return result, json.loads((data / "report.json").read_text()), data, mem


def _rows(n: int, reasoning: bool) -> list[list[dict[str, str]]]:
    rows = []
    for i in range(n):
        chat = _chat("You answer for the city library." if i % 2 else None, reasoning)
        rows.append([dict(m, content=f"{m['content']} ({i})") if m["role"] == "user" else m for m in chat])
    return rows


def test_qwen3_multi_turn_dataset_through_the_data_step(tmp_path, monkeypatch, tiny_model_factory):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    model = _model_with(tiny_model_factory(tokenizer="bpe"), tmp_path / "qwen3", "qwen3")
    rows = _rows(10, reasoning=True)
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    result, report, data, mem = _data_step(tmp_path, model, source)

    assert report["splits"] == {"train": 24, "validation": 3, "test": 3}, "8/1/1 rows of 3 replies each"
    assert report["per_turn"]["rows"] == 10 and report["per_turn"]["examples"] == 30
    sentence = "10 multi-turn rows became 30 per-turn examples because the tokenizer chat template rewrites"
    assert sentence in (data / "report.md").read_text()
    assert any(sentence in e.message for e in mem.of_type("log"))
    manifest = json.loads((data / "dataset.json").read_text())
    assert dt.date.fromisoformat(manifest["render_date"]) and "render_date" not in report, "Qwen3 writes no date"

    tok = AutoTokenizer.from_pretrained(str(model))  # what the model is trained and served with
    splits = {s: load_from_disk(str(data / "processed" / s)) for s in ("train", "validation", "test")}
    by_source: dict[str, dict[str, list[Any]]] = {}
    for split, ds in splits.items():
        for ex in ds:
            row = by_source.setdefault(ex["source"], {"split": [], **{c: [] for c in ds.column_names}})
            row["split"].append(split)
            for c in ds.column_names:
                row[c].append(ex[c])
    assert len(by_source) == 10
    for src, out in by_source.items():
        assert len(set(out["split"])) == 1, f"{src}: the turns of one row stay in one split"
        messages = rows[int(src.rpartition(":")[2]) - 1]
        _assert_per_turn(out, messages, _transformers_turns(tok, messages))


def test_worker_processes_split_rows_per_turn_the_same(tiny_model_factory, tmp_path):
    from loratui.pipeline.data.formats import to_example

    model = _model_with(tiny_model_factory(tokenizer="bpe"), tmp_path / "qwen3", "qwen3")
    cfg = load_config(None, [f"model.base={model}", f"runs_dir={tmp_path / 'runs'}"])
    tokenizer, template, _ = models.load_tokenizer_and_template(cfg, null_sink("data"))
    examples = [to_example({"messages": r}, "chat", "f", i, None) for i, r in enumerate(_rows(6, True))]
    one, two = (
        tokens.encode_examples(
            examples, tokenizer, template, cfg, null_sink("data"), lambda: False, "train", num_proc=n
        )
        for n in (1, 2)
    )
    assert len(one) == 18
    for column in ("input_ids", "labels", "source", "messages", "chunk"):
        assert one[column][:] == two[column][:]


def test_the_render_date_is_recorded_once_per_run_and_keyed(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    model = _model_with(tiny_model_factory(tokenizer="bpe"), tmp_path / "llama", "llama3.2")
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in _rows(10, reasoning=False)))
    _today_is(monkeypatch, DAY)
    first, report, data, _ = _data_step(tmp_path, model, source)
    assert report["render_date"] == "2025-03-14" and "per_turn" not in report
    assert json.loads((data / "dataset.json").read_text())["render_date"] == "2025-03-14"
    assert "Today Date: 14 Mar 2025" in (data / "preview.txt").read_text()
    assert "rendered with 2025-03-14" in (data / "report.md").read_text()

    _today_is(monkeypatch, dt.date(2031, 1, 2))  # the same run, another day: the recorded date, the same data
    again, report_again, _, _ = _data_step(tmp_path, model, source)
    assert again.summary["cache_hit"] is True and report_again == report
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}", "name=r", f"model.base={model}", f"data.source={source}"])
    assert models.load_model_inputs(cfg, null_sink("data")).template.date == DAY, "later steps render the same"

    other, report_other, data_other, _ = _data_step(tmp_path, model, source, name="new")  # a new run: its own day
    assert other.summary["cache_hit"] is False and report_other["render_date"] == "2031-01-02"
    assert report_other["cache_key"] != report["cache_key"]
    assert "Today Date: 02 Jan 2031" in (data_other / "preview.txt").read_text()


def test_a_row_without_a_faithful_split_stops_the_step_naming_it(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    model = _model_with(tiny_model_factory(tokenizer="bpe"), tmp_path / "r1", "r1-llama")
    source = tmp_path / "chats.jsonl"
    rows = [
        [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": _think("Easy.", f"Answer {i}.") if i != 4 else f"Answer {i}."},
        ]
        for i in range(10)
    ]
    source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"runs_dir={tmp_path / 'runs'}",
            "name=r",
            f"model.base={model}",
            f"data.source={source}",
            "data.val_ratio=0",
            "data.test_ratio=0",
        ],
    )
    mem = MemoryWriter()
    code, _, _ = run_step("data", data_step.run, cfg, writers=[mem])
    (error,) = mem.of_type("error")
    assert code != 0 and error.message.startswith(f"{source}, row 5: ")
    assert "no reasoning" in error.message and "Traceback" not in error.message
