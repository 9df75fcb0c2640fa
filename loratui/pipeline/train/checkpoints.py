"""Training checkpoints of a run (``checkpoints/checkpoint-<step>/``): which are complete, which one to resume."""

from __future__ import annotations

import json
from pathlib import Path

from loratui.pipeline.config import RunConfig
from loratui.pipeline.errors import LoratuiError
from loratui.pipeline.runs import RunDir
from loratui.pipeline.train import settings


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in step order that were fully written (the Trainer writes trainer_state.json last)."""
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        step = path.name.rpartition("-")[2]
        if step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    """The last complete checkpoint in ``folder``, None when there is none."""
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def resolve_resume(cfg: RunConfig, run: RunDir) -> Path | None:
    """The checkpoint ``train.resume`` names (``true``/``latest``: the last complete one), None to start over."""
    want = cfg.train.resume
    if want is False or want in ("false", ""):
        return None
    if want is True or want in ("true", "latest"):
        latest = latest_checkpoint(run.checkpoints)
        if latest is None:
            raise LoratuiError(
                f"{run.checkpoints}: no complete checkpoint to resume from",
                hint="Train without --resume to start over.",
            )
        return latest
    path = Path(str(want))
    if not path.is_absolute() and not path.exists():
        path = run.checkpoints / path
    if not (path / "trainer_state.json").is_file():
        raise LoratuiError(
            f"{path}: not a complete training checkpoint (no trainer_state.json)",
            hint=f"Checkpoints of this run: {', '.join(p.name for p in complete_checkpoints(run.checkpoints)) or 'none'}",
        )
    return path


def settings_of_checkpoint(resume: Path, resolved: settings.Resolved) -> settings.Resolved:
    """Micro-batch and accumulation as the checkpoint was trained (a resume must not change them)."""
    state = json.loads((resume / "trainer_state.json").read_text())
    micro = state.get("train_batch_size")
    if micro and micro != resolved["train.batch_size"]:
        resolved.set("train.batch_size", micro, f"as in {resume.name}")
    return resolved
