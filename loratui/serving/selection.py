"""Which artifact and runtime to serve, and why (``--format auto``).

A run directory offers several artifacts. With CUDA, PyTorch serves the merged model (else the base
with the run's adapter). On CPU, llama.cpp serves a GGUF when there is one (fastest here: see the
GGUF benchmark), preferring q8_0 (closest to the merged model), then q4_k_m, then any other; else
ONNX Runtime serves the fp32 ONNX export; else PyTorch. A path to one artifact (a ``.gguf`` file, an
ONNX folder, a merged directory) is served by its own runtime; an adapter folder alone is refused (serve
its run directory, base + adapter, or its merged model). A built-in model name
or a hub id (what ``model.base`` accepts) is resolved first to its local Hugging Face directory
(:func:`resolve_target`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loratui.pipeline.errors import LoratuiError

GGUF_PREFERENCE = ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "f16", "bf16", "f32")
FORMATS = ("auto", "torch", "gguf", "onnx")


_GGUF_TYPE = re.compile(r"(?i)i?q\d\w*|f16|bf16|f32")


def gguf_type(path: Path) -> str | None:
    """The type a GGUF file's name ends with, lower case (``run-q8_0.gguf``: q8_0; ``Model.Q4_1.gguf``: q4_1)."""
    kind = re.split(r"[-.]", path.stem)[-1]
    return kind.lower() if _GGUF_TYPE.fullmatch(kind) else None


@dataclass
class Choice:
    kind: str  # torch, gguf, onnx
    path: Path  # the model (for torch with an adapter: the base directory)
    adapter: Path | None
    reason: str


@dataclass
class Target:
    path: Path  # what choose() is given: a run directory or one artifact
    model: str | None = None  # the built-in name or hub id it was resolved from (None: a path as given)


def accepted() -> str:
    """What ``loratui serve`` and ``generate`` take, in words, with the built-in names."""
    from loratui.pipeline.models import BUILTINS

    return (
        "a run directory, a .gguf file, an ONNX export folder, a merged model directory, a built-in model "
        f"({', '.join(BUILTINS)}) or a hub id (org/name)"
    )


def resolve_target(spec: str, fmt: str = "auto", log: Callable[[str], None] | None = None) -> Target:
    """The target named on the command line. An existing path is taken as it is. A built-in model name is
    prepared as ``loratui models prepare`` does (imported once into the cache) and served from its Hugging
    Face directory; with ``--format gguf``, the GGUF it ships is served as it is. A hub id is taken from the
    Hugging Face cache, else downloaded, else fails with the offline error of ``model.base``."""
    from loratui.pipeline import models

    path = Path(spec).expanduser()
    if path.exists():
        return Target(path)
    name = spec.strip()
    if name in models.BUILTINS:
        if fmt == "gguf":
            return Target(models.builtin_gguf(name), name)
        return Target(models.resolve_model(name, log=log).path, name)
    # `runs/x` is spelt like a hub id: when its folder is here, it is a run that is missing, not a model
    if models.is_hub_id(name) and not path.parent.is_dir():
        return Target(models.resolve_model(name, log=log).path, name)
    close = difflib.get_close_matches(name, list(models.BUILTINS), n=1, cutoff=0.6)
    raise LoratuiError(
        f"{spec}: no such run directory, file, built-in model or hub id; serve takes {accepted()}",
        hint=f"Did you mean {close[0]!r}?" if close else None,
    )


def nothing_to_serve(run: Path, config: str | None) -> LoratuiError:
    """No target on the command line, no serve.artifact, and the config's run is not there."""
    from loratui.pipeline.models import DEFAULT_MODEL

    return LoratuiError(
        f"nothing to serve: no target given and no run at {run} (the run of "
        f"{config or 'the default config'}); pass {accepted()}",
        hint=f"For example: loratui serve runs/<name>, or loratui serve {DEFAULT_MODEL} (a "
        "built-in base model), or --config a config whose run exists.",
    )


def _ggufs(run: Path) -> list[Path]:
    found = [p for p in (run / "exports" / "gguf").glob("*.gguf") if "-lora-" not in p.name and "-base-" not in p.name]

    def rank(p: Path) -> int:
        kind = p.stem.rsplit("-", 1)[-1]
        return GGUF_PREFERENCE.index(kind) if kind in GGUF_PREFERENCE else len(GGUF_PREFERENCE)

    return sorted(found, key=lambda p: (rank(p), p.name))


def _single(path: Path, fmt: str) -> Choice:
    if path.is_file() and path.suffix == ".gguf":
        kind, what = "gguf", "a GGUF file"
    elif path.is_dir() and any(path.glob("*.onnx")):
        kind, what = "onnx", "an ONNX export"
    elif path.is_dir() and (path / "adapter_config.json").is_file():
        raise LoratuiError(
            f"{path} is an adapter folder: serve its run directory (base + adapter) or its merged model",
            hint="loratui serve runs/<name>, or loratui merge first.",
        )
    elif path.is_dir() and (path / "config.json").is_file():
        kind, what = "torch", "a transformers model directory"
    else:
        raise LoratuiError(f"{path}: not a run directory, a .gguf file, an ONNX export or a model directory")
    if fmt not in ("auto", kind):
        raise LoratuiError(f"--format {fmt}: {path} is {what}, served with --format {kind}")
    return Choice(kind, path, None, f"{path} is {what}")


def choose(target: Path, fmt: str, cuda: bool, base: Path | None = None) -> Choice:
    """``target``: a run directory or one artifact. ``base``: the run's base model directory (for
    serving base + adapter when nothing was merged). A model family the server cannot run (an
    encoder-decoder) is refused here, before anything loads (:mod:`loratui.pipeline.families`)."""
    choice = _choose(target, fmt, cuda, base)
    if choice.kind == "torch":
        from loratui.pipeline.families import check

        check(choice.path, ["serve"])
    return choice


def _choose(target: Path, fmt: str, cuda: bool, base: Path | None = None) -> Choice:
    if fmt not in FORMATS:
        raise LoratuiError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if not target.exists():
        raise LoratuiError(f"{target}: no such run directory or file")
    if not (target / "config.yaml").is_file() or target.is_file():
        return _single(target, fmt)
    ggufs = _ggufs(target)
    onnx = target / "exports" / "onnx"
    has_onnx = onnx.is_dir() and any(onnx.glob("*.onnx"))
    if fmt == "torch" or (fmt == "auto" and cuda):
        return _torch_choice(target, base, "CUDA is available" if fmt == "auto" else "--format torch")
    if fmt == "gguf" or (fmt == "auto" and ggufs):
        return _gguf_choice(target, ggufs, auto=fmt == "auto")
    if fmt == "onnx" or (fmt == "auto" and has_onnx):
        return _onnx_choice(target, onnx, has_onnx, auto=fmt == "auto")
    return _torch_choice(target, base, "no CUDA, no GGUF and no ONNX export")


def _torch_choice(target: Path, base: Path | None, why: str) -> Choice:
    """PyTorch on a run: its merged model, else the base with its adapter."""
    merged = target / "merged"
    if (merged / "config.json").is_file():
        return Choice("torch", merged, None, f"{why}: PyTorch serves the merged model {merged}")
    adapter = target / "adapter"
    if (adapter / "adapter_config.json").is_file() and base is not None:
        return Choice(
            "torch",
            base,
            adapter,
            f"{why}: PyTorch serves the base {base} with the adapter {adapter} (nothing merged yet)",
        )
    raise LoratuiError(
        f"{target}: nothing to serve with PyTorch (no merged/ and no adapter/)",
        hint="Train first (loratui train), or merge (loratui merge).",
    )


def _gguf_choice(target: Path, ggufs: list[Path], auto: bool) -> Choice:
    """llama.cpp on the run's preferred GGUF (``ggufs`` in order of preference)."""
    if not ggufs:
        raise LoratuiError(f"{target}: no GGUF in exports/gguf/", hint="loratui export --format gguf first.")
    return Choice(
        "gguf",
        ggufs[0],
        None,
        ("no CUDA; " if auto else "") + f"llama.cpp serves {ggufs[0].name} (the fastest runtime on CPU; "
        f"{'q8_0' if ggufs[0].stem.endswith('q8_0') else 'the closest type to q8_0'} of "
        f"{len(ggufs)} GGUF file(s))",
    )


def _onnx_choice(target: Path, onnx: Path, has_onnx: bool, auto: bool) -> Choice:
    """ONNX Runtime on the run's ONNX export."""
    if not has_onnx:
        raise LoratuiError(f"{target}: no ONNX export in exports/onnx/", hint="loratui export --format onnx first.")
    return Choice("onnx", onnx, None, ("no CUDA and no GGUF; " if auto else "") + f"ONNX Runtime serves {onnx}")
