"""Merge: what was merged into what, and the parity check against base + adapter."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.widgets import Static

from loratui.tui.state import RunState
from loratui.tui.views import StepView, cell, percent, size


class MergeView(StepView):
    STEP, TITLE, SECTIONS = "merge", "Merge", ("merge",)
    BLURB = "Fold the adapter into the base weights (merged safetensors, parity-checked)."

    def compose_results(self) -> ComposeResult:
        yield Static("Nothing merged yet.", id="merge-summary")

    def show_results(self, state: RunState) -> None:
        record = state.report("merged/loratui-merge.json")
        out = self.query_one("#merge-summary", Static)
        if not isinstance(record, dict):
            out.update("Nothing merged yet.")
            return
        parity = record.get("parity") or {}
        total = sum(p.stat().st_size for p in state.run.merged.glob("*.safetensors"))
        verdict = ("[green]passed[/green]" if parity.get("passed") else "[red]failed[/red]") if parity else "not run"
        out.update(
            f"[b]{escape(str(state.run.merged))}[/b]  {size(total)} of safetensors, {escape(str(record.get('dtype')))}\n"
            f"base {escape(str(record.get('base')))} + adapter version {cell(record.get('version', '?'))}\n"
            f"parity {verdict}: max |logit diff| {cell(parity.get('max_abs_diff'))} "
            f"(tolerance {cell(parity.get('tolerance'))}), top-1 agreement {percent(parity.get('top1_agreement'))} "
            f"over {cell(parity.get('positions', '?'))} positions"
        )
