"""What the exporters share: the merged model they start from, the rows they verify on, disk checks,
temporary files, logged subprocesses and ``exports/report.md``."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError, StepCancelled
from loratui.pipeline.events import EventSink
from loratui.pipeline.process import Supervised
from loratui.pipeline.runs import RunDir, atomic_write_text
from loratui.pipeline.steps import ShouldStop


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
    from loratui.pipeline.merge.step import current_merge, merge, reused_summary

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


def eval_rows(
    cfg: RunConfig, run: RunDir, tokenizer: Any, template: Any, events: EventSink, task: str = "causal"
) -> list[Any]:
    """``export.verify_samples`` test rows (else validation, train) of the run's data, with chat prompts."""
    from loratui.pipeline.evaluate.step import load_examples, pick_split

    manifest = json.loads((run.data / "dataset.json").read_text(encoding="utf-8"))
    split = pick_split(manifest, "test", str(run.data), events, fallback_train=True)
    return load_examples(
        run.data / manifest["splits"][split], task, tokenizer, template, cfg.eval.fact_field, cfg.export.verify_samples
    )


def merged_reference(
    cfg: RunConfig,
    run: RunDir,
    tokenizer: Any,
    template: Any,
    events: EventSink,
    should_stop: ShouldStop,
    task: str = "causal",
) -> tuple[list[Any], set[int], Any]:
    """What an export is checked against: the rows (``eval_rows``), their stop ids, and the merged model
    in PyTorch fp32 on CPU behind the evaluate step's model interface."""
    from loratui.pipeline.data.step import prepare
    from loratui.pipeline.evaluate.runtimes import TorchModel, load_torch
    from loratui.pipeline.evaluate.step import EvalSet, stop_ids

    prepare(cfg, run, events, should_stop)
    examples = eval_rows(cfg, run, tokenizer, template, events, task)
    stop = stop_ids(tokenizer, [EvalSet("main", "", "test", examples)])
    model = TorchModel(
        load_torch(run.merged, task, "cpu", "fp32", cfg.model.trust_remote_code),
        name="merged",
        task=task,
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        stop_ids=stop,
    )
    return examples, stop, model


def write_report_section(run: RunDir, title: str, body: list[str]) -> None:
    """Replace (or add) one ``## title`` section of exports/report.md, keeping the others."""
    path = run.exports / "report.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# Exports of {run.path.name}\n"
    sections = re.split(r"(?m)^(?=## )", text)
    head, rest = sections[0], [s for s in sections[1:] if not s.startswith(f"## {title}\n")]
    new = f"## {title}\n\n" + "\n".join(body).rstrip() + "\n\n"
    body_text = "".join(section.rstrip() + "\n\n" for section in sorted(rest + [new]))
    atomic_write_text(path, head.rstrip() + "\n\n" + body_text.rstrip() + "\n")
