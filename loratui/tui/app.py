"""The loratui Textual app: a step bar (data -> serve) over one run, its settings, results and jobs.

* **Views**: one per step (:mod:`loratui.tui.views`), each with its state line, its results (read
  from the run directory) and its settings form (generated from the config schema). The step bar marks
  each step done, failed, running or blocked (greyed: it needs an earlier artifact).
* **Settings** are edits on top of the config file, exactly the dotted overrides of the CLI
  (``train.lr=1e-4``): validated as typed, shown as the equivalent command (``!``), saved with ``ctrl+s``.
* **Estimate** (:mod:`loratui.tui.estimate`): the Train view shows the run's estimate (time, memory, disk,
  whether it fits, what would) before ``r``, computed in a thread when the view is shown and after the
  settings change; ``e`` measures it with a probe of a few real steps, which ``c`` or leaving the view stops.
* **Jobs** (:mod:`loratui.tui.job_actions`): the App owns them (a step's subprocess, :mod:`loratui.tui.jobs`,
  and the server), never a view, so switching steps never stops one. ``r`` runs the shown step, ``R`` resumes training from its
  last checkpoint, ``c`` cancels after a confirmation (SIGTERM, then SIGKILL after a grace period),
  quitting while a job runs asks first and leaves no process behind. Events render on a timer. A
  failed job opens the one error dialog with its message and hint, never a traceback.
* Reopening a run (``loratui open``, ``o``) shows each step's last state from ``events.jsonl``,
  including a job still running in another process (followed live) or one that died.
* **Keys**: the single-character keys (``1``-``6``, ``r``, ``o``, ``q`` ...) act only while something has
  the focus (the step bar, a table, a log): with nothing focused, typing is stray typing and does nothing
  (they show dimmed in the footer; Esc focuses the step bar). Showing a step focuses the step bar when
  the focus would otherwise be lost or left in a hidden view. Fields never select their text on focus.
* **Saving**: ``ctrl+s`` writes the config file named in the title bar: the file the TUI was started
  with, or, for ``loratui open runs/<name>``, that run's own ``config.yaml`` (said so in the title and
  the notification); without a file, ``loratui.yaml``. "Save settings as..." (command palette) writes
  another file and edits that one from then on.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from rich.markup import escape
from textual import events, on
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer, Header, Tab, Tabs

from loratui.pipeline.config import BACKEND_FORMAT, ConfigError, RunConfig, load_config
from loratui.pipeline.registry import STEP_ORDER
from loratui.pipeline.runs import write_config
from loratui.tui.dialogs import Confirm, ErrorDialog, FilePicker, OpenDialog, SaveAsDialog, TextDialog
from loratui.tui.forms import ConfigForm, FieldEdited, same_value, value_of
from loratui.tui.job_actions import JobActions
from loratui.tui.jobs import Job, step_command
from loratui.tui.state import RunState, open_run, recent_runs, remember
from loratui.tui.steps import STEP_INFO, VIEWS
from loratui.tui.views import StepView
from loratui.tui.views.train import TrainView
from loratui.tui.widgets import JobPanel

_MARK = {"done": "✓", "failed": "✗", "running": "●", "cancelled": "◌", "interrupted": "!", "blocked": "·", "todo": ""}

HELP = """[b]Keys[/b]
  1-6        show a step              r      run the shown step (serve: start the server)
  R          resume training          c      cancel the job (serve: stop the server; train: the probe)
  e          train: measure the estimate with a probe of a few real training steps
  ctrl+s     save the settings        !      show the equivalent command line
  o          open a run               F1     help for the focused setting
  f          pick the training data from a file tree
  ctrl+p     command palette          Esc    leave a field (keys work again)
  q          quit (asks while a job runs)

The one-character keys act while the step bar (or a table, a log) has the focus; in a field they are
text, and with nothing focused they do nothing (Esc focuses the step bar, Tab the next field).

Settings are overrides on top of the config file, like `loratui train --config FILE train.lr=1e-4`;
they are checked as you type. ctrl+s writes them to the config file named in the title bar: the one
you started with or, for a run opened from its folder, the run's own config.yaml (without a file:
loratui.yaml). "Save settings as..." in the command palette writes another file. Jobs run as
`loratui <step> --events jsonl` subprocesses: switching steps never stops them, and a cancelled
training run keeps a checkpoint."""
# The actions of the one-character keys: they act only while something on the main screen has the focus.
TYPED_KEY_ACTIONS = frozenset(
    {"show_step", "run_step", "resume", "measure", "cancel_job", "show_command", "open_run", "pick_data", "quit_key"}
)


def display_command(argv: list[str]) -> str:
    """A job's command line as a user would type it (``loratui ...`` instead of ``python -m loratui``)."""
    if argv[1:3] == ["-m", "loratui"]:
        argv = ["loratui", *argv[3:]]
    if argv[-2:] == ["--events", "jsonl"]:  # what the TUI reads; a person wants the progress bars
        argv = argv[:-2]
    return shlex.join(argv)


class LoratuiApp(JobActions):
    CSS_PATH = "app.tcss"
    TITLE = "loratui"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (96, "-wide")]
    BINDINGS = [
        *(
            Binding(str(i), f"show_step('{step}')", STEP_INFO[step][0], id=f"step-{step}", show=False)
            for i, step in enumerate(STEP_ORDER, start=1)
        ),
        Binding("r", "run_step", "Run", id="run"),
        Binding("R", "resume", "Resume", id="resume", show=False),
        Binding("e", "measure", "Measure estimate", id="measure", show=False),
        Binding("c", "cancel_job", "Cancel", id="cancel"),
        Binding(
            "ctrl+s", "save", "Save", id="save", tooltip="Write the settings to the config file named in the title bar"
        ),
        Binding("exclamation_mark", "show_command", "Command", id="show-command", key_display="!"),
        Binding("o", "open_run", "Open", id="open"),
        Binding("f", "pick_data", "Pick data", id="pick-data", show=False),
        Binding("f1", "help", "Help", id="help"),
        Binding("escape", "leave_field", "Leave field", id="leave-field", show=False),
        Binding("q", "quit_key", "Quit", id="quit"),  # its own action: ctrl+q ("quit") works with nothing focused
    ]

    def __init__(
        self,
        cfg: RunConfig,
        config_path: str | Path | None = None,
        overrides: list[str] | None = None,
        command: Callable[[str], list[str]] | None = None,
        grace_s: float = 10.0,
    ) -> None:
        super().__init__()
        self.cfg = self.base_cfg = cfg  # base: the file plus command-line overrides, before any form edit
        self.config_path = str(config_path) if config_path else None
        self.base_overrides = list(overrides or [])  # from the command line
        self.edits: dict[str, str] = {}  # from the forms: dotted key -> override value
        self.problems: dict[str, str] = {}
        # the command line of a step (tests give fake scripts that speak the events protocol)
        self.command = command
        self.grace_s = grace_s
        self.job: Job | None = None
        self.server: Job | None = None
        self.server_url: str | None = None
        self._health: dict[str, Any] | None = None
        self._shown = 0  # events of the job already rendered
        self._reported = True
        self._hinted = -1e9  # when "nothing has the focus" was last said
        self.state = RunState.load(cfg)
        self._set_subtitle()

    # ---------------------------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        yield Header()
        yield Tabs(*(Tab(self._tab_label(i, s), id=f"tab-{s}") for i, s in enumerate(STEP_ORDER, 1)), id="stepbar")
        with ContentSwitcher(initial=STEP_ORDER[0], id="steps"):
            yield VIEWS[0](self.cfg)  # the others are built when first shown: a fast first frame
        yield JobPanel(id="job", classes="-idle")
        yield Footer()

    def on_mount(self) -> None:
        self.show_state()
        self.set_interval(0.2, self.refresh_job)
        self.set_interval(1.0, self.poll_run)
        self.set_interval(0.5, self.poll_server)

    def _set_subtitle(self) -> None:
        """The title bar names the file ctrl+s writes."""
        dirty = " (unsaved edits)" if self.edits else ""
        if self.config_path is None:
            where = f"default config (ctrl+s writes {self.save_path})"
        elif self.editing_run_config:
            where = f"{self.config_path} (the run's own config)"
        else:
            where = self.config_path
        self.sub_title = f"{self.cfg.name}: {where}{dirty}"

    @property
    def save_path(self) -> Path:
        """The file ctrl+s writes: the config file being edited (``loratui.yaml`` when there is none)."""
        return Path(self.config_path or "loratui.yaml")

    @property
    def editing_run_config(self) -> bool:
        """True when the config file is the run's own copy (``loratui open runs/<name>``), not a file of the
        user's: saving writes the run's config.yaml."""
        if self.config_path is None:
            return False
        try:
            return Path(self.config_path).resolve() == self.state.run.config.resolve()
        except OSError:
            return False

    def _tab_label(self, i: int, step: str) -> str:
        mark = _MARK.get(self.state.steps.get(step, "todo"), "")
        return f"{i} {STEP_INFO[step][0]}" + (f" {mark}" if mark else "")

    def views(self) -> list[StepView]:
        """The views built so far; one still mounting is left out (``_ensure_view`` renders it once mounted:
        before that its result widgets are not there yet)."""
        return [view for view in self.main.query(StepView) if view.is_mounted]

    def show_state(self, reload: bool = False) -> None:
        """Re-read the run directory (when ``reload``) and render every view and the step bar."""
        if reload:
            self.state = RunState.load(self.cfg)
        for i, step in enumerate(STEP_ORDER, 1):
            tab = self.main.query_one(f"#tab-{step}", Tab)
            tab.label = self._tab_label(i, step)
            tab.set_class(self.state.steps[step] == "blocked", "-blocked")
        for view in self.views():
            view.show_state(self.state)

    # ---------------------------------------------------------------------------------- settings

    def override_args(self) -> list[str]:
        return [*self.base_overrides, *(f"{k}={v}" for k, v in self.edits.items())]

    @on(FieldEdited)
    def field_edited(self, event: FieldEdited) -> None:
        before = dict(self.edits)
        if same_value(event.value, value_of(self.base_cfg, event.key)):
            self.edits.pop(event.key, None)  # back to the file's value (or a widget reporting its first value)
        else:
            self.edits[event.key] = event.value
        if self.edits == before:
            return
        try:
            cfg = load_config(self.config_path, self.override_args())
        except ConfigError as e:
            self.problems = {p.field: p.message for p in e.problems}
        else:
            self.problems = {}
            renamed = (cfg.name, cfg.runs_dir) != (self.cfg.name, self.cfg.runs_dir)
            self.cfg = cfg
            for view in self.views():
                view.cfg = cfg
                view.settings_changed()
            if renamed:
                self.show_state(reload=True)
        for form in self.main.query(ConfigForm):
            form.show_problems(self.problems)
        self._set_subtitle()

    def step_argv(self, step: str, extra: list[str] | None = None) -> list[str]:
        if self.command is not None:
            return self.command(step) + (extra or [])
        if step == "serve":
            s = self.cfg.serve
            argv = [
                sys.executable,
                "-m",
                "loratui",
                "serve",
                str(self.state.run.path),
                *(["--config", self.config_path] if self.config_path else []),
                "--host",
                s.host,
                "--port",
                str(s.port),
            ]
            if s.backend != "auto":
                argv += ["--format", BACKEND_FORMAT.get(s.backend, s.backend)]
            return argv + (["--model-name", s.model_name] if s.model_name else [])
        return step_command(step, self.config_path, self.override_args(), extra)

    def action_save(self) -> None:
        """ctrl+s: write the settings to the config file being edited (named in the title bar)."""
        self.save_to(self.save_path)

    def action_save_as(self) -> None:
        """Write the settings to another file, and edit that one from then on."""
        if self._settings_invalid():
            return

        def chosen(target: str | None) -> None:
            if not target:
                return
            path = Path(target).expanduser()
            if path.is_dir():
                path = path / f"{self.cfg.name}.yaml"
            if path.exists() and (self.config_path is None or path.resolve() != Path(self.config_path).resolve()):
                self.push_screen(
                    Confirm(f"{path} exists. Replace it?"), lambda yes: self.save_to(path) if yes else None
                )
            else:
                self.save_to(path)

        self.push_screen(SaveAsDialog(f"{self.cfg.name}.yaml", self.config_path), chosen)

    def _settings_invalid(self) -> bool:
        if self.problems:  # never write a config that differs from what the form shows
            key, message = next(iter(self.problems.items()))
            self.push_screen(ErrorDialog("Fix the settings first", f"{key}: {message}", "Nothing was saved."))
            return True
        return False

    def save_to(self, path: Path) -> None:
        if self._settings_invalid():
            return
        try:
            write_config(path, self.cfg)
        except OSError as e:
            self.push_screen(ErrorDialog("Could not save the settings", f"{path}: {e.strerror or e}"))
            return
        self.config_path, self.base_overrides, self.edits, self.base_cfg = str(path), [], {}, self.cfg
        remember(path)
        self._set_subtitle()
        if self.editing_run_config:
            self.notify(
                f"saved the settings to {path}, the run's own config (the file its steps read). To write "
                "another file: Save settings as... in the command palette (ctrl+p).",
                markup=False,
            )
        else:
            self.notify(f"saved the settings to {path}", markup=False)

    def action_show_command(self) -> None:
        step = self.current_step
        self.push_screen(
            TextDialog(f"{STEP_INFO[step][0]} as a command", display_command(self.step_argv(step)), markup=False)
        )

    def action_help(self) -> None:
        focused = self.focused
        for form in self.main.query(ConfigForm):
            row = form.row_for(focused)
            if row is not None:
                self.push_screen(TextDialog(f"Help: {row.spec.key}", row.help_text))
                return
        title, blurb, _ = STEP_INFO[self.current_step]
        self.push_screen(TextDialog(f"loratui: {title}", f"{escape(blurb)}\n\n{HELP}"))

    def action_leave_field(self) -> None:
        self.main.query_one("#stepbar", Tabs).focus()

    async def action_quit_key(self) -> None:
        """``q``: quit (asking first while a job runs), as ctrl+q."""
        await self.action_quit()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The one-character keys do nothing while nothing on the main screen has the focus: such typing is
        meant for a field, not a command (they show dimmed in the footer meanwhile)."""
        if action in TYPED_KEY_ACTIONS and self.screen_stack and self.screen is self.main and self.main.focused is None:
            return None
        return True

    def on_key(self, event: events.Key) -> None:
        if event.is_printable and self.screen_stack and self.screen is self.main and self.main.focused is None:
            now = time.monotonic()
            if now - self._hinted > 10:  # once for a burst of typing
                self._hinted = now
                self.notify(
                    "Nothing has the focus, so typed keys do nothing: Esc focuses the step bar "
                    "(its keys: r, o, q ...), Tab the next field.",
                    markup=False,
                )

    def _focus_shown(self) -> None:
        """After showing a step: focus the step bar when the focus is lost or in a view no longer shown (typing
        would go nowhere, or into a hidden field)."""
        focused = self.main.focused
        steps = self.main.query_one("#steps", ContentSwitcher)
        if focused is None or (
            steps in focused.ancestors
            and not any(isinstance(a, StepView) and a.id == steps.current for a in focused.ancestors)
        ):
            self.main.query_one("#stepbar", Tabs).focus()

    def action_pick_data(self) -> None:
        """Choose data.source from a file tree; the pick goes into the form like a typed value."""
        self.action_show_step("data")

        async def picked(path: str | None) -> None:
            if path:
                field = (await self._ensure_view("data")).query_one("#f-data--source")
                field.value = path  # type: ignore[attr-defined]
                field.cursor_position = len(path)  # type: ignore[attr-defined]  # typing goes on at its end
                field.focus()

        self.push_screen(FilePicker("."), picked)

    # ---------------------------------------------------------------------------------- opening runs

    def action_open_run(self) -> None:
        def chosen(target: str | None) -> None:
            if target:
                self.open_run(target)

        self.push_screen(OpenDialog(recent_runs()), chosen)

    def open_run(self, target: str | Path) -> bool:
        if self.job is not None and self.job.running:
            self.notify("a job is running: cancel it before opening another run", severity="warning")
            return False
        try:
            path, overrides, cfg = open_run(target)
        except FileNotFoundError as e:
            self.push_screen(ErrorDialog("Cannot open", str(e)))
            return False
        except ConfigError as e:
            self.push_screen(
                ErrorDialog(
                    f"Cannot open {target}",
                    e.message,
                    "Fix the file (or run `loratui config validate` on it) and open it again.",
                )
            )
            return False
        self.cfg = self.base_cfg = cfg
        self.config_path, self.base_overrides, self.edits, self.problems = str(path), overrides, {}, {}
        remember(path)
        self.state = RunState.load(cfg)
        self._set_subtitle()
        self.call_later(self._rebuild_views)
        return True

    async def _rebuild_views(self) -> None:
        switcher = self.main.query_one("#steps", ContentSwitcher)
        current = switcher.current or STEP_ORDER[0]
        await switcher.remove_children()
        await self._ensure_view(current)
        switcher.current = current
        self.show_state()
        self._shown_step(current)
        self._focus_shown()

    async def _ensure_view(self, step: str) -> StepView:
        """The step's view, built and mounted the first time it is needed."""
        found = self.main.query(f"#steps > #{step}")
        if found:
            return found.first(StepView)
        view = VIEWS[STEP_ORDER.index(step)](self.cfg)
        await self.main.query_one("#steps", ContentSwitcher).mount(view)
        view.show_state(self.state)
        view.form.show_problems(self.problems)
        return view

    # ---------------------------------------------------------------------------------- navigation

    async def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        if event.tab.id:
            step = event.tab.id.removeprefix("tab-")
            await self._ensure_view(step)
            self.main.query_one("#steps", ContentSwitcher).current = step
            self._shown_step(step)
            self._focus_shown()

    def _shown_step(self, step: str) -> None:
        """Tell the views which one is shown now (the Train view estimates its settings when shown)."""
        for view in self.views():
            if view.STEP == step:
                view.shown()
            else:
                view.left()

    async def action_measure(self) -> None:
        """``e``: the Train view's estimate, measured with a probe of a few real training steps."""
        if self.job is not None and self.job.running:
            self.notify(f"{self.job.step} is running: measure when it ends (the probe would compete with it)")
            return
        if self.problems:
            key, message = next(iter(self.problems.items()))
            self.push_screen(ErrorDialog("Fix the settings first", f"{key}: {message}"))
            return
        view = await self._ensure_view("train")
        assert isinstance(view, TrainView)
        view.measure()
        self.action_show_step("train")

    def _show_and_run(self, step: str) -> None:
        """The command palette's "Run <step>": its view, then the step."""
        self.action_show_step(step)
        self.action_run_step(step=step)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for step in STEP_ORDER:
            title = STEP_INFO[step][0]
            yield SystemCommand(f"Show {title}", STEP_INFO[step][1], lambda s=step: self.action_show_step(s))
            if step != "serve":
                yield SystemCommand(f"Run {title}", f"loratui {step} on this run", partial(self._show_and_run, step))
        yield SystemCommand("Start the server", "loratui serve on this run", self.start_server)
        yield SystemCommand("Cancel the job", "SIGTERM, then SIGKILL after the grace period", self.action_cancel_job)
        yield SystemCommand("Resume training", "train --resume from the last checkpoint", self.action_resume)
        yield SystemCommand(
            "Measure the estimate", "time and memory from a few real training steps (e)", self.action_measure
        )
        yield SystemCommand("Save settings", f"write {self.save_path} (ctrl+s)", self.action_save)
        yield SystemCommand(
            "Save settings as...", "write the settings to another config file, and edit that one", self.action_save_as
        )
        yield SystemCommand("Show command", "the loratui command line of the shown step (!)", self.action_show_command)
        yield SystemCommand("Pick training data", "choose data.source from a file tree (f)", self.action_pick_data)
        yield SystemCommand("Open a run", "a run folder, a config file or a recent run (o)", self.action_open_run)
        yield SystemCommand("Help", "keys, and help for the focused setting (F1)", self.action_help)


def create_app(cfg: RunConfig | None = None, config_path: str | Path | None = None, **options: Any) -> LoratuiApp:
    """The one factory used by the CLI and the tests."""
    if config_path is not None:
        remember(config_path)
    return LoratuiApp(cfg or RunConfig(), config_path=config_path, **options)
