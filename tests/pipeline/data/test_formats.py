"""Format detection, column mapping and row validation, one example row per format."""

from __future__ import annotations

import pytest

from loratui.pipeline.data.formats import apply_columns, detect_format, to_example
from loratui.pipeline.data.problems import RowError
from loratui.pipeline.errors import LoratuiError

ROWS = {
    "alpaca": {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
    "qa": {"question": "When does the library open?", "answer": "At 08:30."},
    "chat": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    "text": {"text": "Chapter one. It was a bright cold day."},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_detects_each_format_and_says_why(fmt):
    d = detect_format([ROWS[fmt]] * 3, "f.jsonl")
    assert d.format == fmt
    assert "3 of 3 sampled rows" in d.reason


@pytest.mark.parametrize("fields", [("prompt", "completion"), ("prompt", "response")])
def test_qa_variants(fields):
    row = {fields[0]: "Q?", fields[1]: "A."}
    assert detect_format([row], "f").format == "qa"
    ex = to_example(row, "qa", "f", 1, None)
    assert ex.messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_detection_follows_the_majority():
    rows = [ROWS["alpaca"]] * 5 + [ROWS["qa"]] * 2
    assert detect_format(rows, "f").format == "alpaca"


def test_undetectable_columns_are_one_clear_error():
    with pytest.raises(LoratuiError) as exc:
        detect_format([{"foo": 1, "bar": 2}], "data.csv")
    assert "data.csv" in exc.value.message and "bar, foo" in exc.value.message
    assert "data.columns" in exc.value.hint


def test_column_mapping():
    row = apply_columns({"prompt_text": "Q", "reply": "A", "id": 7}, {"question": "prompt_text", "answer": "reply"})
    assert detect_format([row], "f").format == "qa"
    ex = to_example(row, "qa", "f", 1, None)
    assert ex.messages[1]["content"] == "A" and ex.meta == {"id": 7}


def test_alpaca_joins_input_and_uses_system_prompt():
    ex = to_example(ROWS["alpaca"], "alpaca", "f", 1, "You are terse.")
    assert ex.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Add the numbers\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_row_system_message_wins_over_config():
    ex = to_example(ROWS["chat"], "chat", "f", 1, "ignored")
    assert ex.messages[0] == {"role": "system", "content": "Be brief."}
    assert len(ex.messages) == 3


def test_sharegpt_roles_are_mapped():
    ex = to_example(ROWS["sharegpt"], "sharegpt", "f", 1, None)
    assert [m["role"] for m in ex.messages] == ["user", "assistant"]


def test_chat_messages_given_as_json_text_in_a_csv_cell():
    row = {"messages": '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]'}
    assert to_example(row, "chat", "f.csv", 2, None).messages[1]["content"] == "Yo"


def test_extra_columns_are_kept_as_meta():
    ex = to_example({**ROWS["qa"], "fact": "08:30", "topic": "hours"}, "qa", "f", 1, None)
    assert ex.meta == {"fact": "08:30", "topic": "hours"}


def test_exact_duplicates_share_a_key():
    a = to_example(ROWS["qa"], "qa", "f", 1, None)
    b = to_example(dict(ROWS["qa"]), "qa", "g", 9, None)
    c = to_example({**ROWS["qa"], "answer": "At 09:00."}, "qa", "f", 2, None)
    assert a.key() == b.key() != c.key()


BAD = [
    ("qa", {"question": "Q"}, "missing_field", "answer"),
    ("qa", {"question": "Q", "answer": "  "}, "empty_field", "answer"),
    ("qa", {"question": "Q", "answer": 42}, "wrong_type", "answer"),
    ("chat", {"messages": "not json"}, "wrong_type", "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "unknown_role", "messages[0]"),
    (
        "chat",
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        "bad_role_order",
        "messages",
    ),
    (
        "chat",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
        "bad_role_order",
        "messages",
    ),
    (
        "chat",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "system", "content": "c"},
            ]
        },
        "bad_role_order",
        "messages",
    ),
    (
        "chat",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        "bad_role_order",
        "messages",
    ),
    (
        "chat",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
        "empty_assistant_turn",
        "messages",
    ),
    ("chat", {"messages": [{"role": "user", "content": "a"}]}, "no_assistant_turn", "messages"),
    ("chat", {"messages": [{"role": "user"}]}, "missing_field", "messages[0]"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "unknown_role", "conversations[0]"),
    ("text", {"text": ""}, "empty_field", "text"),
]


@pytest.mark.parametrize("fmt,row,kind,field", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_rows_name_the_problem_and_field(fmt, row, kind, field):
    with pytest.raises(RowError) as exc:
        to_example(row, fmt, "f.jsonl", 3, None)
    assert exc.value.kind == kind
    assert exc.value.field == field
    assert exc.value.message
