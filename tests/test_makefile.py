"""`make run` without a terminal (a script, a CI log): setup and model stay, the TUI says it needs a terminal."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
STAMP = VENV / ".loratui-installed"


def _built() -> bool:
    """This is the Makefile's own environment and its setup stamp is up to date (so `make run` rebuilds nothing)."""
    if shutil.which("make") is None or Path(sys.prefix).resolve() != VENV.resolve() or not STAMP.is_file():
        return False
    return subprocess.run(["make", "-q", str(STAMP.relative_to(REPO))], cwd=REPO, capture_output=True).returncode == 0


def test_make_run_sets_up_then_opens_the_tui():
    if shutil.which("make") is None:
        pytest.skip("no make")
    dry = subprocess.run(["make", "-n", "-B", "run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = dry.stdout.splitlines()
    prepare = [i for i, ln in enumerate(lines) if "loratui models prepare" in ln]
    tui = [i for i, ln in enumerate(lines) if ln.endswith("loratui --config examples/quickstart.yaml")]
    assert prepare and tui and prepare[0] < tui[0], dry.stdout


def test_the_optional_gemma3_model_is_installed_for_the_tests_not_for_make_run():
    if shutil.which("make") is None:
        pytest.skip("no make")

    def dry(target: str) -> str:
        return subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=60).stdout

    assert ".[gemma3]" not in dry("run")
    test = dry("test")
    assert ".[gemma3]" in test and 'pytest -m "not slow and not vllm"' in test
    assert 'pytest -m "slow and not vllm"' in dry("test-slow")
    vllm = dry("test-vllm")
    assert "requirements-vllm.lock" in vllm and "pytest -m vllm" in vllm
    assert "requirements-vllm.lock" not in test and "requirements-vllm.lock" not in dry("run")
    ci = (REPO / ".ci" / "run").read_text().split()
    assert ci.index("test") < ci.index("test-slow") < ci.index("test-vllm"), "CI runs the everyday suite, then the rest"


@pytest.mark.skipif(not _built(), reason="needs the .venv that `make setup` built, up to date")
def test_make_run_without_a_terminal_exits_at_once_and_keeps_the_setup():
    before = STAMP.stat().st_mtime
    started = time.perf_counter()
    proc = subprocess.run(
        ["make", "run"], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    took = time.perf_counter() - started
    assert proc.returncode != 0
    assert "the terminal UI needs a terminal" in proc.stderr and "loratui run examples/quickstart.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert took < 5, f"make run took {took:.1f}s without a terminal"
    assert STAMP.stat().st_mtime == before and (VENV / "bin" / "loratui").is_file()  # nothing rebuilt or undone
    assert "smollm2-135m-instruct: " in proc.stdout  # the model target ran (and found the model prepared)


def test_make_test_lints_and_checks_the_formatting_first():
    if shutil.which("make") is None:
        pytest.skip("no make")
    lines = subprocess.run(
        ["make", "-n", "-B", "test"], cwd=REPO, capture_output=True, text=True, timeout=60
    ).stdout.splitlines()
    at = {
        what: next((i for i, ln in enumerate(lines) if ln.rstrip().endswith(what)), None)
        for what in ("ruff check .", "ruff format --check .", 'pytest -m "not slow and not vllm"')
    }
    assert None not in at.values(), lines
    assert (
        at["ruff check ."] < at['pytest -m "not slow and not vllm"']
        and at["ruff format --check ."] < at['pytest -m "not slow and not vllm"']
    )
