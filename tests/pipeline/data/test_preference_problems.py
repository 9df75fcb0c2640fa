"""Bad preference rows through the real CLI (``loratui data``): each is listed in the report with its file,
row, field and problem kind, the good rows train, and no traceback reaches the user. File-level mistakes
(a mix of preference and supervised files, preference data for a seq2seq model) are one clear error.

The model has SmolLM2's real tokenizer and chat template (SmolLM2's BPE merges newlines, which is how a
reply can start inside a prompt token).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.data.test_corrupt_inputs import Expect, among, jsonl

MAX_LENGTH = 96  # every good row below fits; LONG does not
LONG = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture
def tiny(tiny_model_factory: Callable[..., Path]) -> Path:
    """Overrides conftest's ``tiny`` for ``data_cli``: the tiny model with SmolLM2's tokenizer."""
    return tiny_model_factory(tokenizer="smollm2")


def pair(i: int) -> dict[str, Any]:
    return {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."}


def convo(prompt: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def conversation_pair(i: int) -> dict[str, Any]:
    return {"chosen": convo(f"Question {i}?", f"Answer {i}."), "rejected": convo(f"Question {i}?", f"No {i}.")}


def openai_pair(i: int) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": f"Question {i}?"}]},
        "preferred_output": [{"role": "assistant", "content": f"Answer {i}."}],
        "non_preferred_output": [{"role": "assistant", "content": f"No {i}."}],
    }


def unpaired(i: int) -> dict[str, Any]:
    return {"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0}


def reply(content: Any, role: str = "assistant") -> list[dict[str, Any]]:
    return [{"role": role, "content": content}]


@dataclass(frozen=True)
class Case:
    files: dict[str, bytes]  # the first file is data.source
    read: int
    expect: tuple[Expect, ...]
    overrides: tuple[str, ...] = ()


def case(id: str, content: bytes, read: int, *expect: Expect, **kwargs: Any) -> Any:
    extra = kwargs.pop("extra", {})
    return pytest.param(Case({"data.jsonl": content, **extra}, read, expect, **kwargs), id=id)


CASES = [
    case(
        "identical-replies",
        among(pair, {"prompt": "q", "chosen": "Same.", "rejected": " Same. "}),
        7,
        Expect("identical_replies", 4, "rejected", message="same text"),
    ),
    case(
        "empty-chosen-text",
        among(pair, {"prompt": "q", "chosen": " ", "rejected": "b"}),
        7,
        Expect("empty_field", 4, "chosen"),
    ),
    case(
        "empty-rejected-message",
        among(pair, {"prompt": "q", "chosen": "a", "rejected": reply("  ")}),
        7,
        Expect("empty_assistant_turn", 4, "rejected[0]"),
    ),
    case(
        "reply-is-a-user-message",
        among(pair, {"prompt": "q", "chosen": reply("a", role="user"), "rejected": "b"}),
        7,
        Expect("reply_not_assistant", 4, "chosen[0]", message="'user'"),
    ),
    case(
        "reply-has-two-messages",
        among(pair, {"prompt": "q", "chosen": reply("a") + reply("b"), "rejected": "c"}),
        7,
        Expect("reply_not_assistant", 4, "chosen", message="2 messages"),
    ),
    case("missing-rejected", among(pair, {"prompt": "q", "chosen": "a"}), 7, Expect("missing_field", 4, "rejected")),
    case(
        "number-as-rejected",
        among(pair, {"prompt": "q", "chosen": "a", "rejected": 42}),
        7,
        Expect("wrong_type", 4, "rejected", message="a number"),
    ),
    case(
        "prompt-ends-with-the-assistant",
        among(pair, {"prompt": convo("q", "a"), "chosen": "b", "rejected": "c"}),
        7,
        Expect("bad_role_order", 4, "prompt", message="end with the user"),
    ),
    case(
        "prompt-with-an-unknown-role",
        among(pair, {"prompt": [{"role": "robot", "content": "q"}], "chosen": "b", "rejected": "c"}),
        7,
        Expect("unknown_role", 4, "prompt[0]"),
    ),
    case(
        "reply-merges-with-the-prompt",
        among(pair, {"prompt": "q", "chosen": "\n\nAnswer.", "rejected": "No."}),
        7,
        Expect("prompt_boundary", 4, message="token boundary"),
    ),
    case(
        "conversations-with-different-prompts",
        among(conversation_pair, {"chosen": convo("q", "a"), "rejected": convo("other q", "b")}),
        7,
        Expect("prompt_mismatch", 4, "rejected", message="message 0"),
    ),
    case(
        "conversation-ends-with-the-user",
        among(conversation_pair, {"chosen": convo("q", "a"), "rejected": [*convo("q", "a"), *reply("more?", "user")]}),
        7,
        Expect("reply_not_assistant", 4, "rejected"),
    ),
    case(
        "openai-tool-call-reply",
        among(
            openai_pair,
            {
                **openai_pair(99),
                "preferred_output": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]}],
            },
        ),
        7,
        Expect("reply_not_assistant", 4, "preferred_output[0]", message="tools"),
    ),
    case(
        "openai-tool-role-reply",
        among(openai_pair, {**openai_pair(99), "non_preferred_output": reply("x", role="tool")}),
        7,
        Expect("reply_not_assistant", 4, "non_preferred_output[0]"),
    ),
    case(
        "openai-input-without-messages",
        among(openai_pair, {**openai_pair(99), "input": {"prompt": "q"}}),
        7,
        Expect("missing_field", 4, "input.messages"),
    ),
    case(
        "kto-label-is-text",
        among(unpaired, {"prompt": "q", "completion": "a", "label": "yes"}),
        7,
        Expect("bad_label", 4, "label", message="'yes'"),
    ),
    case(
        "kto-label-is-a-number",
        among(unpaired, {"prompt": "q", "completion": "a", "label": 1}),
        7,
        Expect("bad_label", 4, "label", message="a number"),
    ),
    case(
        "kto-empty-completion",
        among(unpaired, {"prompt": "q", "completion": "", "label": True}),
        7,
        Expect("empty_field", 4, "completion"),
    ),
    case("invalid-json-line", among(pair, '{"prompt": "q", "chosen": '), 7, Expect("invalid_json", 4)),
    case("line-is-a-list", among(pair, [1, 2]), 7, Expect("not_an_object", 4)),
    case("duplicate-pair", jsonl(*map(pair, range(6)), pair(2)), 7, Expect("duplicate", 7, message="row 3")),
    case(
        "test-pair-duplicates-a-training-pair",
        jsonl(*map(pair, range(6))),
        9,
        Expect("duplicate_across_splits", 2, file="test.jsonl"),
        extra={"test.jsonl": jsonl(pair(100), pair(3), pair(101))},
        overrides=("data.test_source={dir}/test.jsonl",),
    ),
    case(
        "too-long-rejected-truncated",
        among(pair, {"prompt": "q", "chosen": "a", "rejected": LONG}),
        7,
        Expect("too_long", 4, where="truncated", message="rejected"),
        overrides=(f"data.max_length={MAX_LENGTH}",),
    ),
    case(
        "too-long-chosen-dropped",
        among(pair, {"prompt": "q", "chosen": LONG, "rejected": "b"}),
        7,
        Expect("too_long", 4, message="chosen"),
        overrides=(f"data.max_length={MAX_LENGTH}", "data.on_problem.too_long=drop"),
    ),
    case(
        "too-long-prompt-leaves-nothing-to-train",
        among(pair, {"prompt": LONG, "chosen": "a", "rejected": "b"}),
        7,
        Expect("too_long", 4, where="truncated"),
        Expect("no_trained_tokens", 4, "chosen", message="chosen and the rejected"),
        overrides=(f"data.max_length={MAX_LENGTH}",),
    ),
]


@pytest.mark.parametrize("c", CASES)
def test_bad_preference_row_is_listed_and_the_step_goes_on(c: Case, data_cli, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, content in c.files.items():
        (folder / name).write_bytes(content)
    source = folder / next(iter(c.files))
    r = data_cli(str(source), *(o.format(dir=folder) for o in c.overrides))
    assert "Traceback" not in r.err
    assert r.code == 0, r.err
    report = r.report
    assert report is not None and report["preference"] in ("paired", "unpaired")
    for e in c.expect:
        file = str(folder / (e.file or source.name))
        hits = [p for p in report[e.where] if p["kind"] == e.kind and p["file"] == file and p["row"] == e.row]
        assert hits, f"no {e.kind} entry for {file} row {e.row} in {e.where}: {report[e.where]}"
        assert hits[0]["message"].strip()
        if e.field is not None:
            assert hits[0].get("field") == e.field, hits[0]
        if e.message is not None:
            assert e.message in hits[0]["message"], hits[0]
    for where in ("dropped", "truncated"):
        assert len(report[where]) == len([e for e in c.expect if e.where == where]), f"{where}: {report[where]}"
    rows = report["rows"]
    assert rows["read"] == c.read
    assert rows["kept"] + rows["dropped"] == rows["read"], rows
    md = (tmp_path / "runs" / "x" / "data" / "report.md").read_text(encoding="utf-8")
    for p in report["dropped"] + report["truncated"]:
        assert f"{p['file']}, row {p['row']}" in md


def test_at_least_twelve_problem_kinds_are_covered() -> None:
    kinds = {e.kind for p in CASES for e in p.values[0].expect}
    assert len(kinds) >= 12, kinds
    assert {"identical_replies", "reply_not_assistant", "prompt_mismatch", "prompt_boundary", "bad_label"} <= kinds


def test_preference_and_supervised_files_together_are_one_clear_error(data_cli, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl(*map(pair, range(6))))
    (tmp_path / "in" / "b.jsonl").write_bytes(jsonl(*({"question": f"q{i}", "answer": f"a{i}"} for i in range(6))))
    r = data_cli(str(tmp_path / "in" / "*.jsonl"))
    assert "Traceback" not in r.err and r.code == 2, r.err
    assert len(r.error_lines) == 1
    line = r.error_lines[0]
    assert "a.jsonl" in line and "b.jsonl" in line and "preference" in line and "qa" in line


def test_paired_and_unpaired_files_together_are_one_clear_error(data_cli, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    train = tmp_path / "in" / "train.jsonl"
    train.write_bytes(jsonl(*map(pair, range(6))))
    (tmp_path / "in" / "val.jsonl").write_bytes(jsonl(*map(unpaired, range(3))))
    r = data_cli(str(train), f"data.val_source={tmp_path / 'in' / 'val.jsonl'}")
    assert "Traceback" not in r.err and r.code == 2, r.err
    assert "unpaired_preference" in r.error_lines[0] and "val.jsonl" in r.error_lines[0]


def test_a_file_mixing_preference_and_supervised_rows_is_one_clear_error(data_cli, tmp_path: Path) -> None:
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(jsonl(*map(pair, range(5)), *({"question": f"q{i}", "answer": f"a{i}"} for i in range(3))))
    r = data_cli(str(source))
    assert "Traceback" not in r.err and r.code == 2, r.err
    assert "mixed.jsonl" in r.error_lines[0] and "5 paired preference rows" in r.error_lines[0]


def test_preference_data_for_a_seq2seq_model_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, tiny_model_factory
) -> None:
    from loratui.cli import main

    monkeypatch.setenv("LORATUI_HOME", str(tmp_path / "home"))
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(jsonl(*map(pair, range(6))))
    t5 = tiny_model_factory(family="t5", tokenizer="bpe")
    code = main(["data", f"runs_dir={tmp_path / 'runs'}", "name=x", f"model.base={t5}", f"data.source={source}"])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "decoder-only" in err and "pairs.jsonl" in err


def test_kto_labels_from_csv_cells(data_cli, tmp_path: Path) -> None:
    source = tmp_path / "kto.csv"
    lines = ["prompt,completion,label"] + [
        f"Question {i}?,Answer {i}.,{'true' if i % 2 else 'FALSE'}" for i in range(8)
    ]
    source.write_text("\n".join([*lines, "Question x?,Answer x.,maybe"]) + "\n")
    r = data_cli(str(source))
    assert r.code == 0, r.err
    assert r.report is not None and r.report["preference"] == "unpaired"
    assert [(p["kind"], p["row"]) for p in r.report["dropped"]] == [("bad_label", 10)]
    from datasets import concatenate_datasets, load_from_disk

    data = tmp_path / "runs" / "x" / "data" / "processed"
    ds = concatenate_datasets([load_from_disk(str(p)) for p in sorted(data.iterdir())])
    by_row = {int(s.rpartition(":")[2]): label for s, label in zip(ds["source"], ds["preference_label"])}
    assert by_row == {row: (1 if (row - 2) % 2 else 0) for row in range(2, 10)}
    assert json.loads((tmp_path / "runs" / "x" / "data" / "dataset.json").read_text())["preference"] == "unpaired"
