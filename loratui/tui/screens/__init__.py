"""One view per step. Each shows the step's state, its results (read from the run directory) and its
settings form (generated from the config schema). Views render from a :class:`~loratui.tui.state.RunState`;
they never own a job (the App does), so switching steps never stops one."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from loratui.pipeline.config import RunConfig
from loratui.tui.forms import ConfigForm
from loratui.tui.state import RunState

_STATUS_STYLE = {"done": "green", "running": "cyan", "failed": "red", "cancelled": "yellow", "interrupted": "yellow",
                 "blocked": "dim", "todo": "default"}


def table(widget_id: str, *columns: str) -> DataTable:
    t: DataTable = DataTable(id=widget_id, zebra_stripes=True, cursor_type="row", classes="result-table")
    t.add_columns(*columns)
    return t


def fill(t: DataTable, rows: list[tuple[Any, ...]]) -> None:
    t.clear()
    for row in rows:
        t.add_row(*(escape(str(c)) for c in row))
    t.display = bool(rows)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


class StepView(Vertical):
    """The common frame: title, state line, results on the left, settings on the right."""

    STEP = ""
    TITLE = ""
    BLURB = ""
    SECTIONS: tuple[str, ...] = ()
    KEYS = "r run"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(id=self.STEP, classes="step-view")
        self.cfg = cfg

    def compose(self) -> ComposeResult:
        yield Static(f"[b]{self.TITLE}[/b]  {self.BLURB}", classes="step-title")
        yield Static("", id=f"{self.STEP}-state", classes="step-state")
        with Horizontal(classes="step-body"):
            with VerticalScroll(classes="step-results", id=f"{self.STEP}-results"):
                yield from self.compose_results()
            with VerticalScroll(classes="step-settings"):
                yield ConfigForm(self.SECTIONS, self.cfg, id=f"{self.STEP}-form")

    def compose_results(self) -> ComposeResult:
        yield from ()

    @property
    def form(self) -> ConfigForm:
        return self.query_one(ConfigForm)

    def show_state(self, state: RunState) -> None:
        status = state.steps[self.STEP]
        last = state.last.get(self.STEP)
        text = f"[{_STATUS_STYLE[status]}]{status}[/]"
        if status == "blocked":
            text += f": {escape(state.why_blocked.get(self.STEP, ''))}"
        elif status in ("failed", "interrupted") and last is not None and last.message:
            text += f": {escape(last.message.splitlines()[0])}"
        elif status == "cancelled" and last is not None and last.resume_from:
            text += f"; resume from {escape(last.resume_from)}"
        elif status == "running" and last is not None and last.pid:
            text += f" (pid {last.pid})"
        self.query_one(f"#{self.STEP}-state", Static).update(f"{text}   [dim]{self.KEYS}[/dim]")
        self.show_results(state)

    def show_results(self, state: RunState) -> None:
        """Fill the result widgets from the run directory."""
