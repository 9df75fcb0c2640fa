"""Data: the detected format and columns of each file, the validation report (row numbers; Enter shows
the row), the template preview with the trained tokens highlighted, and token length stats."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from loratui.tui.state import RunState
from loratui.tui.views import StepView, cell, fill, table

_TRAINED = re.compile(r"⟦(.*?)⟧", re.S)
_FIRST_EXAMPLE = re.compile(r"^── example ", re.M)


def highlight_trained(preview: str) -> str:
    """The preview as markup, every character of it shown: in the examples, trained tokens (between ⟦ and
    ⟧, the markers kept as in preview.txt) in reverse video. The text before the first example (the header
    that explains the markers) is left as it is: its "⟦ and ⟧" are not trained tokens."""
    first = _FIRST_EXAMPLE.search(preview)
    start = first.start() if first else len(preview)
    out, at = [escape(preview[:start])], start
    for m in _TRAINED.finditer(preview, start):
        out.append(escape(preview[at : m.start()]))
        out.append(f"[dim]⟦[/dim][reverse]{escape(m.group(1))}[/reverse][dim]⟧[/dim]")
        at = m.end()
    out.append(escape(preview[at:]))
    return "".join(out)


def read_row(file: str, row: int) -> str:
    """Line ``row`` (1-based) of a text file, for "jump to the row" (other formats: say where to look)."""
    path = Path(file)
    if path.suffix.lower() not in (".jsonl", ".csv", ".tsv"):  # one row per line, numbered as the report numbers them
        return f"{file}: row {row} (open the file to see it)"
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if i == row:
                    return line.rstrip("\n")[:2000]
    except OSError as e:
        return f"{file}: {e.strerror}"
    return f"{file} has fewer than {row} lines"


_ABSENT = {"row": "-"}  # what a table shows for a key a report entry lacks (else "")


def _table_row(entry: dict[str, Any], file_key: str, *keys: str) -> tuple[Any, ...]:
    """A table row from a report entry: the name of its file, then the values of ``keys``."""
    return (Path(entry.get(file_key, "?")).name, *(entry.get(k, _ABSENT.get(k, "")) for k in keys))


class DataView(StepView):
    STEP, TITLE, SECTIONS = "data", "Data", ("run", "data")
    BLURB = "Load, validate and template the training data; split train/validation/test."
    KEYS = "r run  f pick the data file"

    def compose_results(self) -> ComposeResult:
        yield Static("No data report yet: press r to read and check the data.", id="data-summary")
        yield table("data-files", "file", "split", "rows", "format", "why", "unused columns")
        yield table("data-problems", "file", "row", "problem", "field", "what", "action")
        yield Static("", id="data-row", classes="data-row")
        yield table("data-lengths", "split", "rows", "min", "median", "p95", "max", "tokens")
        yield Static("", id="data-preview", classes="preview")

    def show_results(self, state: RunState) -> None:
        report = state.report("data/report.json")
        summary = self.query_one("#data-summary", Static)
        if not isinstance(report, dict):
            summary.update("No data report yet: press r to read and check the data.")
            for t in self.query(DataTable):
                fill(t, [])
            self.query_one("#data-preview", Static).update("")
            return
        rows, splits = report.get("rows", {}), report.get("splits", {})
        summary.update(
            f"[b]{cell(rows.get('read', 0))}[/b] rows read, [b]{cell(rows.get('kept', 0))}[/b] kept, "
            f"{cell(rows.get('dropped', 0))} dropped, {cell(rows.get('truncated', 0))} truncated; "
            f"train {cell(splits.get('train', 0))} / validation {cell(splits.get('validation', 0))} / "
            f"test {cell(splits.get('test', 0))}; task {cell(report.get('task'))}, "
            f"template {cell(report.get('template'))}, "
            f"max_length {cell(report.get('max_length'))} ({cell(report.get('max_length_source'))})"
            + (f"; column mapping {escape(str(state.cfg.data.columns))}" if state.cfg.data.columns else "")
        )
        fill(
            self.query_one("#data-files", DataTable),
            [
                (
                    *_table_row(f, "path", "split", "rows", "format", "reason"),
                    ", ".join(f.get("extra_columns") or []) or "-",
                )
                for f in report.get("files", [])
            ],
        )
        problems = report.get("dropped", []) + report.get("truncated", [])
        self._problems = problems
        fill(
            self.query_one("#data-problems", DataTable),
            [_table_row(p, "file", "row", "kind", "field", "message", "action") for p in problems],
        )
        tokens = report.get("tokens", {})
        fill(
            self.query_one("#data-lengths", DataTable),
            [
                (s, v.get("rows"), v.get("min"), v.get("median"), v.get("p95"), v.get("max"), v.get("total"))
                for s, v in tokens.items()
                if isinstance(v, dict) and "rows" in v
            ],
        )
        preview = state.run.data / "preview.txt"
        text = preview.read_text(encoding="utf-8", errors="replace") if preview.is_file() else ""
        self.query_one("#data-preview", Static).update(highlight_trained(text))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id != "data-problems":
            return
        problems = getattr(self, "_problems", [])
        if 0 <= event.cursor_row < len(problems):
            p = problems[event.cursor_row]
            row = p.get("row")
            raw = read_row(p["file"], int(row)) if isinstance(row, int) and p.get("file") else "(no row number)"
            self.query_one("#data-row", Static).update(
                f"[b]{escape(Path(p.get('file', '?')).name)}:{cell(row)}[/b]  {escape(raw)}"
            )
