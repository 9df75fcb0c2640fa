"""The loratui Textual app: a step bar (data -> serve) over the run config, and the running job.

The App owns the job (a subprocess, :mod:`loratui.tui.jobs`), never a screen: switching steps never
stops it. ``r`` runs the shown step, ``c`` cancels (after a confirmation: SIGTERM, then SIGKILL after
a grace period), quitting while a job runs asks first and leaves no process behind. The job panel
renders the job's events on a timer: progress bar, status line, log. A failed job opens one error
dialog with its message and hint, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from typing import Any, Callable

from rich.markup import escape
from rich.syntax import Syntax
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, ContentSwitcher, Footer, Header, ProgressBar, RichLog, Static, Tab, Tabs

from loratui.tui.jobs import Job, step_command

from loratui.pipeline.config import RunConfig, dump_yaml
from loratui.pipeline.registry import STEP_ORDER

# What each step does and which config sections drive it.
STEP_INFO: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "data": ("Data", "Load, validate and template the training data; split train/validation/test.", ("data",)),
    "train": ("Train", "Train a LoRA, QLoRA or DoRA adapter on the training split.", ("model", "lora", "train")),
    "evaluate": ("Evaluate", "Score the tuned model against the base model on the test split.", ("eval",)),
    "merge": ("Merge", "Fold the adapter into the base weights (merged safetensors).", ("merge",)),
    "export": ("Export", "Write GGUF for llama.cpp and ONNX, each verified in its runtime.", ("export",)),
    "serve": ("Serve", "Run an OpenAI-compatible server on the best format for this hardware.", ("serve",)),
}


class StepPanel(VerticalScroll):
    """One step: what it does and the config that drives it."""

    def __init__(self, step: str, cfg: RunConfig) -> None:
        super().__init__(id=step, classes="step-panel")
        self.step = step
        self.cfg = cfg

    def compose(self) -> ComposeResult:
        title, blurb, sections = STEP_INFO[self.step]
        yield Static(f"[b]{title}[/b]  {blurb}", classes="step-title")
        data = self.cfg.model_dump(mode="json")
        text = dump_yaml({s: data[s] for s in sections})
        yield Static(Syntax(text, "yaml", theme="ansi_dark", background_color="default"), classes="step-config")


class Confirm(ModalScreen[bool]):
    """A yes/no question; Enter or y says yes, Escape or n says no."""

    BINDINGS = [Binding("y,enter", "answer(True)", "Yes", id="confirm-yes"),
                Binding("n,escape", "answer(False)", "No", id="confirm-no")]

    def __init__(self, question: str) -> None:
        super().__init__(classes="dialog")
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Static(self.question, classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ErrorDialog(ModalScreen[None]):
    """The one place errors are shown: the message and what to do, never a traceback."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close", id="error-close")]

    def __init__(self, title: str, message: str, hint: str | None = None) -> None:
        super().__init__(classes="dialog")
        self.title_text, self.message, self.hint = title, message, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box error-box"):
            yield Static(f"[b]{escape(self.title_text)}[/b]", classes="dialog-title")
            yield Static(escape(self.message), id="error-message", classes="dialog-text")
            if self.hint:
                yield Static(escape(self.hint), id="error-hint", classes="dialog-hint")
            yield Button("Close (Esc)", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()


class JobPanel(Vertical):
    """The running (or last) job: a status line, a progress bar and its log."""

    def compose(self) -> ComposeResult:
        yield Static("No job yet: press r to run the shown step.", id="job-status")
        yield ProgressBar(id="job-progress", show_eta=True)
        yield RichLog(id="job-log", max_lines=500, markup=False, wrap=True)


class LoratuiApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "loratui"
    BINDINGS = [
        *(Binding(str(i), f"show_step('{step}')", STEP_INFO[step][0], id=f"step-{step}")
          for i, step in enumerate(STEP_ORDER, start=1)),
        Binding("r", "run_step", "Run", id="run"),
        Binding("c", "cancel_job", "Cancel", id="cancel"),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, cfg: RunConfig, config_path: str | Path | None = None,
                 command: Callable[[str], list[str]] | None = None, grace_s: float = 10.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.config_path = str(config_path) if config_path else None
        self.sub_title = f"{cfg.name} ({self.config_path or 'default config'})"
        # the command line of a step (tests give fake scripts that speak the events protocol)
        self.command = command or (lambda step: step_command("eval" if step == "evaluate" else step, self.config_path))
        self.grace_s = grace_s
        self.job: Job | None = None
        self._shown = 0  # events of the job already rendered
        self._reported = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Tabs(*(Tab(f"{i} {STEP_INFO[s][0]}", id=f"tab-{s}") for i, s in enumerate(STEP_ORDER, 1)), id="stepbar")
        with ContentSwitcher(initial=STEP_ORDER[0], id="steps"):
            for step in STEP_ORDER:
                yield StepPanel(step, self.cfg)
        yield JobPanel(id="job")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(0.2, self.refresh_job)

    # ------------------------------------------------------------------------------------ jobs

    def action_run_step(self) -> None:
        if self.job is not None and self.job.running:
            self.notify(f"{self.job.step} is still running: cancel it first (c)", severity="warning")
            return
        step = self.current_step
        self.job = Job(self.command(step), grace_s=self.grace_s).start()
        self._shown, self._reported = 0, False
        self.query_one("#job-log", RichLog).clear()
        self.query_one("#job-status", Static).update(f"[b]{step}[/b] running (pid {self.job.pid})")

    def action_cancel_job(self) -> None:
        job = self.job
        if job is None or not job.running:
            self.notify("no job is running")
            return

        def answer(yes: bool | None) -> None:
            if yes and job.running:
                job.cancel()
                self.query_one("#job-status", Static).update(f"[b]{job.step}[/b] cancelling...")

        self.push_screen(Confirm(f"Cancel {job.step}? It saves what it can (a checkpoint) and stops."), answer)

    async def action_quit(self) -> None:
        job = self.job
        if job is None or not job.running:
            self.exit()
            return

        def answer(yes: bool | None) -> None:
            if yes:
                job.cancel()
                self.run_worker(self._quit_after(job), exclusive=True)

        self.push_screen(Confirm(f"{job.step} is running. Cancel it and quit?"), answer)

    async def _quit_after(self, job: Job) -> None:
        import asyncio

        while job.running:  # SIGTERM, then SIGKILL after the grace period: never an orphan
            await asyncio.sleep(0.05)
        self.exit()

    def refresh_job(self) -> None:
        """Render the job's new events (called on a timer: the job's threads never touch widgets)."""
        job = self.job
        if job is None:
            return
        log = self.query_one("#job-log", RichLog)
        events = job.events[self._shown:]
        self._shown += len(events)
        for e in events:
            if e.type == "log":
                log.write(f"{e.level}: {e.message}" if e.level != "info" else e.message)
            elif e.type == "metric":
                log.write(" ".join(f"{k}={v:.4g}" for k, v in e.values.items()) + (f" (step {e.at})" if e.at else ""))
            elif e.type in ("artifact", "checkpoint"):
                log.write(f"{e.type}: {e.path}")
        progress = job.progress()
        bar = self.query_one("#job-progress", ProgressBar)
        if progress is not None and progress.total:
            bar.update(total=progress.total, progress=progress.current)
        status = self.query_one("#job-status", Static)
        if job.running:
            if progress is not None:
                status.update(f"[b]{job.step}[/b] {progress.task}: {progress.current:g}/{progress.total or '?'} "
                              f"{progress.unit} {escape(progress.message or '')}")
            return
        if self._reported:
            return
        self._reported = True
        if job.state == "done":
            status.update(f"[b]{job.step}[/b] done")
        elif job.state == "cancelled":
            resume = getattr(job.final_event, "resume_from", None)
            status.update(f"[b]{job.step}[/b] cancelled" + (f"; resume from {escape(resume)}" if resume else ""))
        else:
            err = job.error
            status.update(f"[b]{job.step}[/b] failed")
            self.push_screen(ErrorDialog(f"{job.step} failed", err.message if err else "the job failed",
                                         getattr(err, "hint", None)))

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        if event.tab.id:
            self.query_one("#steps", ContentSwitcher).current = event.tab.id.removeprefix("tab-")

    def action_show_step(self, step: str) -> None:
        self.query_one("#stepbar", Tabs).active = f"tab-{step}"

    @property
    def current_step(self) -> str:
        return self.query_one("#steps", ContentSwitcher).current or STEP_ORDER[0]


def create_app(cfg: RunConfig | None = None, config_path: str | Path | None = None, **options: Any) -> LoratuiApp:
    """The one factory used by the CLI and the tests."""
    return LoratuiApp(cfg or RunConfig(), config_path=config_path, **options)
