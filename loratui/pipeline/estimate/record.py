"""The estimate as a record (``--json``, ``events.jsonl``, the adapter's provenance, the report) and as the
panel people read (CLI, TUI): time, memory and disk, each part, what the device has, and what would fit."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

GIB = 1 << 30


def gib(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Budget(BaseModel):
    """Bytes by part, against what is available."""

    parts: dict[str, int]
    available: int | None = None  # free memory of the device, or free space on the runs filesystem
    where: str = ""  # what ``available`` is: "RAM available", "GPU free", "free on /work/runs"

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available


class Timing(BaseModel):
    """Seconds by step (training also per epoch), and where the figures come from."""

    parts: dict[str, float]
    epochs: float
    steps: int
    per_epoch_s: float
    tokens_per_s: float
    source: str  # "probe" or "analytic"
    confidence: str
    setup_s: float = 0.0  # of ``parts["train"]``: loading the model and building the Trainer

    @property
    def total(self) -> float:
        return sum(self.parts.values())


class Change(BaseModel):
    """One change that makes the run fit, with its new figures."""

    what: str
    overrides: list[str]  # key=value, as the CLI takes them
    memory: int
    disk: int
    train_s: float | None = None
    fits: bool = True


class Estimate(BaseModel):
    model: str
    params: int
    device: str
    device_reason: str
    settings: dict[str, Any]  # the resolved auto settings, the token counts and where they come from
    time: Timing
    memory: Budget
    disk: Budget
    changes: list[Change] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    measured: dict[str, Any] = Field(default_factory=dict)  # the probe's raw figures

    @property
    def fits(self) -> bool:
        return self.memory.fits is not False and self.disk.fits is not False

    def verdict(self) -> str:
        if self.memory.fits is False:
            return f"does not fit: needs {gib(self.memory.total)} of memory, {self.memory.where} {gib(self.memory.available)}"
        if self.disk.fits is False:
            return f"does not fit: needs {gib(self.disk.total)} of disk, {self.disk.where} {gib(self.disk.available)}"
        return f"fits: about {duration(self.time.total)} in all, peak memory {gib(self.memory.total)}"

    def lines(self) -> list[str]:
        """The panel as plain lines (logs, the TUI's fallback, tests)."""
        s = self.settings
        out = [
            f"{self.model} ({self.params / 1e6:,.0f}M parameters) on {self.device}: {self.device_reason}",
            f"micro-batch {s.get('batch_size')} x accumulation {s.get('grad_accum')}, {self.time.steps} steps "
            f"({self.time.epochs:g} epochs), {s.get('tokens_per_epoch', 0):,} tokens per epoch ({s.get('tokens_from')})",
            f"time ({self.time.source}, {self.time.confidence}): "
            + ", ".join(f"{k} {duration(v)}" for k, v in self.time.parts.items())
            + f"; total {duration(self.time.total)}; {duration(self.time.per_epoch_s)} per epoch, "
            f"{self.time.tokens_per_s:,.0f} tokens/s",
            f"memory: {gib(self.memory.total)} peak ("
            + ", ".join(f"{k} {gib(v)}" for k, v in self.memory.parts.items())
            + f"); {self.memory.where} {gib(self.memory.available)}",
            f"disk: {gib(self.disk.total)} ("
            + ", ".join(f"{k} {gib(v)}" for k, v in self.disk.parts.items() if v)
            + f"); {self.disk.where} {gib(self.disk.available)}",
            self.verdict(),
        ]
        out += [
            f"  would fit: {c.what} ({' '.join(c.overrides)}): memory {gib(c.memory)}, disk {gib(c.disk)}"
            + (f", training {duration(c.train_s)}" if c.train_s is not None else "")
            for c in self.changes
        ]
        return out + [f"note: {n}" for n in self.notes]

    def renderable(self) -> Any:
        """A rich Panel of the estimate (rich only: the CLI prints it, the TUI shows it in a Static)."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1), expand=False)
        table.add_column("time", justify="left")
        table.add_column("", justify="right")
        table.add_column("memory", justify="left")
        table.add_column("", justify="right")
        table.add_column("disk", justify="left")
        table.add_column("", justify="right")
        columns = [
            [(k, duration(v)) for k, v in self.time.parts.items()] + [("total", duration(self.time.total))],
            [(k, gib(v)) for k, v in self.memory.parts.items()]
            + [("peak", gib(self.memory.total)), (self.memory.where, gib(self.memory.available))],
            [(k, gib(v)) for k, v in self.disk.parts.items() if v]
            + [("total", gib(self.disk.total)), (self.disk.where, gib(self.disk.available))],
        ]
        for i in range(max(len(c) for c in columns)):
            row: list[str] = []
            for col in columns:
                row += list(col[i]) if i < len(col) else ["", ""]
            table.add_row(*row)
        head, how = self.lines()[:2]
        body: list[Any] = [Text(head), Text(how, style="dim"), table]
        style = "green" if self.fits else "bold red"
        body.append(Text(self.verdict(), style=style))
        body += [Text(line.strip(), style="yellow") for line in self.lines() if line.startswith("  would fit")]
        body += [Text(f"note: {n}", style="dim") for n in self.notes]
        title = f"estimate ({self.time.source}: {self.time.confidence})"
        return Panel(Group(*body), title=title, border_style=style, expand=False)
