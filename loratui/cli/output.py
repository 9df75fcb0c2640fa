"""How the commands talk to the terminal: log lines and errors on stderr, and whether a stream is a terminal."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from loratui.pipeline.errors import LoratuiError


def log(message: str) -> None:
    """One progress line on stderr (stdout stays for the command's output)."""
    print(message, file=sys.stderr, flush=True)


def isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _err(message: str, hint: str | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        console.print(f"[dim]hint:[/] {escape(hint)}", soft_wrap=True)


def report_error(e: LoratuiError) -> None:
    """A user error as the CLI prints it: one line per config problem (and their count), else message and hint."""
    problems = getattr(e, "problems", None)
    if problems:
        for p in problems:
            _err(str(p))
        if len(problems) > 1:
            print(f"{len(problems)} problems", file=sys.stderr)
    else:
        _err(e.message, e.hint)
