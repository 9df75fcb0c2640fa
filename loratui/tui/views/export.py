"""Export: pick formats and quant types (the settings), then the verification table of every file."""

from __future__ import annotations

import textwrap
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from loratui.exporters.records import REPORT, ExportReport
from loratui.tui.state import RunState
from loratui.tui.views import StepView, fill, fmt, percent, size, table

# The columns after the first, as the run report (exports/report.md) gives them: binary sizes, the
# perplexity change with its sign, top-1 agreement as a percentage, key facts as a share of 1 (a mean).
HEADERS = ("file / type", "size", "Δ ppl", "top-1", "tok/s", "facts")


def _signed(value: Any) -> str:
    """A change with its sign: +0.022, -0.0003."""
    return fmt(value, 2) if not isinstance(value, (int, float)) or value <= 0 else "+" + fmt(value, 2)


class ExportView(StepView):
    STEP, TITLE, SECTIONS = "export", "Export", ("export",)
    BLURB = "Write GGUF for llama.cpp and ONNX, each verified in its runtime against the merged model."

    def compose_results(self) -> ComposeResult:
        yield Static("No exports yet.", id="export-summary")
        yield table("export-table", *HEADERS)

    def show_results(self, state: RunState) -> None:
        self._files: list[tuple[str, str, tuple[str, ...]]] = []  # (file, "format type", the other cells)
        for path in sorted(state.run.exports.glob(f"*/{REPORT}")):
            try:
                report = ExportReport.load(path)
            except (OSError, ValueError):  # not there any more, or torn
                continue
            for f in report.files:
                self._files.append(
                    (
                        (f.file or f.folder or "-") + (" (refused)" if f.refused else ""),
                        f"{path.parent.name} {f.type}",
                        (
                            size(f.bytes),
                            _signed(f.delta_perplexity),
                            percent(f.top1_agreement),
                            fmt(f.decode_tokens_per_s, 3),
                            fmt(f.key_facts, 3),
                        ),
                    )
                )
        self._fill()
        n_refused = sum(name.endswith(" (refused)") for name, _, _ in self._files)
        self.query_one("#export-summary", Static).update(
            f"{len(self._files) - n_refused} verified file(s) in {escape(str(state.run.exports))}"
            + (f"; {n_refused} refused (not written: exports/report.md says why)" if n_refused else "")
            if self._files
            else "No exports yet."
        )

    def _fill(self) -> None:
        """The rows, the first column wrapped to what the other columns leave of the results pane: every
        column shows without scrolling sideways (a file name takes more lines instead)."""
        files = getattr(self, "_files", [])
        others = (
            sum(max(len(HEADERS[i + 1]), *(len(c[i]) for _, _, c in files)) + 2 for i in range(len(HEADERS) - 1))
            if files
            else 0
        )
        pane = self.query_one(f"#{self.STEP}-results").scrollable_content_region.width
        width = max(10, pane - others - 2) if pane else 24  # 2: the padding of the column
        rows = []
        for file, kind, cells in files:
            name = "\n".join(textwrap.wrap(file, width, break_on_hyphens=False) or ["-"])
            label = "\n".join(textwrap.wrap(kind, width) or ["-"])
            rows.append((Text(name) + Text("\n") + Text(label, style="dim"), *cells))
        t = self.query_one("#export-table", DataTable)
        t.clear(columns=True)  # columns keep their widest width otherwise
        t.add_columns(*HEADERS)
        fill(t, rows)

    def on_resize(self, event: events.Resize) -> None:
        self.call_after_refresh(self._fill)
