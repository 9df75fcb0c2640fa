"""OpenAI's shapes of what the fine-tuning API answers: the job object, job events, checkpoints, cursor pages.

No server path reaches a client: texts go through a cleaner (:func:`client_text`) that puts the client's names
for uploads and the run's folder name in their place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loratui.pipeline.events import Artifact, Cancelled, Checkpoint, Done, Error, Event, Log, Metric
from loratui.serving.errors import ApiError
from loratui.serving.finetune.records import JobRecord
from loratui.serving.finetune.runs import checkpoint_metrics

_LIVE_OUTPUT_EVENTS = ("metric", "log", "artifact", "checkpoint", "done", "error", "cancelled")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"()]+/)+([^\s/'\"()]+)")
# (level, message, type, data) of a job event
Described = tuple[str, str, str, dict[str, Any] | None]


def page(items: list[dict[str, Any]], after: str | None, limit: int, most: int = 100) -> dict[str, Any]:
    """OpenAI's cursor page over ``items`` (already in the order the API lists them)."""
    if not 1 <= limit <= most:
        raise ApiError(400, f"limit: {limit} is out of range (1 to {most})", param="limit")
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"after: no item with id {after!r} in this list", param="after")
        start = ids.index(after) + 1
    chunk = items[start : start + limit]
    out: dict[str, Any] = {"object": "list", "data": chunk, "has_more": start + limit < len(items)}
    if chunk:
        out.update(first_id=chunk[0]["id"], last_id=chunk[-1]["id"])
    return out


def client_text(uploads: list[tuple[str, str]], run: Path) -> Callable[[str], str]:
    """A function that takes the server's paths out of a text: each upload (path, the client's name for it) by
    its name, the job's run by its folder's name (its files relative to it), any other absolute path by its
    last part."""

    def clean(text: str) -> str:
        for path, name in uploads:
            text = text.replace(path, name)
        text = text.replace(str(run) + os.sep, "").replace(str(run), run.name)
        return _ABSOLUTE_PATH.sub(lambda m: m.group(1), text)

    return clean


def public_job(
    job: JobRecord, hyper: dict[str, Any], checkpoint: Path | None, clean: Callable[[str], str]
) -> dict[str, Any]:
    """The job as OpenAI's API shows it, with ``hyper`` (the hyperparameters to show), plus loratui's own
    details under ``loratui``: the resumable ``checkpoint``."""
    error = job.error.model_dump() | {"message": clean(job.error.message or "")} if job.error else None
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": hyper,
        "model": job.model,
        "organization_id": "loratui",
        "result_files": job.result_files,
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "integrations": [],
        "estimated_finish": None,
        "metadata": job.metadata,
        "method": method_object(job, hyper),
        # the run by its folder's name under the server's runs directory: no server path reaches a client
        "loratui": {
            "run_dir": job.run_dir.name,
            "settings": job.settings,
            "base": clean(job.base),
            "started_at": job.started_at,
            "resumable_checkpoint": checkpoint.name if checkpoint else None,
        },
    }


def method_object(job: JobRecord, hyper: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``method`` of the job: its type and that method's hyperparameters, ``hyper`` plus DPO's beta (the
    one the job's config trains with, once its files are validated; as asked before)."""
    if job.method == "dpo":
        beta = job.beta if job.status == "validating_files" or job.train_beta is None else job.train_beta
        return {"type": "dpo", "dpo": {"hyperparameters": {**hyper, "beta": beta}}}
    return {"type": "supervised", "supervised": {"hyperparameters": hyper}}


def _event_object(event_id: str, t: float, described: Described) -> dict[str, Any]:
    level, message, kind, data = described
    return {
        "id": event_id,
        "object": "fine_tuning.job.event",
        "created_at": int(t),
        "level": level,
        "message": message,
        "data": data,
        "type": kind,
    }


def job_events(
    job: JobRecord, own: list[tuple[int, dict[str, Any]]], run: list[Event], clean: Callable[[str], str]
) -> list[dict[str, Any]]:
    """The job's events, newest first: its ``own`` (by line number: validated, queued, started ...) and its
    ``run``'s (metrics, logs, checkpoints, each step's end), without the progress ticks."""
    merged: list[tuple[float, int, dict[str, Any]]] = []
    for n, e in own:
        described = (e["level"], clean(e["message"]), e.get("type", "message"), e.get("data"))
        merged.append((e["t"], len(merged), _event_object(f"ftevent-{job.short_id}-j{n}", e["t"], described)))
    for n, event in enumerate(run):
        if event.type not in _LIVE_OUTPUT_EVENTS or (isinstance(event, Log) and event.level == "debug"):
            continue
        level, message, kind, data = describe(event, job.run_dir)
        described = (level, clean(message), kind, data)
        merged.append((event.t, len(merged), _event_object(f"ftevent-{job.short_id}-r{n}", event.t, described)))
    return [e for _, _, e in sorted(merged, key=lambda x: (x[0], x[1]), reverse=True)]


def describe(event: Event, run_dir: Path) -> Described:
    """One run event as a fine-tuning job event."""
    step = event.step
    if isinstance(event, Metric):
        return _metric(event)
    if isinstance(event, Log):
        message = event.message if event.message.startswith(f"{step}:") else f"{step}: {event.message}"
        return {"warning": "warn", "error": "error"}.get(event.level, "info"), message, "message", None
    if isinstance(event, Checkpoint):
        return "info", f"Checkpoint saved at step {event.at}", "message", {"step": event.at}
    if isinstance(event, Artifact):
        artifact = Path(event.path)
        where = artifact.relative_to(run_dir) if artifact.is_relative_to(run_dir) else artifact
        return "info", f"{step}: wrote {event.kind} {where}", "message", None
    if isinstance(event, Done):
        took = f" in {event.seconds:.1f} s" if event.seconds is not None else ""
        return "info", f"{step} done{took}", "message", None
    if isinstance(event, Error):
        return "error", f"{step}: {event.message}" + (f" ({event.hint})" if event.hint else ""), "message", None
    resume_from = event.resume_from if isinstance(event, Cancelled) else None
    resume = f"; resume from {Path(resume_from).name}" if resume_from else ""
    return "warn", f"{step} cancelled{resume}", "message", None


def _metric(event: Metric) -> Described:
    values = dict(event.values)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    if event.step == "train" and event.at is not None:
        data: dict[str, Any] = {"step": event.at}
        if "loss" in values:
            data["train_loss"] = values["loss"]
        if "eval_loss" in values:
            data["valid_loss"] = values["eval_loss"]
        data.update({k: v for k, v in values.items() if k not in ("loss", "eval_loss")})
        return "info", f"Step {event.at}: {shown}", "metrics", data
    split = f" ({event.split})" if event.split else ""
    return "info", f"{event.step}{split}: {shown}", "metrics", values


def checkpoint_objects(job: JobRecord, paths: list[Path]) -> list[dict[str, Any]]:
    """The run's complete checkpoints (``paths``, oldest first) newest first, each a model (base + adapter)."""
    out = []
    for path in paths:
        step = int(path.name.rpartition("-")[2])
        out.append(
            {
                "id": f"ftckpt-{job.short_id}-{step}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": int(path.stat().st_mtime),
                "fine_tuned_model_checkpoint": f"{job.model_name()}:ckpt-step-{step}",
                "fine_tuning_job_id": job.id,
                "metrics": checkpoint_metrics(path, step),
                "step_number": step,
            }
        )
    return out[::-1]
