"""Train: the live loss chart (train and eval loss), the last run's summary and its checkpoints."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.widgets import Static

from loratui.tui.state import RunState
from loratui.tui.views import StepView, cell
from loratui.tui.widgets import LossChart


class TrainView(StepView):
    STEP, TITLE, SECTIONS = "train", "Train", ("model", "lora", "train")
    BLURB = "Train a LoRA, QLoRA or DoRA adapter on the training split."
    KEYS = "r run  R resume from the last checkpoint"

    def compose_results(self) -> ComposeResult:
        yield LossChart(id="loss-chart")
        yield Static("", id="train-summary")

    def show_results(self, state: RunState) -> None:
        self.query_one(LossChart).set_points(state.train_loss, state.eval_loss)
        last = state.last.get("train")
        lines = []
        if last is not None and last.summary:
            s = last.summary
            lines.append(
                f"last run: {cell(s.get('steps', '?'))} steps, train loss {cell(s.get('train_loss'))}, "
                f"eval loss {cell(s.get('eval_loss'))}, {cell(s.get('tokens_per_s'))} tokens/s, "
                f"{cell(s.get('seconds'))} s; adapter version {cell(s.get('version', '?'))}"
            )
        checkpoints = (
            sorted(state.run.checkpoints.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
            if state.run.checkpoints.is_dir()
            else []
        )
        if checkpoints:
            lines.append(f"{len(checkpoints)} checkpoint(s); latest {escape(checkpoints[-1].name)}: R resumes from it")
        self.query_one("#train-summary", Static).update("\n".join(lines))

    def live(self, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
        """Points of the running job (the App calls this on its timer); points without a step are skipped."""
        for chart in self.query(LossChart):  # none yet right after the view mounts: the next tick draws
            chart.set_points([p for p in train if p[0] is not None], [p for p in evals if p[0] is not None])
