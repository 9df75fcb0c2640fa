"""Train: the run's estimate (time, memory, disk, whether it fits; before ``r``), the live loss chart (train and
eval loss), the last run's summary and its checkpoints."""

from __future__ import annotations

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.timer import Timer
from textual.widgets import Static

from loratui.tui.estimate import EstimateArea
from loratui.tui.state import RunState
from loratui.tui.views import StepView, cell
from loratui.tui.widgets import LossChart

SETTLE_S = 0.6  # after an edit, the settings must rest this long before they are estimated again


class TrainView(StepView):
    STEP, TITLE, SECTIONS = "train", "Train", ("model", "lora", "train")
    BLURB = "Train a LoRA, QLoRA or DoRA adapter on the training split."
    KEYS = "r run  R resume from the last checkpoint  e measure the estimate"

    _shown = False
    _settle: Timer | None = None

    def compose_results(self) -> ComposeResult:
        yield EstimateArea(self.cfg, id="train-estimate")
        yield LossChart(id="loss-chart")
        yield Static("", id="train-summary")

    @property
    def estimate(self) -> EstimateArea:
        return self.query_one(EstimateArea)

    def shown(self) -> None:
        """The view is shown: estimate its settings unless that is done (or under way)."""
        self._shown = True
        if not self.estimate.fresh():
            self.estimate.start()

    def left(self) -> None:
        """Another step is shown: an estimate in flight stops (a probe would go on training for nothing)."""
        self._shown = False
        self._stop_settling()
        self.estimate.stop(note="the estimate stopped when you left the view")

    def settings_changed(self) -> None:
        """The settings changed: the estimate of the old ones is stale; once they rest, estimate the new ones."""
        area = self.estimate
        if area.cfg == self.cfg:
            return
        area.cfg = self.cfg
        area.stop()
        area.message = Text("the settings changed: estimating them again...", style="dim")
        self._stop_settling()
        if self._shown:
            self._settle = self.set_timer(SETTLE_S, self._settled)
        area.refresh_area()

    def _settled(self) -> None:
        self._settle = None
        if self._shown and not self.estimate.fresh():
            self.estimate.start()

    def _stop_settling(self) -> None:
        if self._settle is not None:
            self._settle.stop()
            self._settle = None

    def measure(self) -> None:
        """``e``: the estimate again, with a probe of a few real training steps."""
        self._stop_settling()
        self.estimate.start(probe=True)

    def show_results(self, state: RunState) -> None:
        area = self.estimate
        compact = state.steps["train"] == "running"  # the live loss chart needs the room
        if compact != area.compact:
            area.compact = compact
            area.refresh_area()
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
