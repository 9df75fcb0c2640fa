"""Reading data files: JSON, JSONL, CSV/TSV, Parquet, and folders of .txt/.md documents.

A file that is not what it claims (binary, empty, the wrong extension) is one clear
:class:`LoratuiError`. A bad row inside a good file is a :class:`RowError` kept with its row number,
so the data step can report it and carry on. Row numbers are what a person finds in an editor:
the line for JSONL and CSV, the position (1-based) for JSON arrays and Parquet.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.pipeline.data.problems import RowError, shorten
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.events import has_surrogates

DATA_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
DOC_EXTENSIONS = {".txt", ".md", ".markdown"}
BUNDLED_DIR = Path(__file__).resolve().parent.parent.parent / "data"

_MAGIC = [
    (b"PAR1", "Parquet"),
    (b"PK\x03\x04", "a ZIP archive (or .xlsx/.docx)"),
    (b"%PDF", "a PDF"),
    (b"\x89PNG", "a PNG image"),
    (b"\x1f\x8b", "gzip-compressed"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"SQLite format 3", "an SQLite database"),
    (b"GGUF", "a GGUF model"),
]

Row = tuple[int, Any]  # (row number, dict record or RowError)


@dataclass
class LoadedFile:
    path: Path
    kind: str  # jsonl | json | csv | tsv | parquet | document
    rows: list[Row] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.path)


def bundled_names() -> list[str]:
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir() and (p / "train.jsonl").is_file())


def is_bundled(source: str) -> bool:
    """A bundled dataset name, unless a file or folder of that name exists here (yours wins)."""
    return source in bundled_names() and not Path(source).expanduser().exists()


def bundled_split(name: str, split: str) -> Path | None:
    path = BUNDLED_DIR / name / f"{split}.jsonl"
    return path if path.is_file() else None


def expand_sources(source: str | list[str]) -> list[Path]:
    """Files named by ``data.source``: paths, globs, folders (recursively), in a stable order."""
    items = [source] if isinstance(source, str) else list(source)
    if not items:
        raise LoratuiError("data.source is empty", hint="Name a file, a glob, a folder or a bundled dataset.")
    files: list[Path] = []
    for item in items:
        if is_bundled(item):
            files.append(bundled_split(item, "train"))  # type: ignore[arg-type]
            continue
        p = Path(item).expanduser()
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise LoratuiError(f"data.source {item!r}: no files match this pattern")
            files.extend(matches)
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not f.name.startswith(".")
                and (f.suffix.lower() in DATA_EXTENSIONS or f.suffix.lower() in DOC_EXTENSIONS)
            )
            if not found:
                raise LoratuiError(
                    f"{p}: folder has no data files",
                    hint=f"Expected {', '.join(sorted(DATA_EXTENSIONS))} files, or .txt/.md documents.",
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            names = ", ".join(bundled_names())
            raise LoratuiError(
                f"data.source {item!r}: no such file, folder or bundled dataset", hint=f"Bundled datasets: {names}."
            )
    return files


def _sniff(path: Path, head: bytes) -> None:
    """One clear error for files that are empty or binary."""
    if not head.strip():
        raise LoratuiError(f"{path}: the file is empty")
    for magic, what in _MAGIC:
        if head.startswith(magic):
            ext = path.suffix.lower()
            if what == "Parquet" and ext == ".parquet":
                return
            hint = "Rename it to .parquet." if what == "Parquet" else None
            raise LoratuiError(f"{path}: this is {what}, not a {ext or 'text'} file", hint=hint)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) > 8 and head[1::2].count(0) > len(head) // 3):
        raise LoratuiError(f"{path}: UTF-16 text; loratui reads UTF-8", hint="Save the file as UTF-8.")
    if b"\0" in head and path.suffix.lower() != ".parquet":
        raise LoratuiError(f"{path}: binary content (NUL bytes), not a {path.suffix or 'text'} file")


def load_file(path: Path) -> LoadedFile:
    ext = path.suffix.lower()
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as e:
        raise LoratuiError(f"{path}: cannot read ({e.strerror})") from None
    _sniff(path, head)
    if ext in DOC_EXTENSIONS:
        return LoadedFile(path, "document", [(1, _read_document(path))])
    kind = DATA_EXTENSIONS.get(ext)
    if kind is None:
        raise LoratuiError(
            f"{path}: unsupported file type {ext or '(no extension)'}",
            hint=f"Supported: {', '.join(sorted(DATA_EXTENSIONS))}, and .txt/.md documents in a folder.",
        )
    if kind == "parquet" and not head.startswith(b"PAR1"):
        raise LoratuiError(f"{path}: not a Parquet file (no PAR1 header)")
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet}[
        kind
    ]
    return LoadedFile(path, kind, list(reader(path)))


def _read_document(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoratuiError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return {"text": text}


def _record(value: Any) -> Any:
    if isinstance(value, dict):
        return value
    return RowError("not_an_object", f"expected a JSON object with named fields, got {_type_name(value)}")


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "true/false",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, RowError("undecodable_bytes", f"byte {e.start} of the line is not UTF-8")
                continue
            if number == 1 and line.lstrip().startswith("["):
                # a JSON array (pretty-printed or on one line) saved as .jsonl
                try:
                    whole = json.loads(path.read_text(encoding="utf-8-sig"))
                except (ValueError, RecursionError, UnicodeDecodeError):
                    whole = None
                if isinstance(whole, list):
                    raise LoratuiError(
                        f"{path}: this is a JSON array, not JSON Lines",
                        hint="Rename it to .json, or write one object per line.",
                    )
            value = _parse_json_row(line)
            yield number, value if isinstance(value, RowError) else _record(value)


def _parse_json_row(line: str) -> Any:
    """One JSON value, or a RowError for invalid JSON, absurd nesting/numbers and lone surrogates."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return RowError("invalid_json", f"invalid JSON at column {e.colno}: {json_error_text(e)}")
    except (ValueError, RecursionError) as e:  # > 4300-digit integers, nesting deeper than Python's stack
        return RowError("invalid_json", f"invalid JSON: {json_value_error_text(e)}")
    if "\\u" in line and has_surrogates(json.dumps(value, ensure_ascii=False)):
        return RowError("undecodable_bytes", "the row has an escaped lone surrogate (\\udXXX), which is not valid text")
    return value


_CONTROL_NAMES = {"\t": ("tab", "\\t"), "\n": ("line break", "\\n"), "\r": ("carriage return", "\\r")}


def json_error_text(e: json.JSONDecodeError) -> str:
    """The decoder's complaint as a whole sentence, with what it usually means.

    CPython's messages end in " at" because ``str(e)`` appends the position ("Invalid control character
    at: line 1 column 9"); the caller gives the position itself, so the dangling " at" goes.
    """
    msg = re.sub(r"\s+at$", "", e.msg)
    if msg.startswith("Invalid control character"):
        char = e.doc[e.pos] if 0 <= e.pos < len(e.doc) else ""
        if char and char in "\r\n" and not e.doc[e.pos :].strip():  # a JSON Lines row that ends inside a string
            return (
                "Unterminated string (the line ends inside a string: the row is cut short, or a raw line "
                "break split it; escape line breaks as \\n)"
            )
        code = ord(char) if char else None
        name, escape = _CONTROL_NAMES.get(char) or (
            f"control character U+{code:04X}" if code is not None else "control character",
            f"\\u{code:04x}" if code is not None else "\\uXXXX",
        )
        return f"Invalid control character (a raw {name} inside a string; escape it as {escape})"
    if msg.startswith("Unterminated string"):
        return (
            "Unterminated string (the string that starts here is never closed: the row is cut short, "
            "or holds a raw line break)"
        )
    if msg == "Extra data":
        return "Extra data (more text follows the first complete JSON value)"
    if msg.startswith("Expecting property name"):
        return f"{msg} (names need double quotes, and no comma may come before '}}')"
    return msg


def json_value_error_text(e: Exception) -> str:
    """Why ``json.loads`` gave up on valid syntax (a huge integer, absurd nesting), in full."""
    if isinstance(e, RecursionError):
        return "nested too deeply (arrays or objects inside each other beyond Python's recursion limit)"
    text = str(e)
    if "integer string conversion" in text:
        digits = re.search(r"value has (\d+) digits", text)
        more = f" ({digits.group(1)} digits)" if digits else ""
        return f"a number is too long{more}; Python reads integers of at most 4300 digits"
    return shorten(f"{type(e).__name__}: {text}")


def _read_json(path: Path) -> Iterator[Row]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoratuiError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and e.msg == "Extra data" and all(ln.lstrip().startswith("{") for ln in lines[:2]):
            raise LoratuiError(
                f"{path}: this is JSON Lines (one object per line), not a JSON document", hint="Rename it to .jsonl."
            ) from None
        raise LoratuiError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {json_error_text(e)}") from None
    except (ValueError, RecursionError) as e:
        raise LoratuiError(f"{path}: invalid JSON: {json_value_error_text(e)}") from None
    if isinstance(value, dict):
        lists = [(k, v) for k, v in value.items() if isinstance(v, list)]
        if len(lists) == 1:
            value = lists[0][1]
        else:
            raise LoratuiError(
                f"{path}: expected a JSON array of rows (or an object holding one array), "
                f"got an object with keys {', '.join(list(value)[:8])}"
            )
    if not isinstance(value, list):
        raise LoratuiError(f"{path}: expected a JSON array of rows, got {_type_name(value)}")
    has_escapes = "\\u" in text
    for number, item in enumerate(value, start=1):
        if has_escapes and has_surrogates(json.dumps(item, ensure_ascii=False)):
            yield number, RowError("undecodable_bytes", "the row has an escaped lone surrogate (\\udXXX)")
        else:
            yield number, _record(item)


class _Lines:
    """A file's physical lines as an iterator that can be moved back (``pos``: the next line's index)."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.pos = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _csv_records(
    path: Path, lines: list[str], delimiter: str, columns: int, first: int = 1
) -> Iterator[tuple[int, Any]]:
    """(physical line the record starts on, values or RowError) per record; the rule is :func:`_read_csv`'s.

    ``lines[0]`` is physical line ``first``; ``columns`` is the header's column count.
    """
    source = _Lines(lines)
    reader = csv.reader(source, delimiter=delimiter, strict=True)
    while source.pos < len(lines):
        start = source.pos  # index of the record's first line
        line = first + start
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            end, why = first + source.pos - 1, str(e)  # the physical line where the parser stopped
            if "field larger than field limit" in why and end == line:
                raise LoratuiError(
                    f"{path}: not valid CSV: the record that starts on line {line} holds a field longer than "
                    f"{csv.field_size_limit()} characters by line {end}",
                    hint="Look for an unbalanced quote on that line; for very long texts use JSON Lines.",
                ) from None
            eof = "unexpected end of data" in why
            if end > line or eof:  # also a stray quote swallowing the rest of a long file past the field limit
                yield line, _unbalanced(line, end, delimiter, eof, more=start + 1 < len(lines))
                source.pos = start + 1  # the next line is read on its own: nothing merges into this record
                continue
            # a quote followed by text within one line ('"abc"def'): nothing can merge; read leniently
            yield line, next(csv.reader([lines[start]], delimiter=delimiter), [])
            continue
        end = first + source.pos - 1
        if end > line and len(values) != columns:
            yield (
                line,
                RowError(
                    "not_an_object",
                    f"unbalanced quote: a quoted field opens on this line and runs on to line {end}, which makes "
                    f"{len(values)} values where the header names {columns} columns"
                    + (
                        f"; this line is dropped and line {line + 1} is read on its own"
                        if start + 1 < len(lines)
                        else ""
                    ),
                ),
            )
            source.pos = start + 1
            continue
        yield line, values


def _unbalanced(line: int, end: int, delimiter: str, eof: bool, more: bool) -> RowError:
    sep = "a tab" if delimiter == "\t" else f"'{delimiter}'"
    if eof and end > line:
        what = f"is never closed: it runs to the end of the file (line {end})"
    elif eof:
        what = "is never closed (the file ends)"
    else:
        what = (
            f"is not closed before line {end}, where a quote is followed by text instead of {sep} or the "
            f"line end, so lines {line}-{end} would merge into one row"
        )
    then = f"; this line is dropped and line {line + 1} is read on its own" if more else ""
    return RowError("not_an_object", f"unbalanced quote: a quoted field opens on this line and {what}{then}")


def _read_csv(path: Path) -> Iterator[Row]:
    """Rows of a CSV/TSV file with a header line, numbered by the physical line they start on.

    A quoted field may hold line breaks (a multi-line cell). An unbalanced quote would make the parser
    read the following lines into that field, merging rows silently, so a record that spans lines is
    trusted only when it is well-formed:

    - its quoted field closes with a quote followed by the delimiter or the line end (a quote followed
      by other text means the "closing" quote really opens a field of a later line);
    - its quote closes before the end of the file;
    - it has as many values as the header names columns.

    A record that spans lines and breaks one of these is a ``not_an_object`` problem on the line where
    it starts. Only that line is given up: reading starts again at the next line, so each later line is
    judged on its own (and listed too when it is unusable). No row is ever made of text from two records.
    Within one line nothing can merge, so a stray quote there (``5" screen``, ``"abc"def``) is read
    leniently, as Python's csv module does. The header must be one line with its quotes closed.
    """
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    lines = io.StringIO(text, newline="").readlines()  # the physical lines, split as the csv module splits them
    if not lines:
        raise LoratuiError(f"{path}: the file is empty")
    try:
        header = next(csv.reader([lines[0]], delimiter=delimiter, strict=True), [])
    except csv.Error:
        raise LoratuiError(
            f"{path}: line 1 (the header) has an unbalanced quote",
            hint="Name each column on the first line, with every quote closed.",
        ) from None
    header = [h.strip() for h in header]
    if any(has_surrogates(h) for h in header):
        raise LoratuiError(f"{path}: line 1 (the header) has bytes that are not UTF-8", hint="Save the file as UTF-8.")
    if not any(header) or len(set(header)) != len(header):
        raise LoratuiError(f"{path}: the first line must name each column once (got {header[:8]})")
    for number, values in _csv_records(path, lines[1:], delimiter, len(header), first=2):
        if isinstance(values, RowError):
            yield number, values
            continue
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield number, RowError("not_an_object", f"{len(values)} values, but the header names {len(header)} columns")
            continue
        if any(has_surrogates(v) for v in values):
            yield number, RowError("undecodable_bytes", "the row has bytes that are not UTF-8")
            continue
        if any("\0" in v for v in values):
            yield number, RowError("undecodable_bytes", "the row has NUL bytes (binary content), not text")
            continue
        yield number, dict(zip(header, values))


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise LoratuiError(f"{path}: not a readable Parquet file ({e})") from None
    yield from enumerate(table.to_pylist(), start=1)
