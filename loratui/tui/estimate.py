"""The Train view's estimate area: time, memory and disk of the run, whether it fits and what would, before
``r`` starts it.

The estimate runs in a thread worker (:func:`loratui.pipeline.estimate.plan.estimate`, imported when first
needed: it may import torch, never at start-up). Without the probe it takes a few seconds; with it (``e``) a
few real optimizer steps run in a child process, stopped through ``should_stop`` when the user cancels
(``c``), leaves the view, starts a job or quits. Each request has a generation number: what an older one
reports (its progress, its result) is dropped, so an estimate of settings changed meanwhile never shows.
A :class:`~loratui.pipeline.errors.LoratuiError` shows its message and hint in the area; anything else shows
one line, never a traceback.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.measure import Measurement
from rich.panel import Panel
from rich.text import Text
from textual import work
from textual.message import Message
from textual.widgets import Static
from textual.worker import get_current_worker

from loratui.pipeline.config import RunConfig

if TYPE_CHECKING:
    from loratui.pipeline.estimate.record import Estimate

PENDING = "estimating time, memory and disk..."
PROBING = "measuring a few training steps (a probe in a child process; c cancels)..."


def progress_text(event: Any) -> str:
    """A progress event of the estimate as a short line: ``probe 2/3 steps``."""
    total = f"/{event.total:g}" if event.total else ""
    return f"{event.task} {event.current:g}{total} {event.unit}"


def problem_text(error: BaseException) -> Text:
    """An estimate that failed, as the area shows it: a LoratuiError's message and hint; anything else in one
    line with where to see more."""
    message = getattr(error, "message", None)
    if message is not None:
        hint = getattr(error, "hint", None)
    else:
        message = f"{type(error).__name__}: {error}"
        hint = "`loratui estimate --config FILE` gives the same estimate on the command line."
    text = Text("estimate: ", style="bold red")
    text.append(str(message), style="red")
    if hint:
        text.append(f"\nhint: {hint}", style="yellow")
    return text


class EstimateArea(Static):
    """The estimate of the settings shown (``cfg``), computed in a thread worker."""

    DEFAULT_CSS = "EstimateArea { height: auto; margin-bottom: 1; }"

    class Progress(Message):
        """The worker of ``generation`` reports progress (posted from its thread)."""

        def __init__(self, generation: int, text: str) -> None:
            super().__init__()
            self.generation, self.text = generation, text

    class Finished(Message):
        """The worker of ``generation`` ended with an estimate or an error (posted from its thread)."""

        def __init__(self, generation: int, cfg: RunConfig, outcome: Any) -> None:
            super().__init__()
            self.generation, self.cfg, self.outcome = generation, cfg, outcome

    def __init__(self, cfg: RunConfig, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.cfg = cfg  # the settings shown: an estimate of other settings is stale
        self.generation = 0  # of the latest request; a worker's reports of an older one are dropped
        self.running: bool | None = None  # None: idle; False: the estimate; True: the estimate with the probe
        self.good: tuple[RunConfig, Estimate] | None = None  # the last estimate, with its settings
        self.message: RenderableType | None = None  # an error or a note, shown above the last estimate
        self.compact = False  # one line (while training runs: the loss chart needs the room)
        self._progress = ""
        self._stop = threading.Event()

    def on_mount(self) -> None:
        self.refresh_area()

    @property
    def estimate(self) -> Estimate | None:
        """The estimate of the settings shown, if there is one."""
        return self.good[1] if self.good is not None and self.good[0] == self.cfg else None

    def fresh(self) -> bool:
        """Whether the area shows (or is computing) the estimate of the settings shown."""
        return self.running is not None or self.estimate is not None

    def start(self, probe: bool = False) -> None:
        """Estimate the settings shown (``probe``: measure a few real steps); the one in flight stops."""
        self.stop()
        self.generation += 1
        self._stop = stop = threading.Event()
        self.running, self.message, self._progress = probe, None, ""
        self.refresh_area()
        self._compute(self.cfg, probe, self.generation, stop)

    def stop(self, note: str | None = None, probe_only: bool = False) -> bool:
        """Stop the estimate in flight (what it still reports is dropped); ``note`` says why in the area.
        ``probe_only``: leave an estimate without the probe running. True when one was stopped."""
        if self.running is None or (probe_only and not self.running):
            return False
        self._stop.set()
        self.generation += 1
        self.running = None
        if note is not None:
            self.message = Text(note, style="yellow")
        self.refresh_area()
        return True

    def on_unmount(self) -> None:
        self._stop.set()  # quitting: the probe's child process stops with the app

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def _compute(self, cfg: RunConfig, probe: bool, generation: int, stop: threading.Event) -> None:
        from loratui.pipeline.estimate import plan
        from loratui.pipeline.events import EventSink

        worker = get_current_worker()

        def should_stop() -> bool:
            return stop.is_set() or worker.is_cancelled

        def write(event: Any) -> None:
            if getattr(event, "type", None) == "progress" and not stop.is_set():
                self._post(self.Progress(generation, progress_text(event)))

        outcome: Any
        try:
            outcome = plan.estimate(cfg, probe=probe, events=EventSink("estimate", [write]), should_stop=should_stop)
        except Exception as e:  # a LoratuiError (message, hint) or a bug: shown in the area, never a traceback
            outcome = e
        self._post(self.Finished(generation, cfg, outcome))

    def _post(self, message: Message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:  # the app's loop is closed: nobody to tell
            pass

    def on_estimate_area_progress(self, event: Progress) -> None:
        event.stop()
        if event.generation == self.generation and self.running is not None:
            self._progress = event.text
            self.refresh_area()

    def on_estimate_area_finished(self, event: Finished) -> None:
        event.stop()
        if event.generation != self.generation or event.cfg != self.cfg:
            return  # stale: the settings changed, or it was stopped
        self.running = None
        if isinstance(event.outcome, BaseException):
            self.message = problem_text(event.outcome)
        else:
            self.good, self.message = (event.cfg, event.outcome), None
        self.refresh_area()

    # ---------------------------------------------------------------------------------- rendering

    def refresh_area(self) -> None:
        parts: list[RenderableType] = []
        if self.running is not None:
            line = Text(PROBING if self.running else PENDING, style="cyan")
            if self._progress:
                line.append(f"  {self._progress}", style="dim")
            parts.append(line)
        elif self.message is not None:
            parts.append(self.message)
        found = self.estimate
        if found is not None:
            parts += self._estimate_parts(found)
        elif not parts:
            parts.append(Text("estimate: not computed yet", style="dim"))
        self.update(Group(*parts))

    def on_resize(self) -> None:
        self.refresh_area()  # the panel, or its narrow form, by the width there is

    def _estimate_parts(self, found: Estimate) -> list[RenderableType]:
        measured = found.time.source == "probe"
        if self.compact:
            line = Text(f"estimate ({found.time.source}): ", style="dim")
            line.append(found.verdict(), style="green" if found.fits else "bold red")
            return [line]
        after = (
            "measured with a probe of a few real steps; e measures again"
            if measured
            else "e measures a few real training steps for a closer figure"
        )
        panel = found.renderable()
        console = self.app.console
        width = self.content_size.width
        if width and Measurement.get(console, console.options.update_width(10_000), panel).maximum > width:
            panel = narrow_panel(found)
        return [panel, Text(after, style="dim")]


def narrow_panel(found: Estimate) -> Panel:
    """The estimate where its panel's table does not fit: its plain lines (wrapped), the verdict in colour."""
    style = "green" if found.fits else "bold red"
    verdict = found.verdict()
    body = [
        Text(line.strip(), style=style if line == verdict else "yellow" if line.startswith("  would fit") else "")
        for line in found.lines()
    ]
    return Panel(Group(*body), title="estimate", title_align="left", border_style=style)
