"""What a job's run directory says: its events, checkpoints and adapter version, read for the job's answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratui.serving.finetune.records import JobError, JobRecord
from loratui.serving.finetune.steps import complete_checkpoints

if TYPE_CHECKING:
    from loratui.pipeline.events import Event


def run_events(job: JobRecord) -> list[Event]:
    from loratui.pipeline.events import read_events

    path = job.run_dir / "events.jsonl"
    return read_events(path) if path.is_file() else []


def checkpoints(job: JobRecord) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return complete_checkpoints(job.run_dir / "checkpoints")


def latest_checkpoint(job: JobRecord) -> Path | None:
    found = checkpoints(job)
    return found[-1] if found else None


def resolved(job: JobRecord, template: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters the run trained with (its current adapter version), else as asked."""
    from loratui.pipeline.runs import RunDir
    from loratui.pipeline.train.history import current_version

    asked = job.hyperparameters.model_dump()
    try:
        version = current_version(RunDir(job.run_dir))
    except (OSError, ValueError, KeyError):
        version = None
    if not version:
        return asked
    epochs = version.epochs
    if epochs is not None:
        asked["n_epochs"] = int(epochs) if float(epochs).is_integer() else epochs
    if version.effective_batch is not None:
        asked["batch_size"] = version.effective_batch  # examples per optimizer step, as OpenAI counts
    template_lr = float(template.get("train", {}).get("lr", 2e-4))
    if version.lr is not None and template_lr:
        asked["learning_rate_multiplier"] = round(version.lr / template_lr, 6)
    return asked


def step_metrics(events: list[Event]) -> str:
    """The job's result file, as OpenAI's: one CSV row per logged training step (and its validation loss)."""
    rows: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.step == "train" and event.type == "metric" and event.at is not None:
            row = rows.setdefault(event.at, {})
            for ours, theirs in (("loss", "train_loss"), ("eval_loss", "valid_loss"), ("lr", "learning_rate")):
                if ours in event.values:
                    row[theirs] = event.values[ours]
    columns = ("step", "train_loss", "valid_loss", "learning_rate")
    lines = [",".join(columns)]
    for step in sorted(rows):  # a resumed stretch repeats steps after its checkpoint: the later values win
        lines.append(",".join([str(step)] + [f"{rows[step][c]:.6g}" if c in rows[step] else "" for c in columns[1:]]))
    return "\n".join(lines) + "\n"


def trained_tokens(events: list[Event]) -> int | None:
    """Tokens trained on, over every stretch of training (a resumed one counts from its checkpoint)."""
    total = last = 0
    for event in events:
        if event.step != "train":
            continue
        if event.type == "metric" and "tokens" in event.values:
            last = int(event.values["tokens"])
        elif event.type == "done":
            total += int(event.summary.get("tokens", last))
            last = 0
        elif event.type in ("cancelled", "error"):
            total, last = total + last, 0
    return total or None


def failure(events: list[Event], log: Path, code: int) -> JobError:
    """The error of a job whose process failed: the run's last error event, else the end of its ``log``."""
    for event in reversed(events):
        if event.type == "error":
            message = event.message + (f" ({event.hint})" if event.hint else "")
            param = "training_file" if event.step == "data" else None
            return JobError(code=f"{event.step}_failed", message=message, param=param)
    tail = ""
    if log.is_file():
        tail = " ".join(log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:])[-600:]
    reason = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return JobError(
        code="process_failed", message=f"the job's process {reason}" + (f": {tail}" if tail else ""), param=None
    )


def checkpoint_metrics(path: Path, step: int) -> dict[str, Any]:
    """The training and validation loss logged up to ``step``, from the checkpoint's trainer state."""
    try:
        history = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError):
        history = []
    metrics: dict[str, Any] = {"step": float(step)}
    for entry in history:
        if entry.get("step", 0) <= step:
            if "loss" in entry:
                metrics["train_loss"] = entry["loss"]
            if "eval_loss" in entry:
                metrics["valid_loss"] = entry["eval_loss"]
    return metrics
