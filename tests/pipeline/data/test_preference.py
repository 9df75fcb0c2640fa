"""Preference data end to end: the three formats through the data step, the processed columns, the
shared-prompt invariant, splits and dedupe on pairs, truncation of both sides, KTO labels, report and preview."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loratui.pipeline.config import load_config
from loratui.pipeline.data import step as data_step
from loratui.pipeline.data.encode import IGNORE
from loratui.pipeline.events import MemoryWriter
from loratui.pipeline.steps import run_step

QUESTIONS = [f"When does branch {i} of the library open on weekdays?" for i in range(30)]


def pair(i: int) -> dict[str, str]:
    return {
        "prompt": QUESTIONS[i],
        "chosen": f"Branch {i} opens at 9:00.",
        "rejected": f"I am not sure, maybe ask someone else about branch {i}.",
    }


def conversation_pair(i: int) -> dict[str, Any]:
    prompt = [
        {"role": "system", "content": "You answer for the city library."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": QUESTIONS[i]},
    ]
    return {
        "chosen": [*prompt, {"role": "assistant", "content": f"Branch {i} opens at 9:00."}],
        "rejected": [*prompt, {"role": "assistant", "content": "No idea."}],
    }


def openai_pair(i: int) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": QUESTIONS[i]}], "tools": [], "parallel_tool_calls": True},
        "preferred_output": [{"role": "assistant", "content": f"Branch {i} opens at 9:00."}],
        "non_preferred_output": [{"role": "assistant", "content": "No idea."}],
    }


def unpaired(i: int) -> dict[str, Any]:
    good = i % 2 == 0
    return {
        "prompt": QUESTIONS[i],
        "completion": f"Branch {i} opens at 9:00." if good else "No idea.",
        "label": good,
    }


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_model_factory):
    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    return {"tmp": tmp_path, "model": tiny_model_factory(tokenizer="bpe")}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_data(env: dict[str, Any], source: Path, *overrides: str, name: str = "r") -> tuple[dict[str, Any], Path, Any]:
    args = [f"runs_dir={env['tmp'] / 'runs'}", f"name={name}", f"model.base={env['model']}", f"data.source={source}"]
    cfg = load_config(None, [*args, *overrides])
    mem = MemoryWriter()
    code, _, _ = run_step("data", data_step.run, cfg, writers=[mem])
    errors = mem.of_type("error")
    assert code == 0, errors[0].message if errors else code
    data = env["tmp"] / "runs" / name / "data"
    return json.loads((data / "report.json").read_text()), data, mem


def load(data: Path, split: str) -> Any:
    from datasets import load_from_disk

    return load_from_disk(str(data / "processed" / split))


def tokenizer(env: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(env["model"])


def trained_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])


def first_trained(labels: list[int]) -> int:
    return next(k for k, label in enumerate(labels) if label != IGNORE)


def assert_pair_invariant(row: dict[str, Any]) -> None:
    p = first_trained(row["labels"])
    assert first_trained(row["rejected_labels"]) == p
    assert row["input_ids"][:p] == row["rejected_input_ids"][:p]
    assert all(label == IGNORE for label in row["labels"][:p] + row["rejected_labels"][:p])


@pytest.mark.parametrize(
    "make", [pair, conversation_pair, openai_pair], ids=["prompt-chosen-rejected", "conversations", "openai"]
)
def test_pairs_are_encoded_with_a_shared_prompt_and_only_the_final_reply_trained(env, make):
    source = write_jsonl(env["tmp"] / "pairs.jsonl", [make(i) for i in range(20)])
    report, data, _ = run_data(env, source)
    assert report["preference"] == "paired"
    assert json.loads((data / "dataset.json").read_text())["preference"] == "paired"
    train = load(data, "train")
    assert set(train.column_names) == {
        "input_ids",
        "labels",
        "rejected_input_ids",
        "rejected_labels",
        "rejected",
        "messages",
        "source",
        "meta",
        "chunk",
    }
    tok = tokenizer(env)
    for row in train:
        assert_pair_invariant(row)
        i = int(row["source"].rpartition(":")[2]) - 1
        assert trained_text(tok, row["input_ids"], row["labels"]) == f"Branch {i} opens at 9:00.<|im_end|>"
        rejected = make(i)
        text = row["rejected"]
        assert trained_text(tok, row["rejected_input_ids"], row["rejected_labels"]) == f"{text}<|im_end|>"
        assert text in json.dumps(rejected)
        assert json.loads(row["messages"])[-1] == {"role": "assistant", "content": f"Branch {i} opens at 9:00."}
        assert row["chunk"] == 0
    assert report["splits"]["train"] + report["splits"]["validation"] + report["splits"]["test"] == 20


# --------------------------------------------------------------------------------------------
# Formats: detection, parsing, column mapping
# --------------------------------------------------------------------------------------------


def test_each_preference_format_is_detected_and_says_why():
    from loratui.pipeline.data.formats import detect_format

    assert detect_format([pair(0)] * 3, "f").format == "preference"
    assert detect_format([conversation_pair(0)] * 3, "f").format == "preference"
    assert detect_format([openai_pair(0)] * 3, "f").format == "openai_preference"
    d = detect_format([unpaired(0)] * 3, "f")
    assert d.format == "unpaired_preference" and "label" in d.reason


def test_a_label_column_makes_prompt_completion_rows_kto_and_without_it_they_stay_qa():
    from loratui.pipeline.data.formats import detect_format

    assert detect_format([{"prompt": "q", "completion": "a", "label": True}], "f").format == "unpaired_preference"
    assert detect_format([{"prompt": "q", "completion": "a"}], "f").format == "qa"


def test_text_prompt_and_replies_become_the_chosen_conversation_and_the_rejected_reply():
    from loratui.pipeline.data.formats import to_example

    ex = to_example({**pair(1), "topic": "hours"}, "preference", "f", 3, "Be brief.")
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": QUESTIONS[1]},
        {"role": "assistant", "content": "Branch 1 opens at 9:00."},
    ]
    assert ex.rejected == [{"role": "assistant", "content": pair(1)["rejected"]}]
    assert ex.label is None and ex.preference == "paired" and ex.meta == {"topic": "hours"}


def test_message_list_prompt_and_one_message_replies():
    from loratui.pipeline.data.formats import to_example

    row = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    }
    ex = to_example(row, "preference", "f", 1, "ignored: the row has its own")
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
    assert ex.messages[0]["content"] == "S" and ex.rejected == [{"role": "assistant", "content": "B"}]


def test_conversations_share_their_prompt_implicitly():
    from loratui.pipeline.data.formats import to_example

    row = conversation_pair(2)
    ex = to_example(row, "preference", "f", 1, None)
    assert ex.messages == row["chosen"]
    assert ex.rejected == [{"role": "assistant", "content": "No idea."}]


def test_openai_rows_ignore_tools_and_read_developer_as_system():
    from loratui.pipeline.data.formats import to_example

    row = openai_pair(0)
    row["input"]["messages"].insert(0, {"role": "developer", "content": "Be kind."})
    row["tools"] = [{"type": "function", "function": {"name": "f"}}]
    ex = to_example(row, "openai_preference", "f", 1, None)
    assert ex.messages[0] == {"role": "system", "content": "Be kind."}
    assert ex.messages[-1]["content"] == "Branch 0 opens at 9:00." and ex.meta == {}


@pytest.mark.parametrize("label,expected", [(True, True), (False, False), ("true", True), (" False ", False)])
def test_kto_labels(label, expected):
    from loratui.pipeline.data.formats import to_example

    ex = to_example({"prompt": "q", "completion": "a", "label": label}, "unpaired_preference", "f", 1, None)
    assert ex.label is expected and ex.rejected is None and ex.preference == "unpaired"


def test_json_text_cells_hold_message_lists():
    from loratui.pipeline.data.formats import to_example

    row = {k: json.dumps(v) for k, v in conversation_pair(0).items()}
    ex = to_example(row, "preference", "f.csv", 2, None)
    assert ex.messages == conversation_pair(0)["chosen"]
    text = to_example({"prompt": "q", "chosen": "[1, 2]", "rejected": "[3]"}, "preference", "f", 1, None)
    assert text.messages[-1]["content"] == "[1, 2]", "JSON that is not a message list stays text"


def test_column_mapping_on_preference_rows():
    from loratui.pipeline.data.formats import apply_columns, detect_format, to_example

    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    row = apply_columns({"question": "Q", "good": "A", "bad": "B"}, columns)
    assert detect_format([row], "f").format == "preference"
    assert to_example(row, "preference", "f", 1, None).rejected == [{"role": "assistant", "content": "B"}]
    kto = apply_columns({"q": "Q", "a": "A", "ok": False}, {"prompt": "q", "completion": "a", "label": "ok"})
    assert detect_format([kto], "f").format == "unpaired_preference"


def test_dedupe_keys_include_the_rejected_reply_and_the_label():
    from loratui.pipeline.data.formats import to_example

    a = to_example(pair(0), "preference", "f", 1, None)
    b = to_example(dict(pair(0)), "preference", "g", 5, None)
    c = to_example({**pair(0), "rejected": "Something else."}, "preference", "f", 2, None)
    assert a.key() == b.key() != c.key()
    good = to_example({"prompt": "q", "completion": "a", "label": True}, "unpaired_preference", "f", 1, None)
    bad = to_example({"prompt": "q", "completion": "a", "label": False}, "unpaired_preference", "f", 2, None)
    sft = to_example({"prompt": "q", "completion": "a"}, "qa", "f", 3, None)
    assert len({good.key(), bad.key(), sft.key()}) == 3


# --------------------------------------------------------------------------------------------
# The data step on pairs: splits, truncation, KTO, report and preview
# --------------------------------------------------------------------------------------------


def test_splits_and_dedupe_across_splits_on_pairs(env):
    source = write_jsonl(env["tmp"] / "pairs.jsonl", [pair(i) for i in range(20)])
    test = write_jsonl(env["tmp"] / "test.jsonl", [pair(3), pair(25), {**pair(4), "rejected": "Other."}])
    report, data, _ = run_data(env, source, f"data.test_source={test}", "data.val_ratio=0.2")
    assert report["splits"] == {"train": 16, "validation": 4, "test": 2}
    assert [(p["kind"], p["row"]) for p in report["dropped"]] == [("duplicate_across_splits", 1)]
    sources = {split: set(load(data, split)["source"]) for split in ("train", "validation")}
    assert not sources["train"] & sources["validation"]
    assert {s.rpartition(":")[2] for s in load(data, "test")["source"]} == {"2", "3"}
    md = (data / "report.md").read_text()
    assert "Preference pairs (a chosen and a rejected reply each): train 16, validation 4, test 2." in md


def test_truncation_cuts_both_sides_at_max_length_keeping_the_start(env):
    long_reply = "Branch hours vary by season and by day of the week. " * 20
    rows = [pair(i) for i in range(8)] + [
        {"prompt": "Q?", "chosen": long_reply, "rejected": "Short."},
        {"prompt": "Q?", "chosen": long_reply, "rejected": long_reply.upper()},
    ]
    source = write_jsonl(env["tmp"] / "pairs.jsonl", rows)
    report, data, _ = run_data(env, source, "data.max_length=128", "data.val_ratio=0", "data.test_ratio=0")
    truncated = [(p["kind"], p["row"], p["action"]) for p in report["truncated"]]
    assert truncated == [("too_long", 9, "truncated"), ("too_long", 10, "truncated")]
    assert "chosen" in report["truncated"][0]["message"] and "rejected" not in report["truncated"][0]["message"]
    assert "chosen" in report["truncated"][1]["message"] and "rejected" in report["truncated"][1]["message"]
    train = load(data, "train")
    row = next(r for r in train if r["source"].endswith(":9"))
    assert len(row["input_ids"]) == 128 and len(row["labels"]) == 128
    assert len(row["rejected_input_ids"]) < 128
    assert_pair_invariant(row)
    both = next(r for r in train if r["source"].endswith(":10"))
    assert len(both["input_ids"]) == len(both["rejected_input_ids"]) == 128
    assert both["input_ids"][:20] == row["input_ids"][:20], "truncation keeps the start"
    assert_pair_invariant(both)
    assert all(len(r["input_ids"]) <= 128 and len(r["rejected_input_ids"]) <= 128 for r in train)
    assert report["max_length"] == 128


def test_auto_max_length_fits_the_longer_side_and_token_stats_count_both(env):
    rows = [{**pair(i), "rejected": "No. " * 40} for i in range(6)]
    source = write_jsonl(env["tmp"] / "pairs.jsonl", rows)
    report, data, _ = run_data(env, source, "data.val_ratio=0", "data.test_ratio=0")
    train = load(data, "train")
    chosen = [len(r["input_ids"]) for r in train]
    rejected = [len(r["rejected_input_ids"]) for r in train]
    assert max(rejected) > max(chosen)
    assert report["max_length"] == -(-max(rejected) // 64) * 64
    tokens = report["tokens"]
    assert tokens["train"]["rows"] == 6 and tokens["train"]["max"] == max(rejected)
    assert tokens["per_epoch"] == sum(chosen) + sum(rejected)
    trained = sum(label != IGNORE for r in train for label in r["labels"] + r["rejected_labels"])
    assert tokens["trained_per_epoch"] == trained


def test_kto_rows_have_labels_and_no_rejected_columns(env):
    source = write_jsonl(env["tmp"] / "kto.jsonl", [unpaired(i) for i in range(10)])
    report, data, _ = run_data(env, source, "data.val_ratio=0", "data.test_ratio=0")
    assert report["preference"] == "unpaired"
    train = load(data, "train")
    assert set(train.column_names) == {"input_ids", "labels", "preference_label", "source", "messages", "meta", "chunk"}
    tok = tokenizer(env)
    for row in train:
        i = int(row["source"].rpartition(":")[2]) - 1
        assert row["preference_label"] == (1 if i % 2 == 0 else 0)
        assert trained_text(tok, row["input_ids"], row["labels"]) == unpaired(i)["completion"] + "<|im_end|>"
    assert "Unpaired preference rows" in (data / "report.md").read_text()
    preview = (data / "preview.txt").read_text()
    assert ", a desirable reply" in preview and ", an undesirable reply" in preview


def test_train_on_prompt_is_ignored_for_preference_rows_with_a_warning(env):
    source = write_jsonl(env["tmp"] / "pairs.jsonl", [conversation_pair(i) for i in range(6)])
    _, data, mem = run_data(env, source, "data.train_on_prompt=true")
    warnings = [e.message for e in mem.of_type("log") if getattr(e, "level", "") == "warning"]
    assert any("train_on_prompt is ignored for preference rows" in w for w in warnings), warnings
    tok = tokenizer(env)
    row = load(data, "train")[0]
    assert trained_text(tok, row["input_ids"], row["labels"]).endswith("opens at 9:00.<|im_end|>")
    assert "Hello! How can I help?" not in trained_text(tok, row["input_ids"], row["labels"])


def test_preview_shows_both_replies_with_their_trained_tokens(env, capsys, monkeypatch):
    from loratui.pipeline.data import summary

    monkeypatch.setenv("COLUMNS", "400")  # one console line per example

    source = write_jsonl(env["tmp"] / "pairs.jsonl", [pair(i) for i in range(10)])
    run_data(env, source, "data.val_ratio=0", "data.test_ratio=0", "data.preview_examples=2")
    preview = (env["tmp"] / "runs" / "r" / "data" / "preview.txt").read_text()
    assert "2 of 10 training pairs" in preview
    assert "chosen: <|im_start|>user\n" + QUESTIONS[0] in preview
    assert "⟦Branch 0 opens at 9:00.<|im_end|>⟧" in preview
    assert "rejected (after the same prompt): ⟦" + pair(0)["rejected"] + "<|im_end|>⟧" in preview
    assert "train: 10 pairs; tokens per side" in preview
    cfg = load_config(None, [f"runs_dir={env['tmp'] / 'runs'}", "name=r", f"model.base={env['model']}"])
    summary.show_preview(cfg, n=1)
    out = capsys.readouterr().out
    assert "1 of 10 training pairs" in out and "rejected (after the same prompt):" in out
    assert pair(0)["rejected"] in out and "Branch 0 opens at 9:00." in out


def test_a_second_run_is_a_cache_hit(env):
    source = write_jsonl(env["tmp"] / "pairs.jsonl", [pair(i) for i in range(10)])
    run_data(env, source, name="a")
    _, data, mem = run_data(env, source, name="b")
    assert any("cache hit" in e.message for e in mem.of_type("log"))
    assert load(data, "train").column_names[:4] == ["input_ids", "labels", "rejected_input_ids", "rejected_labels"]
