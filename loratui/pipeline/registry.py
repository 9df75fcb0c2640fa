"""The steps of the workflow, importable without any dependency (the CLI builds --help from it)."""

from __future__ import annotations

# The six steps, in order; the TUI shows all six.
STEP_ORDER: tuple[str, ...] = ("data", "train", "evaluate", "merge", "export", "serve")

# Implemented steps: name -> "module:function" with the signature of loratui.pipeline.steps.StepFn.
# The CLI offers a subcommand for each entry.
STEPS: dict[str, str] = {
    "data": "loratui.pipeline.data.step:run",
}

# One line of --help per step.
STEP_HELP: dict[str, str] = {
    "data": "load, validate, template and split the training data (add `preview` to show examples)",
}

# Actions a step accepts as its first word (`loratui data preview`): run the step (cached), then this.
STEP_ACTIONS: dict[str, dict[str, str]] = {
    "data": {"preview": "loratui.pipeline.data.step:show_preview"},
}
