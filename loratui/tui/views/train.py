"""Train: the objective, the run's estimate (time, memory, disk, whether it fits; before ``r``), the live loss chart
(train and eval loss), for a preference objective the live reward chart (reward accuracy and margin), the last
run's summary and its checkpoints."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.timer import Timer
from textual.widgets import Static

from loratui.pipeline.config import RunConfig
from loratui.tui.estimate import EstimateArea
from loratui.tui.state import REWARD_KEYS, RunState
from loratui.tui.views import StepView, cell, fmt
from loratui.tui.widgets import LossChart, RewardChart

SETTLE_S = 0.6  # after an edit, the settings must rest this long before they are estimated again
Points = list[tuple[int, float]]


def objective_line(cfg: RunConfig) -> str:
    """What ``train.objective`` trains, in a line: ``objective dpo (beta 0.1): preference pairs against the base``."""
    t = cfg.train
    if t.objective == "sft":
        return "objective sft: supervised, the replies' likelihood"
    reference = "the base with the earlier adapters merged" if t.mode == "stack" else "the base"
    what = {
        "dpo": f"preference pairs against {reference}",
        "orpo": "preference pairs plus SFT in one stage, no reference model",
        "kto": f"replies marked good or bad against {reference}",
    }.get(t.objective, "")
    if t.objective == "dpo" and t.sft_weight:
        what += f", plus {fmt(t.sft_weight)} x the chosen replies' SFT loss"
    return f"objective {escape(t.objective)} (beta {fmt(t.beta)}): {what}"


class TrainView(StepView):
    STEP, TITLE, SECTIONS = "train", "Train", ("model", "lora", "train")
    BLURB = "Train a LoRA, QLoRA or DoRA adapter on the training split."
    KEYS = "r run  R resume from the last checkpoint  e measure the estimate"

    _shown = False
    _settle: Timer | None = None

    def compose_results(self) -> ComposeResult:
        yield EstimateArea(self.cfg, id="train-estimate")
        yield LossChart(id="loss-chart")
        yield RewardChart(id="reward-chart")
        yield Static("", id="train-summary")

    def on_mount(self) -> None:
        self._show_objective()

    def _show_objective(self) -> None:
        """The title line says what the objective trains; the reward chart shows for a preference one."""
        self.query_one(".step-title", Static).update(
            f"[b]{self.TITLE}[/b]  {self.BLURB}\n[dim]{objective_line(self.cfg)}[/dim]"
        )
        chart = self.query_one(RewardChart)
        chart.display = self.cfg.train.objective != "sft" or any(chart.points.values())

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
        self._show_objective()
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
        self.live(state.train_loss, state.eval_loss, state.rewards)
        last = state.last.get("train")
        lines = []
        if last is not None and last.summary:
            lines.append(self._last_run(state, last.summary))
        checkpoints = (
            sorted(state.run.checkpoints.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
            if state.run.checkpoints.is_dir()
            else []
        )
        if checkpoints:
            lines.append(f"{len(checkpoints)} checkpoint(s); latest {escape(checkpoints[-1].name)}: R resumes from it")
        self.query_one("#train-summary", Static).update("\n".join(lines))

    def _last_run(self, state: RunState, s: dict[str, Any]) -> str:
        """The last run's line: its objective and figures, the reward accuracy for a preference objective (from
        the version's record, else the last points drawn)."""
        record = state.version_record(s.get("version"))
        objective = record.objective if record is not None else None
        if objective is None and not any(state.rewards.values()):
            objective = "sft"  # a record from before preference tuning, or none: an sft run
        if record is not None and record.beta is not None and objective not in (None, "sft"):
            objective = f"{objective} (beta {fmt(record.beta)})"
        metrics = record.metrics if record is not None else {}

        def last(key: str) -> Any:
            points = state.rewards.get(key)
            return metrics.get(f"{key}_last", points[-1][1] if points else None)

        accuracy, eval_accuracy = last("reward_accuracy"), last("eval_reward_accuracy")
        rewards = f", reward accuracy {cell(accuracy)}" if accuracy is not None else ""
        if eval_accuracy is not None:
            rewards += f" (eval {cell(eval_accuracy)})" if rewards else f", eval reward accuracy {cell(eval_accuracy)}"
        return (
            f"last run: {escape(objective) + ', ' if objective else ''}{cell(s.get('steps', '?'))} steps, "
            f"train loss {cell(s.get('train_loss'))}, eval loss {cell(s.get('eval_loss'))}{rewards}, "
            f"{cell(s.get('tokens_per_s'))} tokens/s, {cell(s.get('seconds'))} s; "
            f"adapter version {cell(s.get('version', '?'))}"
        )

    def live(self, train: Points, evals: Points, rewards: dict[str, Points] | None = None) -> None:
        """Points of the running job (the App calls this on its timer); points without a step are skipped.
        ``rewards``: the reward figures' points by key (:data:`~loratui.tui.state.REWARD_KEYS`), None: unchanged."""
        for chart in self.query(LossChart):  # none yet right after the view mounts: the next tick draws
            chart.set_points([p for p in train if p[0] is not None], [p for p in evals if p[0] is not None])
        if rewards is None:
            return
        for reward in self.query(RewardChart):
            reward.set_points({key: [p for p in rewards.get(key, []) if p[0] is not None] for key in REWARD_KEYS})
            reward.display = self.cfg.train.objective != "sft" or any(reward.points.values())
