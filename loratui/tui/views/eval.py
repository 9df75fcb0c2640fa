"""Evaluate: base vs tuned metrics per dataset, then generations side by side."""

from __future__ import annotations

import json

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Static

from loratui.tui.state import RunState
from loratui.tui.views import StepView, cell, fill, fmt, table


class EvalView(StepView):
    STEP, TITLE, SECTIONS = "eval", "Evaluate", ("eval",)
    BLURB = "Score the tuned model against the base model on the test split."

    def compose_results(self) -> ComposeResult:
        yield Static("No evaluation yet.", id="eval-summary")
        yield table("eval-metrics", "dataset", "metric", "base", "tuned", "delta")
        yield Vertical(id="eval-generations")

    def show_results(self, state: RunState) -> None:
        metrics = state.report("eval/metrics.json")
        rows = []
        if isinstance(metrics, dict):
            for ds in metrics.get("datasets", []):
                models = ds.get("models", {})
                base = models.get("base", {}).get("metrics", {})
                tuned = models.get("tuned", {}).get("metrics", {})
                for name in tuned or base:
                    b, t = base.get(name), tuned.get(name)
                    delta = ds.get("delta", {}).get(name)
                    rows.append((ds.get("name", "?"), name, fmt(b), fmt(t), fmt(delta) if delta is not None else "-"))
            decoding = metrics.get("decoding") or {}
            settings = (
                ", ".join(f"{escape(str(k))} {cell(v)}" for k, v in decoding.items())
                if isinstance(decoding, dict)
                else cell(decoding)
            )
            self.query_one("#eval-summary", Static).update(
                f"{escape(str(metrics.get('target', {}).get('path', '')))} on {escape(str(metrics.get('device', '?')))}"
                + (f"; decoding: {settings}" if settings else "")
            )
        else:
            self.query_one("#eval-summary", Static).update("No evaluation yet.")
        fill(self.query_one("#eval-metrics", DataTable), rows)
        box = self.query_one("#eval-generations", Vertical)
        box.remove_children()
        path = state.run.eval / "generations.jsonl"
        if not path.is_file():
            return
        shown = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if shown >= 5:
                break
            try:
                g = json.loads(line)
            except ValueError:
                continue
            shown += 1
            box.mount(
                Static(
                    f"[b]{escape(str(g.get('prompt', '')))}[/b]\n[dim]reference:[/dim] "
                    f"{escape(str(g.get('reference', '')))}",
                    classes="gen-prompt",
                )
            )
            box.mount(
                Horizontal(
                    Static(
                        "[dim]base[/dim]\n" + escape(str((g.get("base") or {}).get("reply", "-"))), classes="gen-reply"
                    ),
                    Static(
                        "[dim]tuned[/dim]\n" + escape(str((g.get("tuned") or {}).get("reply", "-"))),
                        classes="gen-reply",
                    ),
                    classes="gen-pair",
                )
            )
