"""The real chat templates and vocab GGUFs the family tests read, from scripts/family_assets.py's folder.

The texts are third-party files and stay out of this repository: ``make assets`` (part of ``make test``)
extracts them once from the pinned llama-cpp-python sdist. A missing folder fails the test that asks
for it with a message saying so, never a bare FileNotFoundError.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "family_assets.py"


@functools.cache
def _script():
    """scripts/family_assets.py as a module (scripts/ is not a package): one source for the folder's location."""
    spec = importlib.util.spec_from_file_location("family_assets_script", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assets_dir() -> Path:
    """``<LORATUI_ASSETS or ~/.cache/loratui/family-assets>/llama-cpp-python-<locked version>``."""
    script = _script()
    folder = script.assets_root() / f"{script.PACKAGE}-{script.locked_version()}"
    if not folder.is_dir():
        pytest.fail(
            f"the family assets are missing: {folder} does not exist. Run `make assets` "
            "(or `python scripts/family_assets.py`) once; it needs PyPI the first time.",
            pytrace=False,
        )
    return folder


def _file(folder: str, name: str) -> Path:
    path = assets_dir() / folder / name
    if not path.is_file():
        known = sorted(p.name for p in (assets_dir() / folder).iterdir())
        pytest.fail(f"{path} is not among the family assets ({len(known)} files in {path.parent})", pytrace=False)
    return path


def template(name: str) -> str:
    """The text of a chat template by its file name in llama.cpp, with or without ``.jinja``."""
    return _file("templates", name if name.endswith(".jinja") else f"{name}.jinja").read_text(encoding="utf-8")


def vocab(name: str) -> Path:
    """A vocab-only GGUF by its llama.cpp name (``qwen2``, ``llama-bpe``) or its file name."""
    return _file("vocab", name if name.endswith(".gguf") else f"ggml-vocab-{name}.gguf")
