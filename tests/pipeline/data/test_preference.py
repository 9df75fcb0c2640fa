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
