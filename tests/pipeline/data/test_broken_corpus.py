"""A corpus of broken CSV, JSON and JSON Lines files, through the real CLI (``loratui data``).

Acceptance: each file gives either ONE clear error (exit 2, one ``error:`` line naming the file) or a
report (exit 0) that lists every unusable physical line, by its exact number (the 1-based position for
JSON arrays), and no trained row ever holds text from two records.

Every record of a file carries one marker: ``G<n>G`` for a good record, ``B<n>B`` for a broken one.
A trained example must hold exactly one marker, a good one: a row merged from two records would hold
two, a broken record trained anyway a ``B`` one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.pipeline.data.test_corrupt_inputs import _write

MARKER = re.compile(r"[GB]\d+[GB]")


def g(i: int) -> str:
    return f"G{i}G"


def csv_good(i: int, pad: str = "") -> bytes:
    return f"{g(i)} question{pad},,{g(i)} answer".encode()


def jl_good(i: int) -> dict[str, str]:
    return {"instruction": f"{g(i)} question", "output": f"{g(i)} answer"}


def lines(*items: bytes | str | dict | list | None, end: bytes = b"\n") -> bytes:
    """One physical line per item (bytes/str as they are, other values as JSON)."""
    out = []
    for item in items:
        out.append(
            item if isinstance(item, bytes) else item.encode() if isinstance(item, str) else json.dumps(item).encode()
        )
    return end.join(out) + end


HEADER = b"instruction,input,output"


@dataclass(frozen=True)
class Broken:
    id: str
    name: str
    content: bytes
    dropped: dict[int, str] = field(default_factory=dict)  # row (physical line) -> problem kind
    kept: int | None = None  # None: the file is one clear error (exit 2)
    says: tuple[str, ...] = ()  # in the error line, or each in a dropped row's message
    overrides: tuple[str, ...] = ()
    trained: tuple[str, ...] = ()  # texts that must reach a trained example verbatim


def ok(
    id: str, name: str, content: bytes, dropped: dict[int, str], kept: int, *says: str, trained: tuple[str, ...] = ()
) -> object:
    return pytest.param(Broken(id, name, content, dropped, kept, says, trained=trained), id=id)


def err(id: str, name: str, content: bytes, *says: str, overrides: tuple[str, ...] = ()) -> object:
    return pytest.param(Broken(id, name, content, says=says, overrides=overrides), id=id)


UNBALANCED = lines(
    HEADER, csv_good(0), csv_good(1), b'"B90B broken,"",oops', b'"G2G q","","G2G a"', csv_good(3), csv_good(4)
)
PADDED = [csv_good(i, pad=" " + "x" * 70) for i in range(60)]  # 60 lines of ~90 bytes: past _sniff's 4 KiB

CORPUS = [
    # ---- CSV
    ok("csv-unbalanced-quote-mid-file", "data.csv", UNBALANCED, {4: "not_an_object"}, 5, "lines 4-5"),
    ok(
        "tsv-unbalanced-quote-mid-file",
        "data.tsv",
        UNBALANCED.replace(b",", b"\t"),
        {4: "not_an_object"},
        5,
        "unbalanced quote",
    ),
    ok(
        "csv-unbalanced-quote-at-eof",
        "data.csv",
        lines(HEADER, *map(csv_good, range(5)), b'"B90B never closed,,x'),
        {7: "not_an_object"},
        5,
        "never closed",
    ),
    ok(
        "csv-unbalanced-quote-runs-to-eof",
        "data.csv",
        lines(HEADER, csv_good(0), b'"B90B broken,x,y', *map(csv_good, range(1, 5))),
        {3: "not_an_object"},
        5,
        "end of the file (line 7)",
    ),
    ok(
        "csv-two-unbalanced-quotes",
        "data.csv",
        lines(HEADER, csv_good(0), b'"B90B a,,b', csv_good(1), b'B91B c,,"d', csv_good(2), csv_good(3)),
        {3: "not_an_object", 5: "not_an_object"},
        4,
        "unbalanced quote",
    ),
    ok(
        "csv-quote-closed-by-a-stray-quote-later",
        "data.csv",
        lines(HEADER, b'"B90B broken,x,y', csv_good(0), b'B91B z",w', csv_good(1), csv_good(2)),
        {2: "not_an_object", 4: "not_an_object"},
        3,
        "runs on to line 4",
    ),
    ok(
        "csv-wrong-column-count",
        "data.csv",
        lines(HEADER, csv_good(0), b"B90B only one", csv_good(1), b"B91B a,b,c,d", csv_good(2), csv_good(3)),
        {3: "not_an_object", 5: "not_an_object"},
        4,
        "the header names 3 columns",
    ),
    ok("csv-utf8-bom", "data.csv", b"\xef\xbb\xbf" + lines(HEADER, *map(csv_good, range(5))), {}, 5),
    err("csv-nul-in-the-first-bytes", "data.csv", lines(HEADER, csv_good(0), b"B90B a\0b,,c", csv_good(1)), "NUL"),
    ok(
        "csv-nul-further-in",
        "data.csv",
        lines(HEADER, *PADDED, b"B90B a\0b,,c", csv_good(60)),
        {62: "undecodable_bytes"},
        61,
        "NUL",
    ),
    ok(
        "csv-mixed-delimiters",
        "data.csv",
        lines(HEADER, csv_good(0), b"B90B q;;B90B a", b"B91B q\t\tB91B a", csv_good(1), csv_good(2)),
        {3: "not_an_object", 4: "not_an_object"},
        3,
    ),
    err(
        "csv-semicolon-delimited",
        "data.csv",
        lines(b"instruction;input;output", b"G0G q;;G0G a"),
        "cannot tell the format",
    ),
    ok(
        "csv-stray-quote-in-unquoted-field",
        "data.csv",
        lines(HEADER, b'G0G a 5" screen,,G0G ok', b'G1G say "hi" there,,G1G ok', csv_good(2), csv_good(3)),
        {},
        4,
        trained=('G0G a 5" screen', 'G1G say "hi" there'),
    ),
    ok(
        "csv-crlf-mixed-with-a-multi-line-cell",
        "data.csv",
        HEADER
        + b"\r\n"
        + csv_good(0)
        + b"\r\n"
        + csv_good(1)
        + b'\n"G2G multi\r\nline, with, commas",,G2G a\n'
        + csv_good(3)
        + b'\r\n"B90B broken,,x\r\n'
        + csv_good(4)
        + b"\n",
        {7: "not_an_object"},
        5,
        "never closed",
        trained=("G2G multi\r\nline, with, commas",),
    ),
    ok(
        "csv-empty-lines",
        "data.csv",
        lines(HEADER, csv_good(0), b"", csv_good(1), b"   ", csv_good(2), b"B90B only", csv_good(3)),
        {7: "not_an_object"},
        4,
    ),
    err(
        "csv-header-missing-a-required-column",
        "data.csv",
        lines(b"instruction,input", b"G0G q,x", b"G1G q,y"),
        "cannot tell the format",
    ),
    err(
        "csv-duplicate-header",
        "data.csv",
        lines(b"instruction,input,instruction,output", b"a,b,c,d"),
        "each column once",
    ),
    err(
        "csv-header-with-an-unbalanced-quote",
        "data.csv",
        lines(b'"instruction,input,output', csv_good(0)),
        "line 1 (the header)",
        "unbalanced quote",
    ),
    err(
        "csv-unbalanced-quote-policy-fail",
        "data.csv",
        UNBALANCED,
        "row 4",
        "unbalanced quote",
        "not_an_object",
        overrides=("data.on_problem.not_an_object=fail",),
    ),
    # ---- JSON (rows are array positions)
    err(
        "json-truncated-array",
        "data.json",
        json.dumps([jl_good(i) for i in range(4)], indent=1).encode()[:-30],
        "invalid JSON at line",
    ),
    err(
        "json-trailing-comma",
        "data.json",
        b"[\n" + b",\n".join(json.dumps(jl_good(i)).encode() for i in range(3)) + b",\n]\n",
        "invalid JSON at line 5, column 1: Expecting value",
    ),
    err("json-top-level-object", "data.json", json.dumps(jl_good(0)).encode(), "expected a JSON array"),
    err(
        "json-control-character",
        "data.json",
        b'[{"instruction": "G0G a\tb", "output": "G0G c"}]',
        "Invalid control character (a raw tab inside a string; escape it as \\t)",
    ),
    ok(
        "json-row-not-an-object",
        "data.json",
        json.dumps([jl_good(0), "B90B text", ["B91B"], jl_good(1), jl_good(2), None]).encode(),
        {2: "not_an_object", 3: "not_an_object", 6: "not_an_object"},
        3,
    ),
    ok(
        "json-wrong-types",
        "data.json",
        json.dumps(
            [
                jl_good(0),
                {"instruction": 5, "output": "B90B"},
                {"instruction": "B91B", "output": ["x"]},
                {"instruction": True, "output": "B92B"},
                jl_good(1),
                jl_good(2),
            ]
        ).encode(),
        {2: "wrong_type", 3: "wrong_type", 4: "wrong_type"},
        3,
    ),
    ok(
        "json-nan",
        "data.json",
        b"["
        + json.dumps(jl_good(0)).encode()
        + b', {"instruction": "B90B", "output": NaN}, '
        + json.dumps(jl_good(1)).encode()
        + b", "
        + json.dumps(jl_good(2)).encode()
        + b"]",
        {2: "wrong_type"},
        3,
        "a number",
    ),
    # ---- JSON Lines
    ok(
        "jsonl-truncated-line",
        "data.jsonl",
        lines(jl_good(0), jl_good(1), '{"instruction": "B90B q", "outp', jl_good(2), jl_good(3)),
        {3: "invalid_json"},
        4,
        "invalid JSON at column",
    ),
    ok(
        "jsonl-two-objects-on-one-line",
        "data.jsonl",
        lines(
            jl_good(0),
            json.dumps({"instruction": "B90B", "output": "x"}) + json.dumps({"instruction": "B91B", "output": "y"}),
            jl_good(1),
            jl_good(2),
        ),
        {2: "invalid_json"},
        3,
        "Extra data",
    ),
    ok(
        "jsonl-control-characters",
        "data.jsonl",
        lines(
            jl_good(0),
            b'{"instruction": "B90B a\tb", "output": "x"}',
            b'{"instruction": "B91B \x01", "output": "x"}',
            jl_good(1),
            jl_good(2),
        ),
        {2: "invalid_json", 3: "invalid_json"},
        3,
        "escape it as",
    ),
    ok(
        "jsonl-blank-lines",
        "data.jsonl",
        lines(jl_good(0), "", "  ", "{B90B", jl_good(1), "\t", jl_good(2)),
        {4: "invalid_json"},
        3,
    ),
    ok(
        "jsonl-line-is-an-array",
        "data.jsonl",
        lines(["B90B", "x"], jl_good(0), jl_good(1), [{"instruction": "B91B", "output": "y"}], jl_good(2)),
        {1: "not_an_object", 4: "not_an_object"},
        3,
        "a list",
    ),
    ok("jsonl-utf8-bom", "data.jsonl", b"\xef\xbb\xbf" + lines(*map(jl_good, range(4))), {}, 4),
    ok(
        "jsonl-invalid-utf8",
        "data.jsonl",
        lines(jl_good(0), b'{"instruction": "B90B caf\xe9", "output": "x"}', jl_good(1), jl_good(2)),
        {2: "undecodable_bytes"},
        3,
        "UTF-8",
    ),
    ok(
        "jsonl-row-split-by-a-raw-line-break",
        "data.jsonl",
        lines(
            jl_good(0), '{"instruction": "B90B first half', 'B90B second half", "output": "x"}', jl_good(1), jl_good(2)
        ),
        {2: "invalid_json", 3: "invalid_json"},
        3,
        "Unterminated string",
    ),
    ok(
        "jsonl-nan",
        "data.jsonl",
        lines(jl_good(0), '{"instruction": "B90B", "output": NaN}', jl_good(1), jl_good(2)),
        {2: "wrong_type"},
        3,
        "a number",
    ),
]


def _trained_texts(data: Path) -> list[str]:
    from datasets import load_from_disk

    texts = []
    for split in sorted((data / "processed").iterdir()):
        for row in load_from_disk(str(split)):
            messages = json.loads(row["messages"]) if row["messages"] else []
            texts.append("\n".join([m["content"] for m in messages] + [row.get("text") or ""]))
    return texts


@pytest.mark.parametrize("c", CORPUS)
def test_broken_file(c: Broken, data_cli, tmp_path: Path) -> None:
    source = _write(tmp_path / "in", {c.name: c.content})[0]
    r = data_cli(str(source), *c.overrides)
    assert "Traceback" not in r.err
    if c.kept is None:  # one clear error naming the file
        assert r.code == 2, r.err
        assert len(r.error_lines) == 1, r.err
        line = r.error_lines[0]
        assert c.name in line, line
        for text in c.says:
            assert text in line, line
        return
    assert r.code == 0, r.err
    report = r.report
    assert report is not None
    dropped = report["dropped"]
    # every unusable line, by its exact number, once; nothing else
    assert sorted((p["row"], p["kind"]) for p in dropped) == sorted(c.dropped.items()), dropped
    assert all(p["file"] == str(source) and p["message"].strip() for p in dropped)
    for text in c.says:
        assert any(text in p["message"] for p in dropped), (text, dropped)
    assert not report["truncated"]
    rows = report["rows"]
    assert rows["kept"] == c.kept and rows["dropped"] == len(c.dropped), rows
    assert rows["read"] == rows["kept"] + rows["dropped"], rows
    # what is trained: one good record per example, never text from two records
    texts = _trained_texts(tmp_path / "runs" / "x" / "data")
    assert len(texts) == c.kept
    markers = [set(MARKER.findall(t)) for t in texts]
    assert all(len(m) == 1 and next(iter(m)).startswith("G") for m in markers), texts
    assert len(set.union(*markers)) == c.kept, texts
    for text in c.trained:
        assert any(text in t for t in texts), (text, texts)
