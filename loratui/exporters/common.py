"""What the exporters share: the job they run, its progress, the merged model they start from, disk checks,
temporary files, logged subprocesses and ``exports/report.md`` (what they verify against: reference.py)."""

from __future__ import annotations

import math
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.process import Supervised
from loratui.pipeline.runs import RunDir, atomic_write_text
from loratui.pipeline.steps import ShouldStop


@dataclass(frozen=True)
class ExportJob:
    """What every exporter works from: the run's config and folder, where its events go, its cancel check."""

    cfg: RunConfig
    run: RunDir
    events: EventSink
    should_stop: ShouldStop


class Stages:
    """Progress over a known number of stages: ``stage("message")`` before each (a cancel point: nothing
    is written yet), ``finish()`` after the last."""

    def __init__(self, events: EventSink, total: int, task: str, unit: str, should_stop: ShouldStop):
        self.events, self.total, self.task, self.unit, self.should_stop = events, total, task, unit, should_stop
        self.done = 0

    def __call__(self, message: str) -> None:
        if self.should_stop():
            raise StepCancelled(f"cancelled before {message}; nothing was written")
        self.events.progress(self.done, self.total, task=self.task, unit=self.unit, message=message)
        self.done += 1

    def note(self, message: str) -> None:
        """A new message at the current count (work inside a stage)."""
        self.events.progress(self.done, self.total, task=self.task, unit=self.unit, message=message)

    def finish(self, message: str = "done") -> None:
        self.events.progress(self.total, self.total, task=self.task, unit=self.unit, message=message)


def run_logged(
    cmd: list[str],
    env: dict[str, str],
    log: Path,
    should_stop: ShouldStop,
    what: str,
    cwd: Path | None = None,
    grace_s: float = 10.0,
) -> None:
    """Run a converter with its output appended to ``log``. A cancel stops its whole process group: SIGTERM,
    SIGKILL after ``grace_s`` seconds."""
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n# {what}\n")
    # its own process group, which goes when this process dies (as it went with this one's group before)
    proc = Supervised(cmd, env=env, cwd=cwd, output=log, parent_death=signal.SIGTERM).start()
    proc.cancel_when(should_stop, grace_s=grace_s)
    code = proc.wait()
    if proc.cancel_asked:
        raise StepCancelled(f"cancelled while {what}; nothing was written")
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-6:]
        refused = [line.split(":", 1)[1].strip() for line in tail if line.startswith("loratui-refused:")]
        if refused:  # an entry's own, expected refusal (see convert_lora_entry.py)
            raise LoratuiError(refused[-1], hint=f"The converter's output is in {log}.")
        cause = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
        raise LoratuiError(f"{what} failed (exit {code}): {cause.strip()}", hint=f"The full output is in {log}.")


def ensure_merged(cfg: RunConfig, run: RunDir, events: EventSink, should_stop: ShouldStop) -> dict[str, Any]:
    """``merged/`` for the adapter the config merges; returns the merge's summary.

    Reused as it is when it is complete and was made from the same adapter weights with the same merge
    settings (its ``loratui-merge.json`` says so); merged again when the adapter changed (a new version, a
    rollback), a setting changed, or ``merged/`` is missing or incomplete.
    """
    from loratui.pipeline.merge.merging import current_merge, merge, reused_summary

    record, why = current_merge(cfg, run)
    if record is not None:
        events.log(f"export: {why}; not merging again")
        return reused_summary(run, record)
    events.log(f"export: merging the current adapter first ({why})")
    return merge(cfg, run, EventSink("merge", events.writers), should_stop)


def count_params(merged: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in merged.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def clean_stale(out: Path) -> None:
    """Temporary files and folders a killed export left (never a finished ``.gguf``)."""
    for stale in out.glob(".*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def check_disk(out: Path, need: float, what: str) -> None:
    """Fail before any work when ``out`` has less than ``need`` bytes (plus 10%) free."""
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < need * 1.1:
        raise LoratuiError(
            f"{out}: {free / 2**30:.2f} GiB free; the GGUF export needs about {need / 2**30:.2f} GiB ({what})",
            hint="Free some space, ask for fewer types (--quant), or set runs_dir to a larger disk.",
        )


def make_room(out: Path, model_dir: Path, bytes_per_param: float, what: str, extra_bytes: int = 0) -> int:
    """Removes what a killed export left in ``out`` and fails before any work when the files (about
    ``bytes_per_param`` per parameter of ``model_dir``, plus ``extra_bytes``) do not fit; returns the
    parameter count."""
    clean_stale(out)
    params = count_params(model_dir)
    check_disk(out, params * bytes_per_param + extra_bytes, what)
    return params


def write_report_section(run: RunDir, title: str, body: list[str]) -> None:
    """Replace (or add) one ``## title`` section of exports/report.md, keeping the others."""
    path = run.exports / "report.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# Exports of {run.path.name}\n"
    sections = re.split(r"(?m)^(?=## )", text)
    head, rest = sections[0], [s for s in sections[1:] if not s.startswith(f"## {title}\n")]
    new = f"## {title}\n\n" + "\n".join(body).rstrip() + "\n\n"
    body_text = "".join(section.rstrip() + "\n\n" for section in sorted(rest + [new]))
    atomic_write_text(path, head.rstrip() + "\n\n" + body_text.rstrip() + "\n")
