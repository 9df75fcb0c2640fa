"""``loratui serve``: choose what to serve, load it in the background, run uvicorn.

Security defaults: binds 127.0.0.1; with an API key every route but /health needs
``Authorization: Bearer <key>``; a non-loopback address without a key is refused unless
``--allow-unauthenticated``; remote code is never trusted implicitly (``model.trust_remote_code``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratui.pipeline.errors import LoratuiError
from loratui.serving.app import create_app
from loratui.serving.selection import Choice, choose, gguf_type
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
    engine: str = "loratui"  # or "vllm": vLLM's server behind this API (serving/vllm_engine.py)
    vllm_args: list[str] = field(default_factory=list)
    vllm_python: str | None = None
    vllm_url: str | None = None  # a vLLM that is already running
    ui: bool = True  # the chat page at / (serve.ui, resolved)
    base_model: str | None = None  # serving a run: its model.base, served too (loaded on first use)


def served_base(opts: ServeOptions, choice: Choice) -> str | None:
    """What a fine-tuning job that names the served model starts from (its ``model.base``): a run's merged
    model, a model directory, a GGUF file (imported), the built-in name or hub id served; None for an ONNX export
    or a run not merged yet."""
    if opts.source is not None:
        return opts.source
    if (opts.target / "config.yaml").is_file():
        merged = opts.target / "merged"
        return str(merged.resolve()) if (merged / "config.json").is_file() else None
    if choice.kind in ("torch", "gguf", "vllm") and choice.adapter is None:
        return str(choice.path.resolve())
    return None


def fine_tuned_loader(
    jobs: JobManager, opts: ServeOptions, log: Callable[[str], None], served: Callable[[], Any] = lambda: None
) -> Callable[[str], Any]:
    """Loads a model a job made: its run as ``--format auto`` would (PyTorch on CUDA; on CPU its GGUF,
    else its ONNX, else its merged model), or base + adapter for a ``:ckpt-step-N`` checkpoint. With the vLLM
    engine, a job's LoRA adapter on the served model is loaded into the running vLLM instead (``served()``:
    the server's backend)."""
    from dataclasses import replace

    from loratui.serving.errors import ApiError

    plain = replace(opts, adapters=None, engine="loratui")

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
        adapter = checkpoint if checkpoint is not None else run / "adapter"
        engine = served()
        if opts.engine == "vllm" and engine is not None and vllm_can_load(adapter, base_spec, opts, engine):
            from loratui.serving.backends.vllm import VllmAdapter

            log(f"serve: loading {model} into the running vLLM (runtime LoRA: {adapter})")
            return VllmAdapter(engine, model, adapter)
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


def base_id(opts: ServeOptions, model_id: str) -> str | None:
    """The id the run's base model is served under: the built-in name or hub id ``model.base`` gives, a local
    base by its folder's name; None when it is not served (off, or the same id as the served model)."""
    if opts.base_model is None:
        return None
    spec = opts.base_model.strip()
    name = Path(spec).expanduser().name if Path(spec).expanduser().exists() else spec
    name = name if name != model_id else f"{model_id}-base"
    return name or None


def base_choice(opts: ServeOptions, served: Choice | None, cuda: bool) -> Choice:
    """How the run's base is served: in the tuned model's own runtime and type where there is one (the run's
    exported ``<name>-base-<type>.gguf``, a built-in's GGUF of the same type), so that base and tuned differ by
    the training only; else as ``--format auto`` would serve the base model directory (PyTorch)."""
    from loratui.pipeline import models

    spec = opts.base_model or ""
    if served is not None and served.kind == "gguf":
        kind = gguf_type(served.path)
        exported = opts.target / "exports" / "gguf" / f"{opts.target.name}-base-{kind}.gguf"
        if exported.is_file():
            return Choice("gguf", exported, None, f"llama.cpp serves the run's base export {exported.name}")
        if spec in models.BUILTINS:
            try:
                path = models.builtin_gguf(spec)
            except LoratuiError:
                path = None
            if path is not None and kind is not None and gguf_type(path) == kind:
                return Choice("gguf", path, None, f"llama.cpp serves the built-in {spec}'s GGUF {path.name}")
    path = opts.base or models.resolve_model(spec).path  # a built-in is imported once if it is not yet
    return choose(path, "auto", cuda, None)


def vllm_can_load(adapter: Path, base_spec: str, opts: ServeOptions, backend: Any) -> bool:
    """Whether a job's adapter goes into the running vLLM: a LoRA (not DoRA) trained on the very model vLLM serves
    (a job on a run's merged model while vLLM serves the run's base with adapters is not)."""
    import json

    if getattr(backend, "kind", None) != "vllm" or opts.jobs is None:
        return False
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if config.get("use_dora"):
        return False
    served = backend.engine.spec.model.resolve()
    given = Path(base_spec).expanduser()
    if given.exists():
        return bool(given.resolve() == served)
    return base_spec == opts.source and opts.target.resolve() == served  # a built-in name or hub id vLLM serves


def vllm_choice(opts: ServeOptions) -> Choice:
    """What vLLM serves: a Hugging Face directory (a run's merged model, else its base with the run's adapter as
    a vLLM LoRA module; a model directory), with ``--adapter`` modules on it. GGUF and ONNX are loratui's."""
    if opts.fmt not in ("auto", "torch"):
        raise LoratuiError(
            f"--format {opts.fmt} with --engine vllm: vLLM serves Hugging Face model directories",
            hint="Leave --format out (or use --engine loratui to serve a GGUF or ONNX export).",
        )
    target = opts.target
    if (target / "config.yaml").is_file():
        merged = target / "merged"
        if (merged / "config.json").is_file() and not opts.adapters:
            return Choice("vllm", merged, None, f"vLLM serves the merged model {merged}")
        base = opts.base or target
        adapter = target / "adapter"
        if opts.adapters:
            return Choice("vllm", base, None, f"vLLM serves the base {base} with {len(opts.adapters)} LoRA module(s)")
        if (adapter / "adapter_config.json").is_file():
            return Choice("vllm", base, adapter, f"vLLM serves the base {base} with the run's adapter as a LoRA module")
    elif (target / "config.json").is_file():
        extra = f" with {len(opts.adapters)} LoRA module(s)" if opts.adapters else ""
        return Choice("vllm", target, None, f"vLLM serves the model directory {target}{extra}")
    raise LoratuiError(
        f"--engine vllm: {target} is not a run with a merged model or an adapter, nor a model directory",
        hint="vLLM serves Hugging Face model directories: serve the run (merged, or base + adapter) or its merged/ "
        "folder; GGUF and ONNX files are served by --engine loratui.",
    )


def start_vllm(choice: Choice, opts: ServeOptions, model_id: str, log: Callable[[str], None]) -> Any:
    """Start (or attach to) vLLM for ``choice`` and wait until it answers; the backend that talks to it."""
    import json

    from loratui.pipeline import device as devices
    from loratui.serving.backends.vllm import VllmBackend
    from loratui.serving.vllm_engine import EngineSpec, VllmEngine, find_python

    adapters = dict(opts.adapters or {})
    models: dict[str, str | None] = {model_id: None, **{name: name for name in adapters}}
    served = model_id
    if choice.adapter is not None:  # the run's adapter is the model clients ask for; the base is vLLM's alone
        served, adapters, models = f"{model_id}-base", {model_id: choice.adapter}, {model_id: model_id}
    limit = json.loads((choice.path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    hw = devices.probe()
    spec = EngineSpec(
        model=choice.path,
        served_name=served,
        context_length=min(opts.context_length, int(limit)) if limit else opts.context_length,
        max_num_seqs=opts.max_batch_size,
        adapters=adapters,
        runtime_lora=opts.jobs is not None,
        # the precision loratui's PyTorch backend uses here (fp32 on CPU, bf16 on CUDA): the same greedy answers
        dtype={"fp32": "float32", "bf16": "bfloat16"}.get(
            devices.inference_precision(devices.choose("auto", hw).value, hw)
        ),
        threads=opts.threads,
        extra=list(opts.vllm_args),
    )
    engine = VllmEngine(spec, None if opts.vllm_url else find_python(opts.vllm_python), opts.vllm_url).start(log)
    try:
        engine.wait_ready()
        tokenizer = choice.adapter if choice.adapter and (choice.adapter / "tokenizer_config.json").is_file() else None
        return VllmBackend(engine, tokenizer or choice.path, model_id, models)
    except BaseException:
        engine.close()
        raise


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

    backend: Any
    if choice.kind == "vllm":
        backend = start_vllm(choice, opts, model_id, log)
    elif choice.kind == "gguf":
        backend = backends.LlamaCppBackend(
            choice.path, model_id, opts.context_length, opts.threads, opts.max_batch_size
        )
    elif choice.kind == "onnx":
        backend = backends.OnnxBackend(choice.path, model_id, opts.context_length, opts.threads, opts.max_batch_size)
    else:
        backend = backends.TorchBackend(
            choice.path,
            model_id,
            opts.context_length,
            opts.max_batch_size,
            adapter=choice.adapter,
            adapters=opts.adapters,
            log=log,
        )
    backend.format = describe_format(choice)
    return backend


def describe_format(choice: Choice) -> str:
    """The served artifact in a few words, for /ui/models (the chat page shows it beside the model)."""
    if choice.kind == "gguf":
        kind = gguf_type(choice.path)
        return f"GGUF {kind}" if kind else "GGUF"
    if choice.kind == "onnx":
        return "ONNX"
    weights = "safetensors" if any(choice.path.glob("*.safetensors")) else "PyTorch weights"
    if choice.adapter is not None:
        return f"{weights} + LoRA adapter"
    return f"{weights} ({choice.path.name})"


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

    if opts.engine == "vllm":
        choice = vllm_choice(opts)
    elif opts.adapters:
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
    jobs = None
    loaders: dict[str, Callable[[str], Any]] = {}
    if opts.jobs is not None:
        from loratui.serving.finetune import JobManager

        job_base = served_base(opts, choice)
        if job_base is not None:
            opts.jobs.served_bases.setdefault(model_id, job_base)
        jobs = JobManager(opts.jobs, log)
        loaders["ft:"] = fine_tuned_loader(jobs, opts, log, lambda: state.backend)
    base_name = base_id(opts, model_id) if base_servable(opts, log) else None
    if base_name is not None:
        loaders[base_name] = base_loader(opts, choice, log)
    pool = None
    if loaders:
        from loratui.serving.pool import ModelPool

        pool = ModelPool(lambda model: loaders[model if model in loaders else "ft:"](model), opts.max_loaded_models)
    app = create_app(
        state,
        opts.api_key,
        opts.limits,
        loader_for(choice, opts, log),
        jobs,
        pool,
        extra_models=[base_name] if base_name is not None else [],
        ui=opts.ui,
    )
    return state, app


def base_servable(opts: ServeOptions, log: Callable[[str], None]) -> bool:
    """Whether the run's base can be listed: it is here (a model the server could not load would only answer 503),
    and the engine is loratui's (beside vLLM, a second model in loratui's PyTorch would contend for its GPU)."""
    if opts.base_model is None:
        return False
    if opts.engine == "vllm":
        log("serve: the run's base is not served beside vLLM (serve it with its own `loratui serve` to compare)")
        return False
    from loratui.pipeline import models

    try:
        if opts.base is None and opts.base_model.strip() not in models.BUILTINS:
            models.resolve_model(opts.base_model, prepare=False)
    except LoratuiError as e:
        log(f"serve: the run's base {opts.base_model} is not served: {e}")
        return False
    return True


def base_loader(opts: ServeOptions, served: Choice, log: Callable[[str], None]) -> Callable[[str], Any]:
    """Loads the run's base model (``base_id``) the first time a request names it."""
    from dataclasses import replace

    plain = replace(opts, adapters=None, engine="loratui")

    def load(model: str) -> Any:
        import torch

        choice = base_choice(opts, served if served.kind != "vllm" else None, torch.cuda.is_available())
        log(f"serve: loading the base {model}: {choice.reason}")
        return build_backend(choice, plain, model, log)

    return load


def serve(opts: ServeOptions, log: Callable[[str], None]) -> None:
    import uvicorn

    _state, app = prepare(opts, log)
    log(
        f"serve: http://{opts.host}:{opts.port}/v1 (model `{_state.model_id}`"
        + (", API key required" if opts.api_key else "")
        + ")"
    )
    if opts.ui:
        host = f"[{opts.host}]" if ":" in opts.host else opts.host
        log(f"serve: chat page at http://{host}:{opts.port}/")
    if opts.jobs is not None:
        log(
            f"serve: fine-tuning API on /v1/files and /v1/fine_tuning/jobs ({opts.jobs.slots} job(s) at once; "
            f"files and jobs in {opts.jobs.root}, runs in {opts.jobs.runs_dir})"
        )
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning", timeout_graceful_shutdown=5)


def api_key_from(arg: str | None, config_key: str | None) -> str | None:
    return arg or os.environ.get(KEY_ENV) or config_key
