"""Problem messages are whole sentences: never cut mid-word, never ending in the decoder's dangling "at"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratui.pipeline.data.loaders import load_file
from loratui.pipeline.data.problems import RowError, shorten
from loratui.pipeline.errors import LoratuiError


def _problem(tmp_path: Path, line: bytes) -> RowError:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"instruction": "q", "output": "a"}\n' + line + b"\n")
    ((number, record),) = [r for r in load_file(path).rows if isinstance(r[1], RowError)]
    assert number == 2
    return record


@pytest.mark.parametrize("raw, name, escape", [(b"\t", "tab", "\\t"), (b"\x01", "control character U+0001", "\\u0001")])
def test_invalid_control_character_message_is_complete(tmp_path: Path, raw: bytes, name: str, escape: str) -> None:
    p = _problem(tmp_path, b'{"instruction": "a' + raw + b'b", "output": "x"}')
    assert p.kind == "invalid_json"
    assert p.message == (
        f"invalid JSON at column 19: Invalid control character (a raw {name} inside a string; escape it as {escape})"
    )


@pytest.mark.parametrize(
    "line, says",
    [
        (b'{"instruction": "cut sho', "invalid JSON at column 25: Unterminated string (the line ends inside a string"),
        (b'{"instruction": "q", "output": "a', "invalid JSON at column 34: Unterminated string (the line ends inside"),
        (
            b'{"instruction": "q", "output": "a"}{"x": 1}',
            "Extra data (more text follows the first complete JSON value)",
        ),
    ],
)
def test_no_message_ends_with_a_dangling_word(tmp_path: Path, line: bytes, says: str) -> None:
    p = _problem(tmp_path, line)
    assert says in p.message
    assert not p.message.rstrip(")").endswith(" at"), p.message


def test_huge_integer_message_is_whole(tmp_path: Path) -> None:
    p = _problem(tmp_path, b'{"instruction": "q", "output": ' + b"1" * 5000 + b"}")
    assert p.message == "invalid JSON: a number is too long (5000 digits); Python reads integers of at most 4300 digits"


def test_json_document_error_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"instruction": "a\tb", "output": "x"}]')
    with pytest.raises(LoratuiError) as e:
        load_file(path)
    assert str(e.value).endswith(
        "invalid JSON at line 1, column 20: Invalid control character (a raw tab inside a string; escape it as \\t)"
    )


def test_shorten_cuts_at_a_word_boundary_with_an_ellipsis() -> None:
    text = "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; use more"
    short = shorten(text, 60)
    assert len(short) <= 60 and short.endswith("…")
    assert text.startswith(short[:-1]) and text[len(short) - 1] == " "  # the cut is at a space
    assert shorten("short\nenough", 60) == "short enough"
    assert shorten("x" * 100, 10) == "x" * 9 + "…"


def test_every_problem_message_from_the_loader_is_json_serializable(tmp_path: Path) -> None:
    p = _problem(tmp_path, b'{"instruction": "a\tb"}')
    json.dumps({"message": p.message})
