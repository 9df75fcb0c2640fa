"""The ``loratui`` command. No arguments: the TUI. Subcommands: headless steps and tools.

Start-up stays light: the modules of this package import only the standard library at the top; each command
imports what it needs (``loratui --help`` never imports torch, pydantic or textual).
``parser`` builds the arguments, ``commands`` runs the pipeline and the TUI, ``serve`` runs models.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from loratui.cli.commands import (
    cmd_config,
    cmd_estimate,
    cmd_inspect,
    cmd_models,
    cmd_open,
    cmd_run,
    cmd_step,
    cmd_tui,
)
from loratui.cli.output import report_error
from loratui.cli.parser import build_parser
from loratui.cli.serve import cmd_generate, cmd_score, cmd_serve
from loratui.pipeline import device as _device  # noqa: F401  on macOS: PYTORCH_ENABLE_MPS_FALLBACK before torch

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "config": cmd_config,
    "estimate": cmd_estimate,
    "inspect": cmd_inspect,
    "models": cmd_models,
    "score": cmd_score,
    "serve": cmd_serve,
    "run": cmd_run,
    "generate": cmd_generate,
    "tui": cmd_tui,
    "open": cmd_open,
}


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    # `loratui` and `loratui --config x.yaml k=v` open the TUI
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["tui", *argv]
    parser = build_parser()
    # overrides may stand on both sides of options (`data preview -n 2 --config x.yaml train.lr=1`)
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.version:
        from loratui import __version__

        print(f"loratui {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    from loratui.pipeline.train.quiet import quiet_bitsandbytes

    quiet_bitsandbytes()  # every command that may load peft (serve, export, score ...), not only the steps
    try:
        if getattr(args, "step", None):
            return cmd_step(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user errors carry their own exit code and hint
        from loratui.pipeline.errors import LoratuiError

        if not isinstance(e, LoratuiError):
            raise
        report_error(e)
        return e.exit_code
