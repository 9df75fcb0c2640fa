"""The TUI's shared widgets: the job panel and the loss chart."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, RichLog, Static


class JobPanel(Vertical):
    """The running (or last) job: a status line, a progress bar with ETA and its log."""

    def compose(self) -> ComposeResult:
        yield Static("No job yet: press r to run the shown step.", id="job-status")
        yield ProgressBar(id="job-progress", show_eta=True)
        yield RichLog(id="job-log", max_lines=500, markup=False, wrap=True)


class LossChart(Vertical):
    """Train and eval loss against the optimizer step (textual-plotext, imported when first shown)."""

    DEFAULT_CSS = "LossChart { height: 14; } LossChart > Static { height: 1; color: $text-muted; }"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []

    def compose(self) -> ComposeResult:
        from textual_plotext import PlotextPlot

        yield Static("loss: no training yet", id="loss-summary")
        yield PlotextPlot(id="loss-plot")

    def set_points(self, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
        """Redraw when the points changed (called at most a few times a second)."""
        if train == self.train and evals == self.eval:
            return
        self.train, self.eval = list(train), list(evals)
        plot = self.query_one("#loss-plot")
        plt = plot.plt  # type: ignore[attr-defined]
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel("step")
        if train:
            plt.plot([s for s, _ in train], [v for _, v in train], label="train", marker="braille")
        if evals:
            plt.plot([s for s, _ in evals], [v for _, v in evals], label="eval", marker="hd")
        plot.refresh()
        parts = []
        if train:
            parts.append(f"train {train[-1][1]:.4g} (min {min(v for _, v in train):.4g})")
        if evals:
            parts.append(f"eval {evals[-1][1]:.4g} (best {min(v for _, v in evals):.4g})")
        self.query_one("#loss-summary", Static).update("loss: " + ("  ".join(parts) if parts else "no training yet"))
