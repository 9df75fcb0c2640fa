"""Export: pick formats and quant types (the settings), then the verification table of every file."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from loratui.tui.screens import StepView, fill, fmt, size, table
from loratui.tui.state import RunState


class ExportView(StepView):
    STEP, TITLE, SECTIONS = "export", "Export", ("export",)
    BLURB = "Write GGUF for llama.cpp and ONNX, each verified in its runtime against the merged model."

    def compose_results(self) -> ComposeResult:
        yield Static("No exports yet.", id="export-summary")
        yield table("export-table", "format", "type", "file", "size", "Δ ppl", "top-1", "tokens/s", "facts")

    def show_results(self, state: RunState) -> None:
        rows = []
        for report in sorted(state.run.exports.glob("*/report.json")):
            data = state.report(str(report.relative_to(state.run.path)))
            if not isinstance(data, dict):
                continue
            for f in data.get("files", []):
                rows.append((report.parent.name, f.get("type", "?"), f.get("file") or f.get("folder") or "-",
                             size(f.get("bytes")), fmt(f.get("delta_perplexity"), 3), fmt(f.get("top1_agreement"), 4),
                             fmt(f.get("decode_tokens_per_s"), 3), fmt(f.get("key_facts"), 3)))
        fill(self.query_one("#export-table", DataTable), rows)
        self.query_one("#export-summary", Static).update(
            f"{len(rows)} verified file(s) in {state.run.exports}" if rows else "No exports yet.")
