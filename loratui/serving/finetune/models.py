"""The models jobs train from (a request's ``model``) and the models they make (``ft:<base>:<suffix>:<id>``,
and ``...:ckpt-step-<n>`` for each checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

from loratui.serving.errors import ApiError
from loratui.serving.finetune.records import JobRecord, JobStore
from loratui.serving.finetune.settings import JobSettings

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")


def base_of(model: str, settings: JobSettings, store: JobStore) -> tuple[str, str]:
    """(model.base for the job's config, the base's name in ``ft:<base>:...``) of a request's ``model``."""
    if model in settings.served_bases:
        return settings.served_bases[model], model
    if model.startswith("ft:"):  # a fine-tuned model: train on top of its merged weights
        return _merged_weights(model, store.all())
    from loratui.pipeline.models import BUILTINS

    own = settings.template.get("model", {}).get("base")
    if model in BUILTINS or (_HUB_ID.match(model) and not Path(model).exists()):
        return model, model
    if model == own:  # the job template's own base (which may be a path on the server)
        return model, Path(model).name if Path(model).exists() else model
    offered = [*settings.served_bases, *(b for b in BUILTINS)]
    raise ApiError(
        400,
        f"model: {model!r} is not a model this server fine-tunes: name a model it serves or "
        f"a built-in one ({', '.join(offered)}), a Hugging Face hub id (org/name), or an ft: "
        "model of a succeeded job",
        param="model",
        code="model_not_found",
    )


def _merged_weights(model: str, jobs: list[JobRecord]) -> tuple[str, str]:
    for job in jobs:
        if job.fine_tuned_model == model and job.status == "succeeded":
            merged = job.run_dir / "merged"
            if not (merged / "config.json").is_file():
                raise ApiError(400, f"model: {model} has no merged weights to train on", param="model")
            return str(merged), model.split(":")[1]
    raise ApiError(404, f"model: no succeeded job made {model!r}", param="model", code="model_not_found")


def fine_tuned(jobs: list[JobRecord]) -> dict[str, int]:
    """Model id -> when its job finished, for every succeeded job."""
    return {
        j.fine_tuned_model: j.finished_at or j.created_at
        for j in jobs
        if j.status == "succeeded" and j.fine_tuned_model
    }


def source(model: str, jobs: list[JobRecord]) -> tuple[Path, Path | None, str] | None:
    """What serves ``model``: (the run directory, or the base for a checkpoint; the checkpoint or None;
    the job's ``model.base``), or None when no job made it."""
    name, _, ckpt = model.partition(":ckpt-step-")
    if ckpt and not ckpt.isdigit():
        return None
    for job in jobs:
        if job.model_name() != name:
            continue
        if not ckpt:
            return (job.run_dir, None, job.base) if job.status == "succeeded" else None
        path = job.run_dir / "checkpoints" / f"checkpoint-{ckpt}"
        return (job.run_dir, path, job.base) if (path / "adapter_config.json").is_file() else None
    return None
