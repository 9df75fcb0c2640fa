"""The TUI's shared widgets: the job panel, the loss chart and the reward chart of a preference objective."""

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


class RewardChart(Vertical):
    """A preference objective's reward accuracy (left axis, 0..1) and reward margin (right axis), train and eval,
    against the optimizer step (the figures of train/preference.py; textual-plotext, imported when first shown)."""

    DEFAULT_CSS = "RewardChart { height: 14; } RewardChart > Static { height: 1; color: $text-muted; }"
    SERIES = (  # (key, label, marker, y axis)
        ("reward_accuracy", "accuracy", "braille", "left"),
        ("eval_reward_accuracy", "eval accuracy", "hd", "left"),
        ("reward_margin", "margin", "braille", "right"),
        ("eval_reward_margin", "eval margin", "hd", "right"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.points: dict[str, list[tuple[int, float]]] = {}

    def compose(self) -> ComposeResult:
        from textual_plotext import PlotextPlot

        yield Static("rewards: no preference training yet", id="reward-summary")
        yield PlotextPlot(id="reward-plot")

    def last(self, key: str) -> float | None:
        series = self.points.get(key)
        return series[-1][1] if series else None

    def set_points(self, points: dict[str, list[tuple[int, float]]]) -> None:
        """Redraw when the points changed (called at most a few times a second); missing keys have none."""
        points = {key: list(points.get(key) or []) for key, *_ in self.SERIES}
        if points == self.points:
            return
        self.points = points
        plot = self.query_one("#reward-plot")
        plt = plot.plt  # type: ignore[attr-defined]
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel("step")
        for key, label, marker, side in self.SERIES:
            if points[key]:
                xs, ys = [s for s, _ in points[key]], [v for _, v in points[key]]
                plt.plot(xs, ys, label=label, marker=marker, yside=side)
        if points["reward_accuracy"] or points["eval_reward_accuracy"]:
            plt.ylim(0, 1, yside="left")
        plot.refresh()
        self.query_one("#reward-summary", Static).update(self.summary())

    def summary(self) -> str:
        """``reward accuracy 0.94 (eval 0.91), margin 2.3``: the last values (the eval margin without a train one)."""
        accuracy, eval_accuracy = self.last("reward_accuracy"), self.last("eval_reward_accuracy")
        margin = self.last("reward_margin")
        parts = []
        if accuracy is not None or eval_accuracy is not None:
            text = f"reward accuracy {'-' if accuracy is None else f'{accuracy:.4g}'}"
            parts.append(text + (f" (eval {eval_accuracy:.4g})" if eval_accuracy is not None else ""))
        if margin is not None:
            parts.append(f"margin {margin:.4g}")
        elif self.last("eval_reward_margin") is not None:
            parts.append(f"eval margin {self.last('eval_reward_margin'):.4g}")
        return ", ".join(parts) if parts else "rewards: no preference training yet"
