"""User-facing errors. The CLI prints their message (no traceback) and exits with ``exit_code``."""

from __future__ import annotations

from typing import Any


class LoratuiError(Exception):
    """A problem the user can fix: bad input, a missing file, an unreachable model.

    ``hint`` says what to do about it; it is printed on its own line.
    """

    exit_code = 2  # bad input; 1 is kept for internal errors (bugs)

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ModelNotFound(LoratuiError):
    """``model.base`` names nothing that can be loaded here."""


class StepCancelled(Exception):
    """Raised inside a step when ``should_stop()`` turned true; the runner reports it as cancelled."""


class ExportRefused(LoratuiError):
    """An export whose file failed its verification: nothing of it was written. The export step reports it
    (with its figures) and goes on with the other formats; the run keeps what passed."""

    row: Any = None  # the refused file's row of the exports report, where the exporter measured one
    replies: Any = None  # its greedy replies, for the report
