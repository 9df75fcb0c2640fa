"""The steps of the workflow, importable without any dependency (the CLI builds --help from it)."""

from __future__ import annotations

# The six steps, in order; the TUI shows all six.
STEP_ORDER: tuple[str, ...] = ("data", "train", "evaluate", "merge", "export", "serve")

# Implemented steps: name -> "module:function" with the signature of loratui.pipeline.steps.StepFn.
# The CLI offers a subcommand for each entry.
STEPS: dict[str, str] = {}

# One line of --help per step.
STEP_HELP: dict[str, str] = {}
