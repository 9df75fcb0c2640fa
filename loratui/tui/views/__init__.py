"""One view per step. Each shows the step's state, its results (read from the run directory) and its
settings form (generated from the config schema). Views render from a :class:`~loratui.tui.state.RunState`;
they never own a job (the App does), so switching steps never stops one."""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from loratui.pipeline.config import RunConfig
from loratui.tui.forms import ConfigForm
from loratui.tui.state import RunState

_STATUS_STYLE = {
    "done": "green",
    "running": "cyan",
    "failed": "red",
    "cancelled": "yellow",
    "interrupted": "yellow",
    "blocked": "dim",
    "todo": "default",
}


def table(widget_id: str, *columns: str) -> DataTable:
    t: DataTable = DataTable(id=widget_id, zebra_stripes=True, cursor_type="row", classes="result-table")
    t.add_columns(*columns)
    return t


def fill(t: DataTable, rows: list[tuple[Any, ...]]) -> None:
    """Replace the rows of a result table: numbers through :func:`fmt`, strings as plain text (escaped: a
    string cell is markup), :class:`~rich.text.Text` as it is (several lines make a taller row)."""
    t.clear()
    for row in rows:
        cells = [c if isinstance(c, Text) else cell(c) for c in row]  # Text: already styled, not markup
        t.add_row(*cells, height=max(len(str(c).splitlines()) or 1 for c in cells))
    t.display = bool(rows)


def cell(value: Any) -> str:
    """A value as markup for a table cell or a summary line: a number through :func:`fmt`, anything else as
    plain text (escaped)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return fmt(value)
    return escape(str(value))


def fmt(value: Any, digits: int = 4) -> str:
    """A number for display (every number the views show goes through here): integers as integers, floats
    to ``digits`` significant digits without binary noise (62.69999999999999 -> 62.7, 24.0 -> 24), no
    exponent from 1e-4 up (12345.6 -> 12346); None -> ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 10**digits:
        return f"{value:.0f}"
    text = f"{value:.{digits}g}"
    return "0" if text == "-0" else text


def percent(value: Any, digits: int = 1) -> str:
    """A fraction (0..1) as a percentage, as the run report shows it: 1 -> 100.0%, 0.9843 -> 98.4%."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:.{digits}%}"


def size(n: Any) -> str:
    """Bytes in binary units, as the run report (exports/report.md) gives them: MiB = 2**20 bytes."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    if n < 2**10:
        return f"{n:.0f} B"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


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

    def shown(self) -> None:
        """The App showed this view (after switching to it)."""

    def left(self) -> None:
        """The App showed another step's view."""

    def settings_changed(self) -> None:
        """The App set ``cfg`` to edited (valid) settings."""
