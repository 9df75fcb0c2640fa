"""The commands that run a model: ``serve``, and the resumable batch commands ``generate`` and ``score``.

Each command imports what it needs when it runs, so that ``loratui --help`` stays light.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from loratui.cli.output import log

if TYPE_CHECKING:
    from rich.console import Console

    from loratui.pipeline.config import RunConfig

# work(progress, should_stop) of a batch command: progress(done, total), returns the summary
BatchWork = Callable[[Callable[[int, int], None], Callable[[], bool]], dict[str, Any]]


def run_batch(label: str, verb: str, console: Console, work: BatchWork) -> int:
    """A resumable batch command (score, generate): Ctrl-C or SIGTERM stops it between chunks, a rich bar
    shows progress, one line sums up. ``work(progress, should_stop)`` returns the summary."""
    import signal
    from types import FrameType

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    stop = {"asked": False}

    def ask_stop(signum: int, frame: FrameType | None) -> None:
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


def cmd_score(args: argparse.Namespace) -> int:
    from rich.console import Console

    from loratui.serving.score import score_file

    console = Console(stderr=True)
    return run_batch(
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


class ServeTarget(NamedTuple):
    """What serve and generate run."""

    path: Path  # a run directory or one artifact
    cfg: RunConfig
    base: Path | None  # the run's base model directory when nothing was merged
    fmt: str
    source: str | None  # the built-in name or hub id the target was resolved from


def _run_base(cfg: RunConfig) -> Path:
    from loratui.pipeline.models import resolve_model

    return resolve_model(cfg.model.base, revision=cfg.model.revision).path


def serve_target(args: argparse.Namespace) -> ServeTarget:
    """The target of serve and generate: the one given, else serve.artifact, else the run of --config."""
    from loratui.pipeline.config import BACKEND_FORMAT, load_config
    from loratui.pipeline.runs import RunDir
    from loratui.serving.selection import nothing_to_serve, resolve_target

    given = Path(args.target).expanduser() if args.target else None
    config_file = args.config or (str(given / "config.yaml") if given and (given / "config.yaml").is_file() else None)
    cfg = load_config(config_file, [])
    fmt = args.fmt or BACKEND_FORMAT.get(cfg.serve.backend, cfg.serve.backend)
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
        base = _run_base(cfg)
    return ServeTarget(target, cfg, base, fmt, source)


def _adapters(specs: list[str]) -> dict[str, Path]:
    """``--adapter NAME=PATH`` options by name."""
    from loratui.pipeline.errors import LoratuiError

    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LoratuiError(f"--adapter {spec!r}: expected NAME=PATH")
        adapters[name] = Path(path)
    return adapters


def cmd_serve(args: argparse.Namespace) -> int:
    import shlex

    from loratui.serving.server import ServeOptions, api_key_from, is_loopback, serve
    from loratui.serving.state import Limits

    target, cfg, base, fmt, source = serve_target(args)
    adapters = _adapters(args.adapter)
    run = (target / "config.yaml").is_file()
    if adapters and run:  # adapters go on the run's base, not on its merged model
        base = _run_base(cfg)
    s = cfg.serve
    host = args.host or s.host
    ui = args.ui if args.ui is not None else (is_loopback(host) if s.ui == "auto" else bool(s.ui))
    opts = ServeOptions(
        target=target,
        fmt=fmt,
        host=host,
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
        jobs=job_settings(args, cfg, target) if s.fine_tuning else None,
        max_loaded_models=s.max_loaded_models,
        source=source,
        engine=args.engine or s.engine,
        vllm_args=shlex.split(args.vllm_args) if args.vllm_args is not None else list(s.vllm_args),
        vllm_python=s.vllm_python,
        vllm_url=args.vllm_url or s.vllm_url,
        ui=ui,
        # with --adapter, the run's base is already served (as the run's name)
        base_model=cfg.model.base if run and s.compare_base and not adapters else None,
    )
    serve(opts, log=log)
    return 0


def job_settings(args: argparse.Namespace, cfg: RunConfig, target: Path) -> Any:
    """The fine-tuning API's settings: jobs start from the --config file (else the defaults), and their runs go
    beside the served run (else to runs_dir)."""
    import os

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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from loratui.serving.generate import Settings, generate_file
    from loratui.serving.selection import choose
    from loratui.serving.server import ServeOptions, build_backend

    target, cfg, base, fmt, _source = serve_target(args)
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
        return run_batch(
            "generate",
            "generated",
            console,
            lambda progress, should_stop: generate_file(
                backend,
                Path(args.input),
                Path(args.output),
                settings,
                workers=s.max_batch_size,  # every backend batches
                progress=progress,
                should_stop=should_stop,
            ),
        )
    finally:
        backend.close()
