"""Corrupt and malformed inputs to the data step, through the real CLI and by fuzzing the loaders.

The contract: bad input gives either a report (``runs/<name>/data/report.json`` lists every dropped or
truncated row with its file, row number, field where relevant, problem kind and a message) or ONE
clear error (exit code 2, a single ``error:`` line naming the file and what is wrong). Never a Python
traceback or an internal error (exit 1), and never a row dropped without being listed.

Row-level cases put one bad row among good ones, so training data survives and the step exits 0;
file-level cases must stop with exit 2. The ``data_cli`` fixture that runs ``loratui data`` is in
``conftest.py``.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.formats import Example
from loratui.pipeline.data.loaders import load_file
from loratui.pipeline.data.problems import PROBLEMS, RowError
from loratui.pipeline.data.read import BuildFindings, read_examples
from loratui.pipeline.errors import LoratuiError

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # far more than 32 tokens
MAX_LENGTH = 32  # the tiny BPE tokenizer renders the shortest alpaca row in 22 tokens, so 16 fits none


# --------------------------------------------------------------------------------------------
# Building files
# --------------------------------------------------------------------------------------------

Line = Any  # dict/list/number/None -> json.dumps; str -> the text; bytes -> as is


def _line(item: Line) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    return json.dumps(item).encode("utf-8")


def jsonl(*lines: Line) -> bytes:
    return b"".join(_line(item) + b"\n" for item in lines)


def alpaca(i: int) -> dict[str, str]:
    return {"instruction": f"q{i}", "output": f"a{i}"}


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def good_chat(i: int) -> dict[str, Any]:
    return chat(("user", f"q{i}"), ("assistant", f"a{i}"))


def sharegpt(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"conversations": [{"from": r, "value": c} for r, c in turns]}


def among(good: Callable[[int], Any], *bad: Line, at: int = 4, n_good: int = 6) -> bytes:
    """JSON Lines: ``n_good`` good rows with the ``bad`` lines starting at line ``at``."""
    rows = [good(i) for i in range(n_good)]
    return jsonl(*rows[: at - 1], *bad, *rows[at - 1 :])


def csv_among(*bad: bytes, at: int = 5, n_good: int = 6) -> bytes:
    """CSV (header on line 1): good alpaca rows with the raw ``bad`` lines starting at line ``at``."""
    rows = [f"q{i},a{i}".encode() for i in range(n_good)]
    k = at - 2
    return b"\n".join([b"instruction,output", *rows[:k], *bad, *rows[k:]]) + b"\n"


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Row-level problems: listed in the report, the step goes on
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    kind: str | tuple[str, ...]  # a tuple: any of these kinds is acceptable
    row: int
    field: str | None = None  # None: not checked
    file: str | None = None  # None: the data.source file
    where: str = "dropped"  # or "truncated"
    message: str | None = None  # a substring the message must contain


@dataclass(frozen=True)
class RowCase:
    id: str
    files: dict[str, bytes | Callable[[], bytes]]  # the first file is data.source
    read: int  # rows read in all files
    expect: tuple[Expect, ...]  # exactly the dropped/truncated entries
    overrides: tuple[str, ...] = ()  # "{dir}" is the folder holding the files


def case(
    id: str,
    content: bytes | Callable[[], bytes],
    read: int,
    *expect: Expect,
    name: str = "data.jsonl",
    overrides: tuple[str, ...] = (),
    extra: dict[str, bytes] | None = None,
    marks: Any = (),
) -> Any:
    files = {name: content, **(extra or {})}
    return pytest.param(RowCase(id, files, read, expect, overrides), id=id, marks=marks)


ROW_CASES = [
    # JSON Lines: the line itself is broken
    case(
        "invalid-json-line",
        among(alpaca, '{"instruction": "q", "output": '),
        7,
        Expect("invalid_json", 4, message="invalid JSON"),
    ),
    case("python-dict-line", among(alpaca, "{'instruction': 'q', 'output': 'a'}"), 7, Expect("invalid_json", 4)),
    case(
        "non-utf8-bytes-in-jsonl-line",
        among(alpaca, b'{"instruction": "caf\xe9", "output": "a"}'),
        7,
        Expect("undecodable_bytes", 4, message="UTF-8"),
    ),
    case("jsonl-line-is-a-list", among(alpaca, [1, 2, 3]), 7, Expect("not_an_object", 4, message="a list")),
    case("jsonl-line-is-a-number", among(alpaca, 42), 7, Expect("not_an_object", 4, message="a number")),
    case("jsonl-line-is-null", among(alpaca, None), 7, Expect("not_an_object", 4)),
    case(
        "blank-lines-keep-line-numbers",
        jsonl(*[alpaca(i) for i in range(3)], "", "   ", "{oops", alpaca(3), alpaca(4)),
        6,
        Expect("invalid_json", 6),
    ),
    # alpaca fields
    case("missing-field", among(alpaca, {"instruction": "q"}), 7, Expect("missing_field", 4, "output")),
    case("null-field", among(alpaca, {"instruction": "q", "output": None}), 7, Expect("missing_field", 4, "output")),
    case(
        "empty-field",
        among(alpaca, {"instruction": "  \n ", "output": "a"}),
        7,
        Expect("empty_field", 4, "instruction"),
    ),
    case(
        "number-instead-of-text",
        among(alpaca, {"instruction": "q", "output": 42}),
        7,
        Expect("wrong_type", 4, "output", message="a number"),
    ),
    case(
        "list-instead-of-text",
        among(alpaca, {"instruction": ["q"], "output": "a"}),
        7,
        Expect("wrong_type", 4, "instruction"),
    ),
    # chat (OpenAI messages) and ShareGPT turns
    case(
        "unknown-chat-role",
        among(good_chat, chat(("user", "q"), ("bot", "a"))),
        7,
        Expect("unknown_role", 4, "messages[1]", message="bot"),
    ),
    case(
        "assistant-first",
        among(good_chat, chat(("assistant", "a"), ("user", "q"), ("assistant", "b"))),
        7,
        Expect("bad_role_order", 4, "messages"),
    ),
    case(
        "two-user-turns-in-a-row",
        among(good_chat, chat(("user", "q"), ("user", "q2"), ("assistant", "a"))),
        7,
        Expect("bad_role_order", 4, "messages"),
    ),
    case(
        "system-not-first",
        among(good_chat, chat(("user", "q"), ("system", "s"), ("assistant", "a"))),
        7,
        Expect("bad_role_order", 4, "messages", message="system"),
    ),
    case(
        "ends-with-user-turn",
        among(good_chat, chat(("user", "q"), ("assistant", "a"), ("user", "q2"))),
        7,
        Expect("bad_role_order", 4, "messages", message="ends with"),
    ),
    case(
        "empty-assistant-turn",
        among(good_chat, chat(("user", "q"), ("assistant", " "))),
        7,
        Expect("empty_assistant_turn", 4, "messages"),
    ),
    case(
        "no-assistant-turn",
        among(good_chat, chat(("system", "s"), ("user", "q"))),
        7,
        Expect("no_assistant_turn", 4, "messages"),
    ),
    case("messages-not-a-list", among(good_chat, {"messages": "hello"}), 7, Expect("wrong_type", 4, "messages")),
    case(
        "message-without-content",
        among(good_chat, {"messages": [{"role": "user"}]}),
        7,
        Expect("missing_field", 4, "messages[0]"),
    ),
    case(
        "sharegpt-unknown-from",
        among(lambda i: sharegpt(("human", f"q{i}"), ("gpt", f"a{i}")), sharegpt(("human", "q"), ("robot", "a"))),
        7,
        Expect("unknown_role", 4, "conversations[1]"),
    ),
    # duplicates
    case(
        "exact-duplicate-row",
        jsonl(*[alpaca(i) for i in range(6)], alpaca(1)),
        7,
        Expect("duplicate", 7, message="row 2"),
    ),
    case(
        "test-row-duplicates-a-training-row",
        jsonl(*[alpaca(i) for i in range(6)]),
        9,
        Expect("duplicate_across_splits", 2, file="test.jsonl"),
        extra={"test.jsonl": jsonl(alpaca(100), alpaca(2), alpaca(101))},
        overrides=("data.test_source={dir}/test.jsonl",),
    ),
    # CSV
    case("csv-row-too-few-columns", csv_among(b"just one value"), 7, Expect("not_an_object", 5), name="data.csv"),
    case(
        "csv-row-too-many-columns",
        csv_among(b"q,a,extra"),
        7,
        Expect("not_an_object", 5, message="3 values"),
        name="data.csv",
    ),
    case("csv-non-utf8-bytes", csv_among(b"caf\xe9,a"), 7, Expect("undecodable_bytes", 5), name="data.csv"),
    # JSON arrays and Parquet: the row is the 1-based position
    case(
        "json-array-item-not-an-object",
        json.dumps([alpaca(0), alpaca(1), "text", *map(alpaca, range(2, 6))]).encode(),
        7,
        Expect("not_an_object", 3, message="a string"),
        name="data.json",
    ),
    case(
        "parquet-null-field",
        lambda: parquet_bytes(
            [*map(alpaca, range(3)), {"instruction": "q", "output": None}, *map(alpaca, range(3, 6))]
        ),
        7,
        Expect("missing_field", 4, "output"),
        name="data.parquet",
    ),
    # longer than max_length, per policy
    case(
        "too-long-truncate",
        among(alpaca, {"instruction": "q", "output": LONG_TEXT}),
        7,
        Expect("too_long", 4, where="truncated", message="truncated to"),
        overrides=(f"data.max_length={MAX_LENGTH}",),
    ),
    case(
        "too-long-drop",
        among(alpaca, {"instruction": "q", "output": LONG_TEXT}),
        7,
        Expect("too_long", 4),
        overrides=(f"data.max_length={MAX_LENGTH}", "data.on_problem.too_long=drop"),
    ),
    case(
        "too-long-truncate-cuts-the-answer",
        among(alpaca, {"instruction": LONG_TEXT, "output": "a"}),
        7,
        Expect("too_long", 4, where="truncated"),
        Expect("no_trained_tokens", 4),
        overrides=(f"data.max_length={MAX_LENGTH}",),
    ),
    # known bugs: these end in an internal error (exit 1) instead of a listed row
    case(
        "jsonl-lone-surrogate-escape",
        among(alpaca, r'{"instruction": "\ud800", "output": "a"}'),
        7,
        Expect(("undecodable_bytes", "wrong_type", "invalid_json"), 4),
    ),
    case(
        "jsonl-too-deeply-nested",
        among(alpaca, '{"instruction": "q", "output": ' + "[" * 100_000 + "}"),
        7,
        Expect(("invalid_json", "wrong_type"), 4),
    ),
    case(
        "jsonl-huge-integer",
        among(alpaca, '{"instruction": "q", "output": ' + "1" * 5000 + "}"),
        7,
        Expect(("invalid_json", "wrong_type"), 4),
    ),
]


def _kinds(kind: str | tuple[str, ...]) -> tuple[str, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _write(folder: Path, files: dict[str, bytes | Callable[[], bytes]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.items():
        path = folder / name
        path.write_bytes(content() if callable(content) else content)
        paths.append(path)
    return paths


@pytest.mark.parametrize("c", ROW_CASES)
def test_bad_row_is_listed_and_the_step_goes_on(c: RowCase, data_cli, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    source = _write(folder, c.files)[0]
    r = data_cli(str(source), *(o.format(dir=folder) for o in c.overrides))
    assert "Traceback" not in r.err
    assert r.code == 0, r.err
    assert not r.error_lines, r.err
    report = r.report
    assert report is not None

    for e in c.expect:
        file = str(folder / (e.file or source.name))
        hits = [p for p in report[e.where] if p["kind"] in _kinds(e.kind) and p["file"] == file and p["row"] == e.row]
        assert hits, f"no {e.kind} entry for {file} row {e.row} in {e.where}: {report[e.where]}"
        entry = hits[0]
        assert entry["message"].strip()
        if e.field is not None:
            assert entry.get("field") == e.field, entry
        if e.message is not None:
            assert e.message in entry["message"], entry
    # exactly the expected entries: no good row was dropped, no bad row slipped through
    for where in ("dropped", "truncated"):
        want = [e for e in c.expect if e.where == where]
        assert len(report[where]) == len(want), f"{where}: {report[where]}"
    rows = report["rows"]
    assert rows["read"] == c.read
    assert rows["dropped"] == len(report["dropped"]) and rows["truncated"] == len(report["truncated"])
    assert rows["kept"] == sum(report["splits"].values())
    assert rows["kept"] + rows["dropped"] == rows["read"], rows
    assert sum(report["problems"].values()) == rows["dropped"] + rows["truncated"]
    # the human report lists the same rows
    md = (tmp_path / "runs" / "x" / "data" / "report.md").read_text(encoding="utf-8")
    for p in report["dropped"] + report["truncated"]:
        assert f"{p['file']}, row {p['row']}" in md


# --------------------------------------------------------------------------------------------
# File-level problems: one clear error, exit 2
# --------------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


@dataclass(frozen=True)
class FileCase:
    id: str
    make: Callable[[Path], str]  # writes its input under the folder, returns data.source
    names: str  # the file (or folder, or pattern) the error line must name
    says: tuple[str, ...]  # what the error line must say (case-insensitive)
    overrides: tuple[str, ...] = ()
    hint: str | None = None  # must appear on stderr (the hint line)


def _file(name: str, content: bytes | Callable[[], bytes]) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        return str(_write(folder, {name: content})[0])

    return make


def _folder_without_data(folder: Path) -> str:
    d = folder / "docs"
    _write(d, {"notes.xml": b"<a/>", "picture.png": PNG, ".hidden.jsonl": jsonl(alpaca(0))})
    return str(d)


def _glob_nothing(folder: Path) -> str:
    _write(folder, {"train.csv": csv_among()})
    return str(folder / "train-*.jsonl")


def fcase(
    id: str,
    make: Callable[[Path], str],
    names: str,
    *says: str,
    overrides: tuple[str, ...] = (),
    hint: str | None = None,
    marks: Any = (),
) -> Any:
    return pytest.param(FileCase(id, make, names, says, overrides, hint), id=id, marks=marks)


PRETTY_ARRAY = json.dumps([alpaca(i) for i in range(6)], indent=2).encode()
ALL_EMPTY_OUTPUT = jsonl(*[{"instruction": f"q{i}", "output": ""} for i in range(6)])

FILE_CASES = [
    fcase("empty-jsonl", _file("empty.jsonl", b""), "empty.jsonl", "empty"),
    fcase("whitespace-only-jsonl", _file("blank.jsonl", b"\n  \n\t\n"), "blank.jsonl", "empty"),
    fcase("empty-csv", _file("empty.csv", b""), "empty.csv", "empty"),
    fcase("png-saved-as-jsonl", _file("image.jsonl", PNG + b"\x00" * 64), "image.jsonl", "PNG"),
    fcase(
        "parquet-named-csv",
        _file("table.csv", lambda: parquet_bytes([alpaca(i) for i in range(6)])),
        "table.csv",
        "Parquet",
        hint=".parquet",
    ),
    fcase("zip-named-csv", _file("sheet.csv", b"PK\x03\x04" + b"\x14\x00" * 40), "sheet.csv", "ZIP"),
    fcase("json-array-saved-as-jsonl", _file("array.jsonl", PRETTY_ARRAY), "array.jsonl", "JSON array", hint=".json"),
    fcase(
        "one-line-json-array-saved-as-jsonl",
        _file("line.jsonl", json.dumps([alpaca(i) for i in range(6)]).encode() + b"\n"),
        "line.jsonl",
        "JSON array",
    ),
    fcase(
        "jsonl-saved-as-json",
        _file("lines.json", jsonl(*[alpaca(i) for i in range(6)])),
        "lines.json",
        "JSON Lines",
        hint=".jsonl",
    ),
    fcase(
        "invalid-json-document",
        _file("broken.json", b'[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q2" "output": "a2"}\n]\n'),
        "broken.json",
        "line 3",
        "column",
    ),
    fcase("json-document-is-a-number", _file("number.json", b"42\n"), "number.json", "JSON array"),
    fcase("json-object-without-a-row-list", _file("object.json", b'{"a": 1, "b": "x"}'), "object.json", "JSON array"),
    fcase(
        "non-utf8-json-document",
        _file("latin1.json", b'[{"instruction": "caf\xe9", "output": "a"}]'),
        "latin1.json",
        "UTF-8",
    ),
    fcase(
        "utf16-jsonl",
        _file("wide.jsonl", b"\xff\xfe" + jsonl(*[alpaca(i) for i in range(6)]).decode().encode("utf-16-le")),
        "wide.jsonl",
        "UTF-16",
    ),
    fcase("unsupported-extension", _file("data.xml", b"<rows><row/></rows>"), "data.xml", "unsupported", ".xml"),
    fcase("folder-without-data-files", _folder_without_data, "docs", "no data files"),
    fcase("glob-matching-nothing", _glob_nothing, "train-*.jsonl", "no files match"),
    fcase("nonexistent-path", lambda folder: str(folder / "missing.jsonl"), "missing.jsonl", "no such file"),
    fcase(
        "nonexistent-test-source",
        _file("data.jsonl", jsonl(*map(alpaca, range(6)))),
        "nope.jsonl",
        "no such file",
        overrides=("data.test_source={dir}/nope.jsonl",),
    ),
    fcase(
        "columns-match-no-format",
        _file("cols.jsonl", jsonl(*[{"prompt_text": "q", "reply": f"a{i}"} for i in range(6)])),
        "cols.jsonl",
        "cannot tell the format",
        "prompt_text",
        "reply",
        hint="data.columns",
    ),
    fcase(
        "csv-header-names-a-column-twice",
        _file("twice.csv", b"instruction,output,output\nq,a,b\n"),
        "twice.csv",
        "each column once",
    ),
    fcase(
        "parquet-extension-but-not-parquet",
        _file("fake.parquet", b"instruction,output\nq,a\n"),
        "fake.parquet",
        "not a Parquet file",
    ),
    fcase(
        "damaged-parquet",
        _file("damaged.parquet", b"PAR1" + b"\x07" * 200 + b"PAR1"),
        "damaged.parquet",
        "not a readable Parquet",
    ),
    fcase(
        "every-line-invalid-json",
        _file("junk.jsonl", b"{nope\n[1,\n'x'\n"),
        "junk.jsonl",
        "no training examples are left",
        "invalid_json 3",
    ),
    fcase(
        "invalid-json-policy-fail",
        _file("strict.jsonl", among(alpaca, '{"instruction": ')),
        "strict.jsonl",
        "row 4",
        "invalid JSON",
        "invalid_json",
        overrides=("data.on_problem.invalid_json=fail",),
        hint="data.on_problem.invalid_json",
    ),
    fcase(
        "missing-field-policy-fail",
        _file("strict.jsonl", among(alpaca, {"instruction": "q"})),
        "strict.jsonl",
        "row 4",
        "'output'",
        "missing_field",
        overrides=("data.on_problem.missing_field=fail",),
    ),
    fcase(
        "too-long-policy-fail",
        _file("long.jsonl", among(alpaca, {"instruction": "q", "output": LONG_TEXT})),
        "long.jsonl",
        "row 4",
        f"max_length {MAX_LENGTH}",
        overrides=(f"data.max_length={MAX_LENGTH}", "data.on_problem.too_long=fail"),
    ),
]


@pytest.mark.parametrize("c", FILE_CASES)
def test_bad_file_is_one_clear_error(c: FileCase, data_cli, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    source = c.make(folder)
    r = data_cli(source, *(o.format(dir=folder) for o in c.overrides))
    assert "Traceback" not in r.err
    assert r.code == 2, r.err
    assert len(r.error_lines) == 1, r.err
    line = r.error_lines[0]
    assert c.names in line, line
    for text in c.says:
        assert text.lower() in line.lower(), line
    if c.hint:
        assert c.hint in r.err


def test_all_rows_invalid_says_no_training_examples_are_left(data_cli, tmp_path: Path) -> None:
    source = _write(tmp_path / "in", {"allbad.jsonl": ALL_EMPTY_OUTPUT})[0]
    r = data_cli(str(source))
    assert "Traceback" not in r.err
    assert r.code == 2, r.err
    assert len(r.error_lines) == 1, r.err
    assert "no training examples are left" in r.error_lines[0]


def test_all_rows_invalid_the_dropped_rows_can_be_found(data_cli, tmp_path: Path) -> None:
    source = _write(tmp_path / "in", {"allbad.jsonl": ALL_EMPTY_OUTPUT})[0]
    r = data_cli(str(source))
    assert r.code == 2, r.err
    if "report.json" in r.err:
        report = tmp_path / "runs" / "x" / "data" / "report.json"
        assert report.is_file(), f"stderr points at {report}, which does not exist"
        rows = {p["row"] for p in json.loads(report.read_text(encoding="utf-8"))["dropped"]}
        assert rows == set(range(1, 7))
    else:  # or the error itself names the rows
        assert "allbad.jsonl" in r.err and "row 1" in r.err


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"instruction,output,n\xf6te", id="extra-column"),
        pytest.param(b"instruction,outp\xfct", id="format-column"),
    ],
)
def test_csv_header_with_non_utf8_bytes(header: bytes, data_cli, tmp_path: Path) -> None:
    ncols = header.count(b",") + 1
    rows = [b",".join([b"q%d" % i, b"a%d" % i, b"x"][:ncols]) for i in range(6)]
    source = _write(tmp_path / "in", {"header.csv": b"\n".join([header, *rows]) + b"\n"})[0]
    r = data_cli(str(source))
    assert "Traceback" not in r.err
    assert r.code in (0, 2), r.err
    if r.code == 2:
        assert len(r.error_lines) == 1 and "header.csv" in r.error_lines[0], r.err
    else:
        assert r.report["rows"]["kept"] + r.report["rows"]["dropped"] == r.report["rows"]["read"] == 6


# --------------------------------------------------------------------------------------------
# Fuzzing the loaders: only LoratuiError may escape, and every row is an example or a problem
# --------------------------------------------------------------------------------------------

FIELDS = [
    "instruction",
    "input",
    "output",
    "system",
    "question",
    "answer",
    "prompt",
    "completion",
    "response",
    "messages",
    "conversations",
    "text",
    "role",
    "content",
    "from",
    "value",
    "chosen",
    "rejected",
    "label",
    "preferred_output",
    "non_preferred_output",
]
FORMATS = ["auto"] * 6 + [
    "alpaca",
    "qa",
    "chat",
    "sharegpt",
    "text",
    "preference",
    "openai_preference",
    "unpaired_preference",
]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "user", "assistant", "system", "human", "gpt", "x"])
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# mostly text, sometimes empty or blank, now and then any JSON value: rows that often pass validation
_cell = st.text(min_size=1, max_size=10) | st.text(min_size=1, max_size=10) | st.sampled_from(["", " \n"]) | json_values


def _turn(role: str, content: str) -> Any:
    roles = st.sampled_from(["system", "user", "assistant", "user", "assistant", "bot", " User ", "human", "gpt"])
    ok = st.fixed_dictionaries({role: roles, content: _cell})
    return ok | ok | ok | st.dictionaries(st.sampled_from([role, content, "x"]), json_values, max_size=3) | json_values


PLAUSIBLE = [  # one strategy per format: rows that often pass validation, and often do not
    st.fixed_dictionaries({"instruction": _cell, "output": _cell}, optional={"input": _cell, "system": _cell}),
    st.fixed_dictionaries(
        {"messages": st.lists(_turn("role", "content"), max_size=5) | _cell}, optional={"system": _cell}
    ),
    st.fixed_dictionaries({"conversations": st.lists(_turn("from", "value"), max_size=5)}),
    st.fixed_dictionaries({"question": _cell, "answer": _cell}),
    st.fixed_dictionaries({"prompt": _cell}, optional={"completion": _cell, "response": _cell}),
    st.fixed_dictionaries({"text": _cell}, optional={"meta": json_values}),
    st.fixed_dictionaries(
        {
            "chosen": _cell | st.lists(_turn("role", "content"), max_size=4),
            "rejected": _cell | st.lists(_turn("role", "content"), max_size=4),
        },
        optional={"prompt": _cell | st.lists(_turn("role", "content"), max_size=3)},
    ),
    st.fixed_dictionaries(
        {
            "input": st.fixed_dictionaries({"messages": st.lists(_turn("role", "content"), max_size=3)}) | json_values,
            "preferred_output": st.lists(_turn("role", "content"), max_size=2) | _cell,
            "non_preferred_output": st.lists(_turn("role", "content"), max_size=2) | _cell,
        }
    ),
    st.fixed_dictionaries(
        {
            "prompt": _cell,
            "completion": _cell,
            "label": st.booleans() | st.sampled_from(["true", "False", "yes"]) | json_values,
        }
    ),
]
any_row = st.one_of(*PLAUSIBLE) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6), json_values | st.text(max_size=16), max_size=5
)


@st.composite
def row_values(draw: Any) -> Any:
    """Rows for one file: mostly of one format, some of others, some not rows at all."""
    main = draw(st.sampled_from(PLAUSIBLE))
    rows = []
    for _ in range(draw(st.integers(0, 10))):
        pick = draw(st.integers(0, 9))  # (one_of would flatten and weigh every branch the same)
        rows.append(draw(main if pick < 7 else any_row if pick < 9 else json_values))
    return rows


@st.composite
def jsonl_files(draw: Any) -> bytes:
    """JSON Lines built from JSON values, with lines cut short, blank, plain text or raw bytes among them."""
    ascii_only = draw(st.booleans())
    lines = [json.dumps(v, ensure_ascii=ascii_only).encode("utf-8") for v in draw(row_values())]
    for _ in range(draw(st.integers(0, 3))):
        damage = draw(st.sampled_from(["cut", "text", "bytes", "blank"]))
        at = draw(st.integers(0, len(lines)))
        if damage == "cut" and lines:
            i = min(at, len(lines) - 1)
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif damage == "text":
            lines.insert(at, draw(st.text(max_size=30)).encode("utf-8"))
        elif damage == "bytes":
            lines.insert(at, draw(st.binary(max_size=20)))
        else:
            lines.insert(at, draw(st.sampled_from([b"", b"  ", b"\r"])))
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


raw_bytes_lines = st.lists(st.binary(max_size=40), max_size=10).map(b"\n".join)


def check_loader(content: bytes, ext: str, fmt: str = "auto") -> None:
    """``load_file`` then ``read_examples`` on ``content``: LoratuiError or a full account of the rows."""
    cfg = RunConfig()
    cfg.data.format = fmt
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{ext}"
        path.write_bytes(content)
        try:
            loaded = load_file(path)
        except LoratuiError:
            return
        for number, record in loaded.rows:
            assert isinstance(number, int) and number >= 1
            assert isinstance(record, (dict, RowError))
        out = BuildFindings()
        try:
            examples = read_examples(cfg, [path], out, "train")
        except LoratuiError:
            return
        assert all(isinstance(ex, Example) for ex in examples)
        assert out.rows_read == len(loaded.rows)
        assert out.rows_read == len(examples) + len(out.problems), (examples, out.problems)
        accounted = sorted([ex.row for ex in examples] + [p.row for p in out.problems])
        assert accounted == sorted(number for number, _ in loaded.rows)
        for p in out.problems:
            assert p.kind in PROBLEMS and p.file == str(path) and p.message and p.action == "dropped"
        for ex in examples:
            assert (ex.messages is None) != (ex.text is None)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(content=st.binary(max_size=600) | raw_bytes_lines, ext=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_fuzz_arbitrary_bytes(content: bytes, ext: str) -> None:
    check_loader(content, ext)


@FUZZ
@given(content=jsonl_files(), fmt=st.sampled_from(FORMATS))
def test_fuzz_jsonl_from_json_values(content: bytes, fmt: str) -> None:
    check_loader(content, ".jsonl", fmt)


@FUZZ
@given(rows=row_values(), cut=st.none() | st.integers(0, 200), fmt=st.sampled_from(FORMATS))
def test_fuzz_json_documents(rows: list[Any], cut: int | None, fmt: str) -> None:
    text = json.dumps(rows if len(rows) != 1 else {"data": rows}, indent=1)
    check_loader(text[:cut].encode("utf-8") if cut is not None else text.encode("utf-8"), ".json", fmt)


CSV_HEADERS = [
    ["instruction", "output"],
    ["instruction", "input", "output"],
    ["question", "answer"],
    ["prompt", "completion"],
    ["messages"],
    ["text"],
    ["text", "source"],
    ["conversations"],
    ["prompt", "chosen", "rejected"],
    ["chosen", "rejected"],
    ["prompt", "completion", "label"],
]


@FUZZ
@given(
    header=st.sampled_from(CSV_HEADERS)
    | st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), min_size=1, max_size=4),
    data=st.data(),
    fmt=st.sampled_from(FORMATS),
)
def test_fuzz_csv(header: list[str], data: Any, fmt: str) -> None:
    cell = (
        st.text(max_size=10)
        | st.text(min_size=1, max_size=10)
        | st.text(min_size=1, max_size=10)
        | json_values.map(json.dumps)
        | st.lists(_turn("role", "content"), max_size=4).map(json.dumps)
        | st.lists(_turn("from", "value"), max_size=4).map(json.dumps)
    )
    width = st.just(len(header)) | st.just(len(header)) | st.integers(1, len(header) + 2)
    rows = data.draw(st.lists(width.flatmap(lambda n: st.lists(cell, min_size=n, max_size=n)), max_size=8))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    check_loader(buf.getvalue().encode("utf-8"), ".csv", fmt)
