"""The ``loratui`` command. No arguments: the TUI. Subcommands: headless steps and tools.

Start-up stays light: this module imports only the standard library at the top; each command
imports what it needs (``loratui --help`` never imports torch, pydantic or textual).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

EXAMPLES = """\
examples:
  loratui                                   open the terminal UI
  loratui open runs/quickstart              reopen a run in the terminal UI (its steps, jobs, results)
  loratui run examples/quickstart.yaml      every step in order; run it again to continue where it stopped
  loratui config show --config examples/quickstart.yaml train.lr=1e-4 lora.r=32
  loratui config validate my-run.yaml
  loratui config reference                  every config field with its default and description
  loratui models list --json
  loratui models prepare smollm2-135m-instruct
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    """What serve and generate run: a run or an artifact, its config, the runtime."""
    p.add_argument(
        "target",
        nargs="?",
        default=None,
        help="a run directory, a .gguf file, an ONNX export folder, a merged model directory, a built-in "
        "model (`loratui models list`; prepared if needed) or a hub id (org/name) "
        "(default: serve.artifact, else the run of --config)",
    )
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config: its run and serve.* settings")
    p.add_argument(
        "--format",
        dest="fmt",
        default=None,
        choices=["auto", "torch", "gguf", "onnx"],
        help="runtime (default: serve.backend, auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratui",
        description="Fine-tune, evaluate, merge, export and serve LoRA models. "
        "Run without arguments for the terminal UI.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tui = sub.add_parser("tui", help="open the terminal UI (the default)")
    _add_config_args(tui)

    opener = sub.add_parser("open", help="open a run (its folder or config file) in the terminal UI")
    opener.add_argument("target", help="a run directory (runs/<name>) or a config file")
    opener.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    config = sub.add_parser("config", help="show, validate or document the run config")
    csub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)
    validate = csub.add_parser(
        "validate",
        help="check a config file and that the local files it names exist; exit 2 with one line per problem",
        description="Checks the schema, then that the local files and folders the config "
        "names (model.base when a path, data.source, data.val_source, data.test_source, "
        "eval.retention_sources, lora.init_from, eval.model, merge.adapter, serve.artifact) "
        "exist. Relative paths resolve against the working directory, not the config "
        "file's folder.",
    )
    validate.add_argument("file", help="YAML config to check")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    validate.add_argument(
        "--no-files",
        action="store_true",
        help="check the schema only, not the files (a config meant for another machine)",
    )
    csub.add_parser("reference", help="print the config reference (Markdown) generated from the schema")

    models = sub.add_parser("models", help="list or prepare base models")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    mlist = msub.add_parser("list", help="built-in models and their local directories")
    mlist.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prep = msub.add_parser("prepare", help="import/download a model now (cached)")
    prep.add_argument("name", nargs="?", default=None, help="model.base value (default: the default model)")
    prep.add_argument("--json", action="store_true", help="print the resolved model as JSON")
    inspect = sub.add_parser(
        "inspect", help="show what a GGUF file holds: architecture, quantization, tokenizer, chat template"
    )
    inspect.add_argument("file", help="a .gguf file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    score = sub.add_parser(
        "score",
        help="log-likelihood and perplexity of every row of a JSONL file (ONNX, PyTorch or GGUF)",
        description="Batch scoring. Re-running the same command skips the ids already in --output; "
        "bad rows go to <output>.errors.jsonl.",
    )
    score.add_argument(
        "--model", required=True, metavar="PATH", help="an ONNX export folder, a merged model directory or a .gguf file"
    )
    score.add_argument("--input", required=True, metavar="FILE", help="JSONL rows to score")
    score.add_argument("--output", required=True, metavar="FILE", help="JSONL scores (appended; resumable)")
    score.add_argument(
        "--field",
        default="text",
        metavar="COLUMN[+COLUMN]",
        help="text column, or prompt+completion to also score the completion given the prompt (default: text)",
    )
    score.add_argument("--batch-size", type=int, default=16, metavar="N", help="rows per batch (default: 16)")
    score.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all)")
    srv = sub.add_parser(
        "serve",
        help="OpenAI-compatible server for a run or an artifact (GGUF, ONNX, merged)",
        description="Serves /v1/models, /v1/completions and /v1/chat/completions (streaming too), "
        "/health and /metrics, and OpenAI's files and fine-tuning jobs API (/v1/files, "
        "/v1/fine_tuning/jobs; serve.fine_tuning). --format auto: PyTorch with CUDA, else a GGUF in "
        "llama.cpp, else ONNX Runtime, else PyTorch; it prints what it chose and why.",
    )
    _add_target_args(srv)
    srv.add_argument("--host", default=None, help="address to bind (default: serve.host, 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="port (default: serve.port, 8000)")
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (also LORATUI_API_KEY)")
    srv.add_argument("--model-name", default=None, help="model id clients send (default: the run or file name)")
    srv.add_argument(
        "--allow-unauthenticated", action="store_true", help="allow a non-loopback --host without an API key"
    )
    srv.add_argument("--strict", action="store_true", help="fail instead of serving the base when the adapter fails")
    srv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve this adapter on the base as model NAME (repeatable; PyTorch); the base is served too",
    )
    gen = sub.add_parser(
        "generate",
        help="offline batch generation from a JSONL of prompts or chats (serve's backends)",
        description="Rows with `prompt` or `messages` (and optionally `id`) in, rows with id, text, "
        "finish_reason and token counts out. Resumable; bad rows go to <output>.errors.jsonl.",
    )
    _add_target_args(gen)
    gen.add_argument("--input", required=True, metavar="FILE", help="JSONL prompts or chats")
    gen.add_argument("--output", required=True, metavar="FILE", help="JSONL outputs (appended; resumable)")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="N", help="new tokens per row (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    runner = sub.add_parser(
        "run",
        help="every step of a config in order (data, train, eval, merge, export), skipping the ones already up to date",
        description="Runs data, train, eval, merge and export (when export.formats names one) "
        "in order. A step whose last run had the same inputs and whose outputs are on disk is "
        "skipped, so running the same config again continues where a crash or Ctrl-C stopped "
        "(an interrupted training resumes from its latest checkpoint).",
    )
    runner.add_argument("config", metavar="CONFIG", help="YAML config of the run")
    runner.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-4")
    runner.add_argument("--skip", type=_step_list, default=(), metavar="STEP[,STEP]", help="steps to leave out")
    runner.add_argument(
        "--force", type=_step_list, default=(), metavar="STEP[,STEP]", help="steps to run even when up to date"
    )
    runner.add_argument("--serve", action="store_true", help="then serve the run (as `loratui serve`) until Ctrl-C")
    runner.add_argument(
        "--events", choices=["jsonl", "none"], default="none", help="also print every event as a JSON line on stdout"
    )
    _add_step_parsers(sub)
    return parser


def _step_list(value: str) -> tuple[str, ...]:
    from loratui.pipeline.registry import STEPS

    steps = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step {', '.join(unknown)} (steps: {', '.join(STEPS)})")
    return steps


def _add_step_parsers(sub: Any) -> None:
    """One subcommand per implemented pipeline step (see loratui.pipeline.registry)."""
    from loratui.pipeline.registry import STEP_ACTIONS, STEP_COMMANDS, STEP_HELP, STEP_OPTIONS, STEPS

    for name in STEPS:
        actions = {**STEP_ACTIONS.get(name, {}), **STEP_COMMANDS.get(name, {})}
        usage = f"loratui {name} {'[' + '|'.join(actions) + '] ' if actions else ''}[--config FILE] [KEY=VALUE ...]"
        p = sub.add_parser(name, help=STEP_HELP.get(name, f"run the {name} step"), usage=usage)
        _add_config_args(p)
        p.add_argument(
            "--events",
            choices=["jsonl", "none"],
            default="none",
            help="also print every event as a JSON line on stdout (what the TUI reads)",
        )
        if STEP_ACTIONS.get(name):
            p.add_argument("-n", "--examples", type=int, default=None, help="how many examples to show (preview)")
        for flag, kwargs, _key in STEP_OPTIONS.get(name, []):
            p.add_argument(flag, default=None, **kwargs)
        p.set_defaults(step=name)


def _cmd_step(args: argparse.Namespace) -> int:
    """Run a step in-process: events to runs/<name>/events.jsonl, progress on stderr, JSONL on stdout."""
    from loratui.pipeline.config import load_config
    from loratui.pipeline.events import JsonlWriter, RichWriter
    from loratui.pipeline.registry import STEP_ACTIONS, STEP_COMMANDS, STEP_OPTIONS
    from loratui.pipeline.steps import load_action, load_command, load_step, run_step

    overrides = list(args.overrides)
    if overrides and overrides[0] in STEP_COMMANDS.get(args.step, {}):
        command = overrides.pop(0)
        words = [w for w in overrides if "=" not in w]
        cfg = load_config(args.config, [w for w in overrides if "=" in w])
        return load_command(args.step, command)(cfg, words)
    action = overrides.pop(0) if overrides and overrides[0] in STEP_ACTIONS.get(args.step, {}) else None
    for flag, _kwargs, key in STEP_OPTIONS.get(args.step, []):
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(args.config, overrides)
    writers: list[Any] = [RichWriter()]
    if args.events == "jsonl":
        writers.append(JsonlWriter(sys.stdout))
    code, _result, _events = run_step(args.step, load_step(args.step), cfg, writers=writers)
    if code == 0 and action:
        load_action(args.step, action)(cfg, args.examples)
    return code


def _err(message: str, hint: str | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        console.print(f"[dim]hint:[/] {escape(hint)}", soft_wrap=True)


def _cmd_config(args: argparse.Namespace) -> int:
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


def _cmd_models(args: argparse.Namespace) -> int:
    from loratui.pipeline import models

    if args.action == "list":
        rows = models.list_models()
        if args.json:
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
        if not _isatty(sys.stdout):  # a pipe or a file: whole paths, one tab-separated line per model
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
    name = args.name or models.DEFAULT_MODEL

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    resolved = models.resolve_model(name, log=log)
    print(json.dumps(resolved.to_dict(), indent=2) if args.json else f"{resolved.spec}: {resolved.path}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from loratui.exporters.gguf_info import render, summary

    info = summary(args.file)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def _run_batch(label: str, verb: str, console: Any, work: Callable[..., dict[str, Any]]) -> int:
    """A resumable batch command (score, generate): Ctrl-C or SIGTERM stops it between chunks, a rich bar
    shows progress, one line sums up. ``work(progress, should_stop)`` returns the summary."""
    import signal

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    stop = {"asked": False}

    def ask_stop(signum: int, frame: Any) -> None:
        stop["asked"] = True

    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(label, total=None)
        summary = work(lambda done, total: bar.update(task, completed=done, total=total), lambda: stop["asked"])
    console.print(
        f"{verb} {summary[verb]} rows -> {summary['output']}; {summary['skipped_done']} were already "
        f"there; {summary['bad']} bad rows -> {summary['errors']}"
        + (
            f"; stopped with {summary['remaining']} left: run the same command to go on" if summary["cancelled"] else ""
        ),
        highlight=False,
    )
    return 130 if summary["cancelled"] else 0


def _cmd_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from loratui.serving.score import score_file

    console = Console(stderr=True)
    return _run_batch(
        "score",
        "scored",
        console,
        lambda progress, should_stop: score_file(
            Path(args.model),
            Path(args.input),
            Path(args.output),
            args.field,
            args.batch_size,
            args.threads,
            progress=progress,
            should_stop=should_stop,
            log=lambda m: console.print(m, highlight=False),
        ),
    )


def _serve_target(args: argparse.Namespace) -> tuple[Any, Any, Any, str, str | None]:
    """(target path, config, base model directory or None, format, the built-in name or hub id the target was
    resolved from or None) for serve and generate."""
    from pathlib import Path

    from loratui.pipeline.config import BACKEND_FORMAT, load_config
    from loratui.pipeline.runs import RunDir
    from loratui.serving.selection import nothing_to_serve, resolve_target

    given = Path(args.target).expanduser() if args.target else None
    config_file = args.config or (str(given / "config.yaml") if given and (given / "config.yaml").is_file() else None)
    cfg = load_config(config_file, [])
    fmt = args.fmt or BACKEND_FORMAT.get(cfg.serve.backend, cfg.serve.backend)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    spec = args.target or cfg.serve.artifact
    if spec:
        resolved = resolve_target(spec, fmt, log)
        target, source = resolved.path, resolved.model
        if source is not None:
            log(f"{args.command}: {source} is {target}")
    else:
        target, source = RunDir.for_config(cfg).path, None
        if not target.exists():
            raise nothing_to_serve(target, config_file)
    base = None
    if (target / "config.yaml").is_file() and not (target / "merged" / "config.json").is_file():
        from loratui.pipeline.models import resolve_model

        base = resolve_model(cfg.model.base, revision=cfg.model.revision).path
    return target, cfg, base, fmt, source


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loratui.pipeline.errors import LoratuiError
    from loratui.serving.app import Limits
    from loratui.serving.server import ServeOptions, api_key_from, serve

    target, cfg, base, fmt, source = _serve_target(args)
    adapters = {}
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LoratuiError(f"--adapter {spec!r}: expected NAME=PATH")
        adapters[name] = Path(path)
    if adapters and (target / "config.yaml").is_file():  # adapters go on the run's base, not on its merged model
        from loratui.pipeline.models import resolve_model

        base = resolve_model(cfg.model.base, revision=cfg.model.revision).path
    s = cfg.serve
    opts = ServeOptions(
        target=target,
        fmt=fmt,
        host=args.host or s.host,
        port=args.port or s.port,
        api_key=api_key_from(args.api_key, s.api_key),
        allow_unauthenticated=args.allow_unauthenticated,
        strict=args.strict,
        model_id=args.model_name or s.model_name,
        context_length=s.context_length,
        max_batch_size=s.max_batch_size,
        threads=s.threads,
        base=base,
        limits=Limits(max_tokens=s.max_tokens, max_queue=s.max_queue, max_upload_bytes=s.max_upload_mb << 20),
        adapters=adapters or None,
        jobs=_job_settings(args, cfg, target) if s.fine_tuning else None,
        max_loaded_models=s.max_loaded_models,
        source=source,
    )
    serve(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def _job_settings(args: argparse.Namespace, cfg: Any, target: Any) -> Any:
    """The fine-tuning API's settings: jobs start from the --config file (else the defaults), and their runs go
    beside the served run (else to runs_dir)."""
    import os
    from pathlib import Path

    from loratui.pipeline.config import load_config
    from loratui.serving.finetune import JobSettings

    template = load_config(args.config, [])  # no --config: the defaults
    runs_dir = (target.parent if (target / "config.yaml").is_file() else Path(cfg.runs_dir)).resolve()
    root = Path(cfg.serve.jobs_dir).resolve() if cfg.serve.jobs_dir else runs_dir / ".fine_tuning"
    import torch

    count = torch.cuda.device_count()
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    gpus = (visible or [str(i) for i in range(count)])[:count]  # slot i trains on gpus[i]
    slots = max(1, count) if cfg.serve.job_slots == "auto" else cfg.serve.job_slots
    return JobSettings(
        root=root, runs_dir=runs_dir, template=template.model_dump(mode="json"), slots=int(slots), gpus=gpus
    )


def _cmd_run(args: argparse.Namespace) -> int:
    """Every step of the config in order (loratui.pipeline.run_all), then optionally serve."""
    from rich.console import Console
    from rich.table import Table

    from loratui.pipeline.config import load_config
    from loratui.pipeline.events import JsonlWriter, RichWriter
    from loratui.pipeline.run_all import run_all

    cfg = load_config(args.config, list(args.overrides))
    console = Console(stderr=True)
    writers: list[Any] = [RichWriter()]
    if args.events == "jsonl":
        writers.append(JsonlWriter(sys.stdout))

    def announce(i: int, total: int, step: str, what: str) -> None:
        console.rule(f"[bold]{i}/{total} {step}[/]: {what}", align="left")

    code, outcomes = run_all(cfg, writers=writers, skip=args.skip, force=args.force, announce=announce)
    table = Table(title=f"run {cfg.name} ({cfg.run_dir})", title_justify="left")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    colors = {"ran": "green", "resumed": "green", "skipped": "dim", "failed": "red", "cancelled": "yellow"}
    for o in outcomes:
        table.add_row(o.step, f"[{colors.get(o.status, 'dim')}]{o.status}[/]", f"{o.seconds:.1f}" if o.seconds else "")
    console.print(table)
    if code != 0 or not args.serve:
        return code
    return main(["serve", str(cfg.run_dir), "--config", args.config])


def _cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from rich.console import Console

    from loratui.serving.generate import Settings, generate_file
    from loratui.serving.selection import choose
    from loratui.serving.server import ServeOptions, build_backend

    target, cfg, base, fmt, _source = _serve_target(args)
    console = Console(stderr=True)
    choice = choose(target, fmt, torch.cuda.is_available(), base)
    console.print(f"generate: {choice.reason}", highlight=False)
    s = cfg.serve
    opts = ServeOptions(
        target=target, fmt=fmt, context_length=s.context_length, max_batch_size=s.max_batch_size, threads=s.threads
    )
    backend = build_backend(choice, opts, "generate")
    settings = Settings(args.max_tokens, args.temperature, args.top_p, args.seed, args.stop)
    try:
        return _run_batch(
            "generate",
            "generated",
            console,
            lambda progress, should_stop: generate_file(
                backend,
                Path(args.input),
                Path(args.output),
                settings,
                workers=s.max_batch_size if backend.kind == "torch" else 1,
                progress=progress,
                should_stop=should_stop,
            ),
        )
    finally:
        backend.close()


def _need_terminal(config: str | None, overrides: list[str]) -> None:
    """The TUI reads keys from stdin and draws on stdout: without a terminal on both (a script, a CI log,
    ``make run < /dev/null``) it cannot work, so say so at once, before textual is imported."""
    missing = [name for name, stream in (("stdin", sys.stdin), ("stdout", sys.stdout)) if not _isatty(stream)]
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


def _isatty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _cmd_tui(args: argparse.Namespace) -> int:
    _need_terminal(args.config, args.overrides)
    from loratui.pipeline.config import load_config
    from loratui.tui.app import create_app

    cfg = load_config(args.config, args.overrides)
    create_app(cfg, config_path=args.config, overrides=args.overrides).run()
    return 0


def _cmd_open(args: argparse.Namespace) -> int:
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "config": _cmd_config,
    "inspect": _cmd_inspect,
    "models": _cmd_models,
    "score": _cmd_score,
    "serve": _cmd_serve,
    "run": _cmd_run,
    "generate": _cmd_generate,
    "tui": _cmd_tui,
    "open": _cmd_open,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
            return _cmd_step(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user errors carry their own exit code and hint
        from loratui.pipeline.errors import LoratuiError

        if not isinstance(e, LoratuiError):
            raise
        _report(e)
        return e.exit_code


def _report(e: Any) -> None:
    problems = getattr(e, "problems", None)
    if problems:
        for p in problems:
            _err(str(p))
        if len(problems) > 1:
            print(f"{len(problems)} problems", file=sys.stderr)
    else:
        _err(e.message, e.hint)


if __name__ == "__main__":
    raise SystemExit(main())
