"""CSV quotes: an unbalanced quote never merges rows; a real multi-line cell still works.

The rule (``loaders._read_csv``): a record that spans physical lines must close its quoted field with a
quote followed by the delimiter or the line end, before the end of the file, and have the header's
number of values. Otherwise its first line is a ``not_an_object`` problem and reading starts again at
the next line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loratui.pipeline.config import RunConfig
from loratui.pipeline.data.loaders import load_file
from loratui.pipeline.data.problems import RowError
from loratui.pipeline.data.read import BuildFindings, read_examples
from loratui.pipeline.errors import LoratuiError

HEADER = b"instruction,input,output\n"
# the report of the bug: line 3 opens a quote it never closes, and line 4 is a good row
BROKEN = HEADER + b'"ok1","","fine1"\n"broken,"",oops\n"ok2","","fine2"\n'


def _rows(tmp_path: Path, content: bytes, name: str = "data.csv") -> list[tuple[int, object]]:
    path = tmp_path / name
    path.write_bytes(content)
    return load_file(path).rows


def _good(rows: list[tuple[int, object]]) -> dict[int, dict]:
    return {n: r for n, r in rows if isinstance(r, dict)}


def _bad(rows: list[tuple[int, object]]) -> dict[int, RowError]:
    return {n: r for n, r in rows if isinstance(r, RowError)}


def test_unbalanced_quote_does_not_swallow_the_next_line(tmp_path: Path) -> None:
    rows = _rows(tmp_path, BROKEN)
    bad = _bad(rows)
    assert list(bad) == [3], rows
    assert bad[3].kind == "not_an_object"
    assert "unbalanced quote" in bad[3].message and "lines 3-4" in bad[3].message
    good = _good(rows)
    assert good == {
        2: {"instruction": "ok1", "input": "", "output": "fine1"},
        4: {"instruction": "ok2", "input": "", "output": "fine2"},
    }
    assert not any("broken" in v for r in good.values() for v in r.values())


def test_unbalanced_quote_in_tsv(tmp_path: Path) -> None:
    rows = _rows(tmp_path, BROKEN.replace(b",", b"\t"), "data.tsv")
    assert list(_bad(rows)) == [3]
    assert "a tab" in _bad(rows)[3].message
    assert sorted(_good(rows)) == [2, 4]


def test_unterminated_quote_at_the_end_of_the_file(tmp_path: Path) -> None:
    rows = _rows(tmp_path, HEADER + b'ok1,,fine1\n"never closed,,x\n')
    assert sorted(_good(rows)) == [2]
    assert list(_bad(rows)) == [3]
    assert "never closed" in _bad(rows)[3].message


def test_unterminated_quote_that_runs_over_later_lines(tmp_path: Path) -> None:
    """No quote after it: the parser would read every later line into the field, up to the end."""
    rows = _rows(tmp_path, HEADER + b'ok1,,fine1\n"broken,x,y\nok2,,fine2\nok3,,fine3\n')
    assert list(_bad(rows)) == [3]
    assert "line 5" in _bad(rows)[3].message and "end of the file" in _bad(rows)[3].message
    assert {n: r["instruction"] for n, r in _good(rows).items()} == {2: "ok1", 4: "ok2", 5: "ok3"}


def test_quote_closing_on_a_later_line_with_the_wrong_count(tmp_path: Path) -> None:
    """The runaway field closes cleanly on line 5 (a stray quote there), with 2 values instead of 3."""
    rows = _rows(tmp_path, HEADER + b'"broken,x,y\nok2,,fine2\nz",w\nok3,,fine3\n')
    assert sorted(_bad(rows)) == [2, 4]
    assert "runs on to line 4" in _bad(rows)[2].message
    assert {n: r["instruction"] for n, r in _good(rows).items()} == {3: "ok2", 5: "ok3"}


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_multi_line_cells_still_work(tmp_path: Path, newline: bytes) -> None:
    content = (
        HEADER + b'"Write a list:\nfirst, second, third\nthanks",,"apples, pears, plums"\n'
        b'q2,,"a ""quoted"" word\non two lines"\n'
        b'q3,,"""a"",""b"",""c""\n""d"",""e"",""f"""\n'
        b"q4,,a4\n"
    ).replace(b"\n", newline)
    rows = _rows(tmp_path, content)
    assert not _bad(rows), _bad(rows)
    nl = newline.decode()
    assert _good(rows) == {
        2: {
            "instruction": f"Write a list:{nl}first, second, third{nl}thanks",
            "input": "",
            "output": "apples, pears, plums",
        },
        5: {"instruction": "q2", "input": "", "output": f'a "quoted" word{nl}on two lines'},
        7: {"instruction": "q3", "input": "", "output": f'"a","b","c"{nl}"d","e","f"'},
        9: {"instruction": "q4", "input": "", "output": "a4"},
    }


def test_a_stray_quote_within_one_line_is_read_as_before(tmp_path: Path) -> None:
    rows = _rows(tmp_path, HEADER + b'a 5" screen,,ok\n"abc"def,,ok2\n')
    assert not _bad(rows)
    assert [r["instruction"] for r in _good(rows).values()] == ['a 5" screen', "abcdef"]


def test_header_with_an_unbalanced_quote_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b'"instruction,input,output\nq,,a\n')
    with pytest.raises(LoratuiError, match="line 1 \\(the header\\) has an unbalanced quote"):
        load_file(path)


def test_the_merged_row_is_never_trained(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(BROKEN)
    out = BuildFindings()
    examples = read_examples(RunConfig(), [path], out, "train")
    assert [(p.row, p.kind) for p in out.problems] == [(3, "not_an_object")]
    assert [ex.row for ex in examples] == [2, 4]
    assert not any("broken" in m["content"] for ex in examples for m in ex.messages)


def test_fail_policy_stops_on_the_unbalanced_quote(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(BROKEN)
    cfg = RunConfig()
    cfg.data.on_problem = {"not_an_object": "fail"}
    with pytest.raises(LoratuiError, match="row 3: unbalanced quote"):
        read_examples(cfg, [path], BuildFindings(), "train")


def test_a_stray_quote_before_a_long_file_loses_one_line_not_the_file(tmp_path: Path) -> None:
    """The open quote would read more than the csv module's field limit (128 KiB) into one field: that is
    still one unbalanced line, not a broken file."""
    body = b"".join(b'"q%d","","a%d"\n' % (i, i) for i in range(20000))
    rows = _rows(tmp_path, HEADER + b'"stray,,x\n' + body)
    bad = _bad(rows)
    assert list(bad) == [2] and "unbalanced quote" in bad[2].message
    good = _good(rows)
    assert len(good) == 20000 and good[3] == {"instruction": "q0", "input": "", "output": "a0"}
