"""What the fine-tuning API uses of the pipeline's step modules, imported here and nowhere else in this package.

The imports happen on first use: a server that never checks an upload does not load the data step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loratui.pipeline.config import RunConfig
    from loratui.pipeline.data.read import BuildFindings


def read_rows(cfg: RunConfig, path: Path) -> tuple[int, BuildFindings]:
    """The data step's reading and row checks of one training file: (usable examples, what was found)."""
    from loratui.pipeline.data.read import BuildFindings, read_examples

    findings = BuildFindings()
    examples = read_examples(cfg, [path], findings, "train")
    return len(examples), findings


def complete_checkpoints(folder: Path) -> list[Path]:
    """The run's fully written checkpoints under ``folder``, in step order."""
    from loratui.pipeline.train.checkpoints import complete_checkpoints as found

    return found(folder)
