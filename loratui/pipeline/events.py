"""Run events: one JSON object per line, shared by the CLI, the TUI and tests.

Every step reports through an :class:`EventSink`. The sink fans each event out to writers:
``runs/<name>/events.jsonl`` (always), stdout as JSONL (``--events jsonl``, what the TUI reads
from its subprocess), and rich progress bars on stderr for people.

Wire format: ``{"t": <unix time>, "step": "train", "type": "progress", ...}``. Parse a line with
:func:`parse_event`; the ``type`` field selects the model.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from rich.markup import escape


class _Event(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer producers may add fields; readers keep them

    t: float = Field(default_factory=time.time, description="Unix time of the event.")
    step: str = Field(description="Step that emitted it: data, train, evaluate, merge, export, serve, ...")


class Progress(_Event):
    type: Literal["progress"] = "progress"
    current: float
    total: float | None = None
    task: str = Field("main", description="Progress bar this belongs to (a step may run several).")
    unit: str = "it"
    message: str | None = None


class Metric(_Event):
    type: Literal["metric"] = "metric"
    values: dict[str, float]
    at: int | None = Field(None, description="Global step the values belong to.")
    split: str | None = Field(None, description="train, validation, test ...")


class Log(_Event):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str


class Artifact(_Event):
    type: Literal["artifact"] = "artifact"
    kind: str = Field(description="What it is: adapter, merged, gguf, onnx, report, ...")
    path: str
    bytes: int | None = None


class Checkpoint(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    path: str
    at: int | None = None


class Done(_Event):
    type: Literal["done"] = "done"
    summary: dict[str, Any] = Field(default_factory=dict)
    seconds: float | None = None


class Error(_Event):
    type: Literal["error"] = "error"
    message: str
    hint: str | None = None
    user_error: bool = Field(True, description="True for bad input the user can fix; False for a bug.")


class Cancelled(_Event):
    type: Literal["cancelled"] = "cancelled"
    message: str = "cancelled"
    resume_from: str | None = Field(None, description="Checkpoint to resume from, if one was saved.")


AnyEvent = Progress | Metric | Log | Artifact | Checkpoint | Done | Error | Cancelled
Event = Annotated[AnyEvent, Field(discriminator="type")]
EVENT_TYPES = ("progress", "metric", "log", "artifact", "checkpoint", "done", "error", "cancelled")
FINAL_TYPES = frozenset({"done", "error", "cancelled"})
_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(Event)
EventT = TypeVar("EventT", bound=_Event)


def parse_event(line: str | bytes | dict[str, Any]) -> Event:
    """Parse one JSONL line (or a decoded dict) into its event model; raises ValueError if invalid."""
    if isinstance(line, dict):
        return _ADAPTER.validate_python(line)
    return _ADAPTER.validate_json(line)


def read_events(path: str | Path) -> list[Event]:
    """All events of an ``events.jsonl`` file; a torn last line (a killed writer) is skipped."""
    events = []
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            raw = raw.strip()
            if not raw:
                continue
            try:
                events.append(parse_event(raw))
            except ValueError:
                continue
    return events


Writer = Callable[[Any], None]


def has_surrogates(text: str) -> bool:
    """True for text holding lone surrogates (from undecodable bytes), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class JsonlWriter:
    """Appends each event as one JSON line to a file or stream, flushed at once."""

    def __init__(self, target: str | Path | IO[str]):
        self._own = not hasattr(target, "write")
        if self._own:
            Path(target).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
            self._fh: IO[str] = open(target, "a", encoding="utf-8")  # type: ignore[arg-type]
        else:
            self._fh = target  # type: ignore[assignment]
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        data = event.model_dump(mode="json", exclude_none=True)
        line = json.dumps(data, ensure_ascii=False)
        if has_surrogates(line):  # text that came from undecodable input: keep it, escaped
            line = json.dumps(data)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._own:
            self._fh.close()


class MemoryWriter(list[AnyEvent]):
    """Keeps events in a list (tests, in-process callers)."""

    def __call__(self, event: Any) -> None:
        self.append(event)

    def of_type(self, kind: str) -> list[AnyEvent]:
        return [e for e in self if e.type == kind]


class RichWriter:
    """Human view of the same events on stderr: progress bars, metrics and log lines."""

    def __init__(self, stream: IO[str] | None = None):
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr)
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def _bar(self, event: Progress) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        if self._progress is None:
            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
        key = event.task
        if key not in self._tasks:
            label = f"{event.step}" if key == "main" else f"{event.step}: {key}"
            self._tasks[key] = self._progress.add_task(label, total=event.total, note="")
        self._progress.update(self._tasks[key], completed=event.current, total=event.total, note=event.message or "")

    def _print(self, text: str) -> None:
        (self._progress.console if self._progress else self.console).print(text, highlight=False)

    def __call__(self, event: Any) -> None:
        kind = event.type
        if kind == "progress":
            self._bar(event)
        elif kind == "metric":
            values = "  ".join(f"{k}={v:.4g}" for k, v in event.values.items())
            at = f" step {event.at}" if event.at is not None else ""
            split = f" ({event.split})" if event.split else ""
            self._print(f"[cyan]{escape(event.step + at + split)}[/] {escape(values)}")
        elif kind == "log" and isinstance(getattr(event, "estimate", None), dict):
            self._estimate(event.estimate)
        elif kind == "log":
            if event.level != "debug":
                color = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
                self._print(f"[{color}]{escape(event.message)}[/]")
        elif kind in ("artifact", "checkpoint"):
            self._print(f"[green]{kind}[/] {escape(event.path)}")
        elif kind in FINAL_TYPES:
            self.close()
            self._final(event)

    def _estimate(self, data: dict[str, Any]) -> None:
        """The estimate a step announces (train, before its first step), as the panel ``loratui estimate`` prints."""
        from loratui.pipeline.estimate.record import Estimate

        panel = Estimate.model_validate(data).renderable()
        (self._progress.console if self._progress else self.console).print(panel)

    def _final(self, event: Any) -> None:
        """The step's last line: done (and how long it took), cancelled (and where to resume), or the error."""
        if event.type == "done":
            took = f" in {event.seconds:.1f}s" if event.seconds is not None else ""
            self.console.print(f"[bold green]{escape(event.step)} done{took}[/]")
        elif event.type == "cancelled":
            resume = f" (resume from {event.resume_from})" if event.resume_from else ""
            self.console.print(f"[bold yellow]{escape(event.step + ' cancelled' + resume)}[/]")
        else:
            self.console.print(f"[bold red]error:[/] {escape(event.message)}", soft_wrap=True)
            if event.hint:
                self.console.print(f"[dim]hint:[/] {escape(event.hint)}", soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()


class EventSink:
    """What a step reports through. Each helper builds an event for ``step`` and fans it out."""

    def __init__(self, step: str, writers: list[Writer] | None = None):
        self.step = step
        self.writers: list[Writer] = list(writers or [])

    def emit(self, event: EventT) -> EventT:
        for write in self.writers:
            write(event)
        return event

    def progress(
        self,
        current: float,
        total: float | None = None,
        *,
        task: str = "main",
        unit: str = "it",
        message: str | None = None,
        **extra: Any,
    ) -> Progress:
        """``extra``: further fields for readers that know them (``eta_s``, ``epoch`` ...)."""
        return self.emit(
            Progress(step=self.step, current=current, total=total, task=task, unit=unit, message=message, **extra)
        )

    def metric(self, values: dict[str, float], *, at: int | None = None, split: str | None = None) -> Metric:
        return self.emit(Metric(step=self.step, values=values, at=at, split=split))

    def log(self, message: str, level: Literal["debug", "info", "warning", "error"] = "info", **extra: Any) -> Log:
        """``extra``: further fields for readers that know them (the ``pid`` of a step's first line)."""
        return self.emit(Log(step=self.step, message=message, level=level, **extra))

    def artifact(self, path: str | Path, kind: str) -> Artifact:
        p = Path(path)
        size = p.stat().st_size if p.is_file() else None
        return self.emit(Artifact(step=self.step, path=str(path), kind=kind, bytes=size))

    def checkpoint(self, path: str | Path, at: int | None = None) -> Checkpoint:
        return self.emit(Checkpoint(step=self.step, path=str(path), at=at))

    def done(self, summary: dict[str, Any] | None = None, seconds: float | None = None) -> Done:
        return self.emit(Done(step=self.step, summary=summary or {}, seconds=seconds))

    def error(self, message: str, hint: str | None = None, user_error: bool = True) -> Error:
        return self.emit(Error(step=self.step, message=message, hint=hint, user_error=user_error))

    def cancelled(self, message: str = "cancelled", resume_from: str | None = None) -> Cancelled:
        return self.emit(Cancelled(step=self.step, message=message, resume_from=resume_from))

    def close(self) -> None:
        for write in self.writers:
            close = getattr(write, "close", None)
            if close is not None:
                close()


def null_sink(step: str = "test") -> EventSink:
    """A sink that keeps events in memory (``sink.writers[0]``)."""
    return EventSink(step, [MemoryWriter()])
