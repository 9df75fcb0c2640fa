"""How the server runs fine-tuning jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class JobSettings:
    """Where jobs keep their files and runs, what config they start from, and how many run at once."""

    root: Path  # the jobs folder
    runs_dir: Path  # where each job's run directory goes
    template: dict[str, Any]  # the run config every job starts from (RunConfig.model_dump(mode="json"))
    slots: int = 1  # jobs running at once
    gpus: list[str] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES for slot i: gpus[i] (empty: leave it)
    served_bases: dict[str, str] = field(default_factory=dict)  # served model id -> model.base for jobs naming it
    grace_s: float = 120.0  # SIGTERM, then SIGKILL after this long
    command: list[str] = field(default_factory=lambda: ["-m", "loratui"])  # after the Python executable
