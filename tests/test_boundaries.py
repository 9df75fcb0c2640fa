"""The headless packages never pull in the TUI, and start-up stays light."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEADLESS = ["loratui.pipeline", "loratui.exporters", "loratui.serving"]


def _all_modules() -> list[str]:
    """Every module of the headless packages, so an import buried in a submodule is caught too."""
    import importlib
    import pkgutil

    names = []
    for pkg in HEADLESS:
        module = importlib.import_module(pkg)
        names += [m.name for m in pkgutil.walk_packages(module.__path__, prefix=pkg + ".")]
    return names


HEADLESS_MODULES = _all_modules()


def _loaded_after(code: str) -> set[str]:
    script = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_headless_packages_do_not_import_textual():
    loaded = _loaded_after("\n".join(f"import {m}" for m in HEADLESS + HEADLESS_MODULES))
    assert "textual" not in loaded
    assert not {m for m in loaded if m.startswith("loratui.tui")}


# Modules that *are* the PyTorch side (a Trainer subclass, its callbacks, attention kernels): only the
# train step imports them, inside its function, so importing the pipeline stays light.
TORCH_SIDE = {
    "loratui.pipeline.train.fast",
    "loratui.pipeline.train.head_loss",
    "loratui.pipeline.train.trainer",
    "loratui.pipeline.train.callbacks",
    "loratui.pipeline.train.preference",
}


def test_headless_packages_import_no_heavy_library_at_import_time():
    light = [m for m in HEADLESS + HEADLESS_MODULES if m not in TORCH_SIDE]
    loaded = _loaded_after("\n".join(f"import {m}" for m in light))
    assert not {"torch", "transformers", "llama_cpp", "onnxruntime"} & loaded


def test_the_check_can_fail():
    """The sys.modules probe does see textual when something imports it."""
    assert "textual" in _loaded_after("import loratui.tui.app")


@pytest.mark.parametrize("argv", [["--help"], ["config", "--help"], ["models", "--help"]])
def test_help_does_not_import_torch(argv):
    code = f"import loratui.cli\ntry:\n    loratui.cli.main({argv!r})\nexcept SystemExit:\n    pass"
    loaded = _loaded_after(code)
    assert not {"torch", "transformers", "textual", "pydantic"} & loaded


def test_import_linter_contracts_hold():
    import shutil
    from pathlib import Path

    exe = Path(sys.executable).parent / "lint-imports"
    assert exe.exists() or shutil.which("lint-imports"), "import-linter is a dev dependency"
    out = subprocess.run([str(exe)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "7 kept, 0 broken" in out.stdout


def test_a_step_module_imported_from_outside_breaks_the_contract(tmp_path):
    """The recipe contract can fail: a copy of the package where serving imports the data step is refused."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).parent.parent
    shutil.copytree(repo / "loratui", tmp_path / "loratui", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(repo / "pyproject.toml", tmp_path / "pyproject.toml")
    score = tmp_path / "loratui" / "serving" / "score.py"
    score.write_text(score.read_text() + "\nfrom loratui.pipeline.data.step import run as _run  # noqa\n")
    exe = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([str(exe), "--no-cache"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode != 0
    assert "loratui.serving.score -> loratui.pipeline.data.step" in out.stdout
