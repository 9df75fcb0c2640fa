"""``loratui serve``: choose what to serve, load it in the background, run uvicorn.

Security defaults: binds 127.0.0.1; with an API key every route but /health needs
``Authorization: Bearer <key>``; a non-loopback address without a key is refused unless
``--allow-unauthenticated``; remote code is never trusted implicitly (``model.trust_remote_code``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratui.pipeline.errors import LoratuiError
from loratui.serving.app import create_app
from loratui.serving.selection import Choice, choose
from loratui.serving.state import Limits, ServerState

if TYPE_CHECKING:
    from loratui.serving.finetune import JobManager, JobSettings

KEY_ENV = "LORATUI_API_KEY"


@dataclass
class ServeOptions:
    target: Path
    fmt: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_unauthenticated: bool = False
    strict: bool = False
    model_id: str | None = None
    context_length: int = 2048
    max_batch_size: int = 8
    threads: int | None = None
    base: Path | None = None  # the run's base model directory (base + adapter)
    limits: Limits | None = None
    adapters: dict[str, Path] | None = None  # several adapters on the base, each its own model id (PyTorch)
    jobs: JobSettings | None = None  # the fine-tuning API (served_bases is filled in here)
    max_loaded_models: int = 2  # fine-tuned models kept loaded
    source: str | None = None  # the built-in name or hub id the target was resolved from (selection.resolve_target)


def served_base(opts: ServeOptions, choice: Choice) -> str | None:
    """What a fine-tuning job that names the served model starts from (its ``model.base``): a run's merged
    model, a model directory, a GGUF file (imported), the built-in name or hub id served; None for an ONNX export
    or a run not merged yet."""
    if opts.source is not None:
        return opts.source
    if (opts.target / "config.yaml").is_file():
        merged = opts.target / "merged"
        return str(merged.resolve()) if (merged / "config.json").is_file() else None
    if choice.kind in ("torch", "gguf") and choice.adapter is None:
        return str(choice.path.resolve())
    return None


def fine_tuned_loader(jobs: JobManager, opts: ServeOptions, log: Callable[[str], None]) -> Callable[[str], Any]:
    """Loads a model a job made: its run as ``--format auto`` would (PyTorch on CUDA; on CPU its GGUF,
    else its ONNX, else its merged model), or base + adapter for a ``:ckpt-step-N`` checkpoint."""
    from dataclasses import replace

    from loratui.serving.errors import ApiError

    plain = replace(opts, adapters=None)

    def load(model: str) -> Any:
        import torch

        from loratui.pipeline.models import resolve_model

        source = jobs.model_source(model)
        if source is None:
            raise ApiError(
                404,
                f"The model `{model}` does not exist: no succeeded fine-tuning job (or checkpoint) made it",
                param="model",
                code="model_not_found",
            )
        run, checkpoint, base_spec = source
        if checkpoint is not None:
            base = resolve_model(base_spec, prepare=False).path
            choice = Choice("torch", base, checkpoint, f"PyTorch serves the base {base} with {checkpoint}")
        else:
            merged = (run / "merged" / "config.json").is_file()
            choice = choose(
                run, "auto", torch.cuda.is_available(), None if merged else resolve_model(base_spec, prepare=False).path
            )
        log(f"serve: loading {model}: {choice.reason}")
        return build_backend(choice, plain, model, log)

    return load


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(opts: ServeOptions) -> None:
    if not is_loopback(opts.host) and not opts.api_key and not opts.allow_unauthenticated:
        raise LoratuiError(
            f"--host {opts.host} would expose the model to the network with no API key",
            hint=f"Set --api-key (or {KEY_ENV}), or pass --allow-unauthenticated if that is intended.",
        )


def build_backend(choice: Choice, opts: ServeOptions, model_id: str, log: Callable[[str], None] = print) -> Any:
    from loratui.serving import backends

    if choice.kind == "gguf":
        return backends.LlamaCppBackend(choice.path, model_id, opts.context_length, opts.threads, opts.max_batch_size)
    if choice.kind == "onnx":
        return backends.OnnxBackend(choice.path, model_id, opts.context_length, opts.threads)
    return backends.TorchBackend(
        choice.path,
        model_id,
        opts.context_length,
        opts.max_batch_size,
        adapter=choice.adapter,
        adapters=opts.adapters,
        log=log,
    )


def loader_for(choice: Choice, opts: ServeOptions, log: Callable[[str], None]) -> Callable[[ServerState], None]:
    """Loads the backend into the state; a failing adapter falls back to the base (degraded) unless strict."""

    def load(state: ServerState) -> None:
        try:
            state.backend = build_backend(choice, opts, state.model_id, log)
            failed = getattr(state.backend, "failed", None)
            state.status = "degraded" if failed else "ok"
            if failed:
                if opts.strict:
                    raise RuntimeError("; ".join(f"adapter {k} failed to load ({v})" for k, v in failed.items()))
                state.reason = "; ".join(f"adapter {k} failed to load ({v}); not served" for k, v in failed.items())
        except Exception as e:  # noqa: BLE001 - reported on /health and in the log
            why = f"{type(e).__name__}: {e}"
            if choice.adapter is not None and not opts.strict:
                log(f"serve: the adapter {choice.adapter} failed to load ({why}); serving the base model instead")
                try:
                    state.backend = build_backend(
                        Choice(choice.kind, choice.path, None, choice.reason), opts, state.model_id
                    )
                    state.status, state.reason = (
                        "degraded",
                        f"adapter {choice.adapter} failed to load ({why}); serving the base model",
                    )
                    return
                except Exception as e2:  # noqa: BLE001
                    why = f"{why}; the base failed too: {type(e2).__name__}: {e2}"
            state.status, state.reason = "failed", why
            log(f"serve: loading failed: {why}")
        else:
            log(f"serve: ready ({state.backend.kind}, context {state.backend.context_length} tokens)")

    return load


def prepare(opts: ServeOptions, log: Callable[[str], None]) -> tuple[ServerState, Any]:
    """The state and the app for ``opts`` (the model loads when the app starts)."""
    check_security(opts)
    import torch

    if opts.adapters:
        base = opts.base or opts.target
        if opts.fmt not in ("auto", "torch") or not (base / "config.json").is_file():
            raise LoratuiError(
                "--adapter: several adapters are served by PyTorch (peft) on a base model directory",
                hint="Give the base model directory (or a run) and --format torch or auto.",
            )
        choice = Choice(
            "torch",
            base,
            None,
            f"{len(opts.adapters)} adapter(s) on the base {base}: PyTorch (peft) "
            "serves them side by side, one model id each",
        )
    else:
        choice = choose(opts.target, opts.fmt, torch.cuda.is_available(), opts.base)
    model_id = opts.model_id or opts.source or (opts.target.name if opts.target.is_dir() else opts.target.stem)
    log(f"serve: {choice.reason}")
    state = ServerState(model_id=model_id, chosen=choice.reason)
    jobs = pool = None
    if opts.jobs is not None:
        from loratui.serving.finetune import JobManager
        from loratui.serving.pool import ModelPool

        job_base = served_base(opts, choice)
        if job_base is not None:
            opts.jobs.served_bases.setdefault(model_id, job_base)
        jobs = JobManager(opts.jobs, log)
        pool = ModelPool(fine_tuned_loader(jobs, opts, log), opts.max_loaded_models)
    app = create_app(state, opts.api_key, opts.limits, loader_for(choice, opts, log), jobs, pool)
    return state, app


def serve(opts: ServeOptions, log: Callable[[str], None]) -> None:
    import uvicorn

    _state, app = prepare(opts, log)
    log(
        f"serve: http://{opts.host}:{opts.port}/v1 (model `{_state.model_id}`"
        + (", API key required" if opts.api_key else "")
        + ")"
    )
    if opts.jobs is not None:
        log(
            f"serve: fine-tuning API on /v1/files and /v1/fine_tuning/jobs ({opts.jobs.slots} job(s) at once; "
            f"files and jobs in {opts.jobs.root}, runs in {opts.jobs.runs_dir})"
        )
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning", timeout_graceful_shutdown=5)


def api_key_from(arg: str | None, config_key: str | None) -> str | None:
    return arg or os.environ.get(KEY_ENV) or config_key
