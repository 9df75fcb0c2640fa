"""The commands around the pipeline: a step, every step (``run``), config, models, inspect, and the TUI.

Each command imports what it needs when it runs, so that ``loratui --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from loratui.cli.output import isatty, log

if TYPE_CHECKING:
    from rich.table import Table

    from loratui.pipeline.events import Writer
    from loratui.pipeline.run_all import Outcome


def event_writers(events: str) -> list[Writer]:
    """Progress on stderr for people, and with ``--events jsonl`` every event as a JSON line on stdout."""
    from loratui.pipeline.events import JsonlWriter, RichWriter

    writers: list[Writer] = [RichWriter()]
    if events == "jsonl":
        writers.append(JsonlWriter(sys.stdout))
    return writers


def cmd_step(args: argparse.Namespace) -> int:
    """Run a step in-process: events to runs/<name>/events.jsonl, progress on stderr, JSONL on stdout."""
    from loratui.pipeline.config import load_config
    from loratui.pipeline.registry import STEP_ACTIONS, STEP_COMMANDS
    from loratui.pipeline.steps import load_action, load_step, run_step

    overrides = list(args.overrides)
    if overrides and overrides[0] in STEP_COMMANDS.get(args.step, {}):
        return _step_command(args.step, args.config, overrides)
    action = overrides.pop(0) if overrides and overrides[0] in STEP_ACTIONS.get(args.step, {}) else None
    cfg = load_config(args.config, [*overrides, *_option_overrides(args)])
    flagged = _step_flag(args)
    if flagged is not None:  # a flag that replaces running the step (`loratui train --print-launch slurm`)
        fn, value = flagged
        return fn(cfg, value, args.config, [*overrides, *_option_overrides(args)])
    code, _result, _events = run_step(args.step, load_step(args.step), cfg, writers=event_writers(args.events))
    if code == 0 and action:
        load_action(args.step, action)(cfg, args.examples)
    return code


def _step_command(step: str, config: str | None, words: list[str]) -> int:
    """A command that replaces running the step (``loratui train rollback 2``): its words and its overrides."""
    from loratui.pipeline.config import load_config
    from loratui.pipeline.steps import load_command

    command, *rest = words
    cfg = load_config(config, [w for w in rest if "=" in w])
    return load_command(step, command)(cfg, [w for w in rest if "=" not in w])


def _step_flag(args: argparse.Namespace) -> tuple[Callable[..., int], str] | None:
    """The first of the step's flags in registry.STEP_FLAGS given on the command line: its function and value."""
    import importlib

    from loratui.pipeline.registry import STEP_FLAGS

    for flag, _kwargs, ref in STEP_FLAGS.get(args.step, []):
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            module, _, name = ref.partition(":")
            fn: Callable[..., int] = getattr(importlib.import_module(module), name)
            return fn, value
    return None


def _option_overrides(args: argparse.Namespace) -> list[str]:
    """The step's own options (registry.STEP_OPTIONS) given on the command line, as ``key=value`` overrides."""
    from loratui.pipeline.registry import STEP_OPTIONS

    overrides = []
    for flag, _kwargs, key in STEP_OPTIONS.get(args.step, []):
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def cmd_config(args: argparse.Namespace) -> int:
    from loratui.pipeline.config import config_reference_markdown, load_config

    if args.action == "reference":
        sys.stdout.write(config_reference_markdown())
        return 0
    path = args.file if args.action == "validate" else args.config
    cfg = load_config(path, args.overrides)
    if args.action == "show":
        sys.stdout.write(cfg.to_yaml())
        return 0
    if not args.no_files:
        from loratui.pipeline.config import ConfigError, check_local_paths

        problems = check_local_paths(cfg, path, args.overrides)
        if problems:
            raise ConfigError(problems)
    print(f"{path}: ok")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from loratui.pipeline import models

    if args.action == "list":
        return _list_models(args.json)
    resolved = models.resolve_model(args.name or models.DEFAULT_MODEL, log=log)
    print(json.dumps(resolved.to_dict(), indent=2) if args.json else f"{resolved.spec}: {resolved.path}")
    return 0


def _list_models(as_json: bool) -> int:
    from loratui.pipeline import models

    rows = models.list_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    cells = [
        (
            r["name"] + (" (default)" if r["default"] else ""),
            r["source"],
            "yes" if r["prepared"] else "no",
            r["path"] or "-",
        )
        for r in rows
    ]
    if not isatty(sys.stdout):  # a pipe or a file: whole paths, one tab-separated line per model
        for line in [("name", "source", "prepared", "path"), *cells]:
            print("\t".join(line))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("name", "source", "prepared", "path"):  # a narrow terminal wraps names, never cuts them
        table.add_column(column, overflow="fold")
    for row in cells:
        table.add_row(*row)
    Console().print(table)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from loratui.exporters.gguf_info import render, summary

    info = summary(args.file)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Every step of the config in order (loratui.pipeline.run_all), then optionally serve."""
    from rich.console import Console

    from loratui.pipeline.config import load_config
    from loratui.pipeline.run_all import run_all

    cfg = load_config(args.config, list(args.overrides))
    console = Console(stderr=True)

    def announce(i: int, total: int, step: str, what: str) -> None:
        console.rule(f"[bold]{i}/{total} {step}[/]: {what}", align="left")

    writers = event_writers(args.events)
    code, outcomes = run_all(cfg, writers=writers, skip=args.skip, force=args.force, announce=announce)
    console.print(_outcomes_table(f"run {cfg.name} ({cfg.run_dir})", outcomes))
    if code != 0 or not args.serve:
        return code
    from loratui.cli import main

    return main(["serve", str(cfg.run_dir), "--config", args.config])


def cmd_estimate(args: argparse.Namespace) -> int:
    """Print the estimate panel (or JSON); exit 3 when the run does not fit."""
    from rich.console import Console

    from loratui.pipeline.config import load_config
    from loratui.pipeline.estimate.plan import estimate
    from loratui.pipeline.events import EventSink
    from loratui.pipeline.steps import StopFlag

    cfg = load_config(args.config, list(args.overrides))
    stop = StopFlag()
    restore = stop.install()
    try:
        result = estimate(
            cfg, probe=not args.no_probe, events=EventSink("estimate", event_writers("rich")), should_stop=stop
        )
    finally:
        restore()
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        Console().print(result.renderable())
    return 0 if result.fits else 3


def _outcomes_table(title: str, outcomes: list[Outcome]) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    colors = {"ran": "green", "resumed": "green", "skipped": "dim", "failed": "red", "cancelled": "yellow"}
    for o in outcomes:
        table.add_row(o.step, f"[{colors.get(o.status, 'dim')}]{o.status}[/]", f"{o.seconds:.1f}" if o.seconds else "")
    return table


def _need_terminal(config: str | None, overrides: list[str]) -> None:
    """The TUI reads keys from stdin and draws on stdout: without a terminal on both (a script, a CI log,
    ``make run < /dev/null``) it cannot work, so say so at once, before textual is imported."""
    missing = [name for name, stream in (("stdin", sys.stdin), ("stdout", sys.stdout)) if not isatty(stream)]
    if not missing:
        return
    import shlex

    from loratui.pipeline.errors import LoratuiError

    run = shlex.join(["loratui", "run", config or "examples/quickstart.yaml", *overrides])
    raise LoratuiError(
        f"the terminal UI needs a terminal, but {' and '.join(missing)} "
        f"{'is not a terminal' if len(missing) == 1 else 'are not terminals'} (a pipe, a file or /dev/null)",
        hint=f"Run the steps headless instead: `{run}`; `loratui --help` lists every command.",
    )


def cmd_tui(args: argparse.Namespace) -> int:
    _need_terminal(args.config, args.overrides)
    from loratui.pipeline.config import load_config
    from loratui.tui.app import create_app

    cfg = load_config(args.config, args.overrides)
    create_app(cfg, config_path=args.config, overrides=args.overrides).run()
    return 0


def cmd_open(args: argparse.Namespace) -> int:
    from loratui.pipeline.errors import LoratuiError
    from loratui.tui.state import open_run

    try:
        path, overrides, cfg = open_run(args.target, args.overrides)
    except FileNotFoundError as e:
        raise LoratuiError(str(e), hint="Give a run folder (runs/<name>) or a config file.") from None
    _need_terminal(str(path), overrides)
    from loratui.tui.app import create_app

    create_app(cfg, config_path=path, overrides=overrides).run()
    return 0
