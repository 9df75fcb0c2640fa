"""The ``loratui`` argument parser: one builder per subcommand. Standard library only at module level."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

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
  loratui estimate --config examples/quickstart.yaml --no-probe
"""

if TYPE_CHECKING:  # what `add_subparsers` returns: generic only in typeshed, private in argparse
    from typing import TypeAlias

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


# help and description of the commands that have a page of their own (`loratui NAME --help`)
COMMAND_TEXT: dict[str, tuple[str, str]] = {
    "score": (
        "log-likelihood and perplexity of every row of a JSONL file (ONNX, PyTorch or GGUF)",
        "Batch scoring. Re-running the same command skips the ids already in --output; "
        "bad rows go to <output>.errors.jsonl.",
    ),
    "serve": (
        "OpenAI-compatible server for a run or an artifact (GGUF, ONNX, merged)",
        "Serves /v1/models, /v1/completions and /v1/chat/completions (streaming too), "
        "/health and /metrics, and OpenAI's files and fine-tuning jobs API (/v1/files, "
        "/v1/fine_tuning/jobs; serve.fine_tuning). --format auto: PyTorch with CUDA, else a GGUF in "
        "llama.cpp, else ONNX Runtime, else PyTorch; it prints what it chose and why.",
    ),
    "generate": (
        "offline batch generation from a JSONL of prompts or chats (serve's backends)",
        "Rows with `prompt` or `messages` (and optionally `id`) in, rows with id, text, "
        "finish_reason and token counts out. Resumable; bad rows go to <output>.errors.jsonl.",
    ),
    "estimate": (
        "time, memory and disk a run will take, whether it fits, and what to change when it does not",
        "Counts the data's tokens, reads the model's size from its config.json and prices "
        "training, eval, merge and every configured export. By default a probe trains a few real steps on "
        "a temporary copy (nothing is written into the run); --no-probe answers in seconds from the model "
        "alone. Exit code 3 when the run does not fit.",
    ),
    "run": (
        "every step of a config in order (data, train, eval, merge, export), skipping the ones already up to date",
        "Runs data, train, eval, merge and export (when export.formats names one) "
        "in order. A step whose last run had the same inputs and whose outputs are on disk is "
        "skipped, so running the same config again continues where a crash or Ctrl-C stopped "
        "(an interrupted training resumes from its latest checkpoint).",
    ),
}


def _command(sub: Subparsers, name: str) -> argparse.ArgumentParser:
    """A subcommand with its help line and its description from :data:`COMMAND_TEXT`."""
    help_text, description = COMMAND_TEXT[name]
    return sub.add_parser(name, help=help_text, description=description)


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


def _add_batch_files(p: argparse.ArgumentParser, input_help: str, output_help: str) -> None:
    """The files of a resumable batch command (score, generate)."""
    p.add_argument("--input", required=True, metavar="FILE", help=input_help)
    p.add_argument("--output", required=True, metavar="FILE", help=output_help)


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
    for add in (
        _add_tui_parsers,
        _add_config_parser,
        _add_models_parser,
        _add_inspect_parser,
        _add_score_parser,
        _add_serve_parser,
        _add_generate_parser,
        _add_run_parser,
        _add_estimate_parser,
        _add_step_parsers,
    ):
        add(sub)
    return parser


def _add_tui_parsers(sub: Subparsers) -> None:
    tui = sub.add_parser("tui", help="open the terminal UI (the default)")
    _add_config_args(tui)
    opener = sub.add_parser("open", help="open a run (its folder or config file) in the terminal UI")
    opener.add_argument("target", help="a run directory (runs/<name>) or a config file")
    opener.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _add_config_parser(sub: Subparsers) -> None:
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


def _add_models_parser(sub: Subparsers) -> None:
    models = sub.add_parser("models", help="list or prepare base models")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    mlist = msub.add_parser("list", help="built-in models and their local directories")
    mlist.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prep = msub.add_parser("prepare", help="import/download a model now (cached)")
    prep.add_argument("name", nargs="?", default=None, help="model.base value (default: the default model)")
    prep.add_argument("--json", action="store_true", help="print the resolved model as JSON")


def _add_inspect_parser(sub: Subparsers) -> None:
    inspect = sub.add_parser(
        "inspect", help="show what a GGUF file holds: architecture, quantization, tokenizer, chat template"
    )
    inspect.add_argument("file", help="a .gguf file")
    inspect.add_argument("--json", action="store_true", help="print JSON")


def _add_score_parser(sub: Subparsers) -> None:
    score = _command(sub, "score")
    score.add_argument(
        "--model", required=True, metavar="PATH", help="an ONNX export folder, a merged model directory or a .gguf file"
    )
    _add_batch_files(score, "JSONL rows to score", "JSONL scores (appended; resumable)")
    score.add_argument(
        "--field",
        default="text",
        metavar="COLUMN[+COLUMN]",
        help="text column, or prompt+completion to also score the completion given the prompt (default: text)",
    )
    score.add_argument("--batch-size", type=int, default=16, metavar="N", help="rows per batch (default: 16)")
    score.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all)")


def _add_serve_parser(sub: Subparsers) -> None:
    srv = _command(sub, "serve")
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
        help="serve this adapter on the base as model NAME (repeatable; PyTorch or vLLM); the base is served too",
    )
    srv.add_argument(
        "--ui",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the chat page at / (default: serve.ui, auto: on when --host is loopback)",
    )
    srv.add_argument(
        "--engine",
        choices=("loratui", "vllm"),
        default=None,
        help="what generates: loratui's own backends, or vLLM's server behind loratui's API (default: serve.engine)",
    )
    srv.add_argument(
        "--vllm-args",
        default=None,
        metavar="ARGS",
        help='extra arguments for vLLM, one quoted string (e.g. "--tensor-parallel-size 2"; default: serve.vllm_args)',
    )
    srv.add_argument(
        "--vllm-url",
        default=None,
        metavar="URL",
        help="with --engine vllm: use the vLLM server already running at URL instead of starting one "
        "(default: serve.vllm_url)",
    )


def _add_generate_parser(sub: Subparsers) -> None:
    gen = _command(sub, "generate")
    _add_target_args(gen)
    _add_batch_files(gen, "JSONL prompts or chats", "JSONL outputs (appended; resumable)")
    gen.add_argument("--max-tokens", type=int, default=256, metavar="N", help="new tokens per row (default: 256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def _add_estimate_parser(sub: Subparsers) -> None:
    est = _command(sub, "estimate")
    _add_config_args(est)
    est.add_argument("--no-probe", action="store_true", help="no trial steps: an analytic estimate in seconds")
    est.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _add_run_parser(sub: Subparsers) -> None:
    runner = _command(sub, "run")
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


def _step_list(value: str) -> tuple[str, ...]:
    from loratui.pipeline.registry import STEPS

    steps = tuple(s.strip() for s in value.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step {', '.join(unknown)} (steps: {', '.join(STEPS)})")
    return steps


def _add_step_parsers(sub: Subparsers) -> None:
    """One subcommand per implemented pipeline step (see loratui.pipeline.registry)."""
    from loratui.pipeline.registry import STEP_ACTIONS, STEP_COMMANDS, STEP_FLAGS, STEP_HELP, STEP_OPTIONS, STEPS

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
        for flag, kwargs, _key in [*STEP_OPTIONS.get(name, []), *STEP_FLAGS.get(name, [])]:
            p.add_argument(flag, default=None, **kwargs)
        p.set_defaults(step=name)
